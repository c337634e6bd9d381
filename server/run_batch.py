"""`conserve-jax run-batch -i in.jsonl -o out.jsonl`: an OpenAI batch input file through an
in-process engine, without a server (vLLM's `run-batch`).

Input: OpenAI batch request lines `{"custom_id", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions", "body": {...}}`; each body is checked and
tokenized exactly as the HTTP front checks a request (`openai_api.schemas`), and runs as
offline work. Output: one line per input line in OpenAI's batch output format, in the order
lines finish:

    {"id": "batch_req_<line>", "custom_id": ..., "error": null,
     "response": {"status_code": 200, "request_id": "req_<line>", "body": <chat.completion
                  or text_completion>}}

A bad line does not stop the run: it gets a line with `response.status_code` 400 (404 for
another model) and OpenAI's error body naming the field, or, when the line itself is not a
usable request (not JSON, no custom_id, bad method or url), `response: null` and `error:
{"code", "message"}`. `<line>` is the 1-based input line number.

Durability: the output is append-only; each line is written whole, flushed and fsynced
when its request finishes. `--resume` continues an interrupted run: the lines already in the
output are not run again (a torn last line from a crash is cut off first); without it an
existing non-empty output is refused. A progress bar on stderr (INFO, the default level)
counts lines done, with tokens/s. Runs on the main thread; the engine's output reaches it
through stream listeners, so no thread per request.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
from dataclasses import dataclass, field
from typing import Optional

from conserve_jax.engine_api import RequestClass
from conserve_jax.engine_args import add_dataclass_args, add_engine_args
from conserve_server.config import flag_field

log = logging.getLogger(__name__)


@dataclass
class RunBatchOptions:
    """The run-batch command's own settings (engine knobs are the engine's flags)."""

    input_file: str = flag_field("OpenAI batch input file (JSONL)", default="")
    output_file: str = flag_field("output file (JSONL, OpenAI batch output format)", default="")
    resume: bool = flag_field("continue an interrupted run: lines already in the output "
                              "file are not run again", default=False)
    max_in_flight: Optional[int] = flag_field(
        "requests inside the engine at once (none: 2 x --max-num-seqs)", default=None)
    served_model_name: Optional[str] = flag_field(
        "the model id request bodies must name (none: --model)", default=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from conserve_server.main import MockOptions

    parser.add_argument("-i", dest="input_file", help="same as --input-file")
    parser.add_argument("-o", dest="output_file", help="same as --output-file")
    add_dataclass_args(parser, RunBatchOptions, "run-batch", "run_batch")
    add_dataclass_args(parser, MockOptions, "mock engine", "mock")
    add_engine_args(parser)


@dataclass
class _Line:
    """One input line on its way through the engine."""

    number: int
    custom_id: str
    kind: str
    answers: list = field(default_factory=list)  # render.Answer of each choice (`n`)
    meta: object = None  # render.Meta
    streams: list = field(default_factory=list)  # one per choice
    left: int = 0  # choices not finished yet


@dataclass
class _Output:
    """The append-only, fsynced output file and the input lines it already answers."""

    path: str
    done: dict = field(default_factory=dict)  # line number -> custom_id

    def open(self, resume: bool) -> None:
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            if not resume:
                raise ValueError(f"--output-file {self.path} exists: pass --resume to continue "
                                 "that run, or choose another file")
            self._load()
        self._f = open(self.path, "ab")

    def _load(self) -> None:
        with open(self.path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a line torn by a crash: cut it, it will run again
                log.warning("--output-file: dropping a torn last line (%d bytes)", len(data) - end)
                f.truncate(end)
        for k, raw in enumerate(data[:end].splitlines(), start=1):
            try:
                obj = json.loads(raw)
                number = int(str(obj["id"]).rsplit("_", 1)[1])
            except (ValueError, KeyError, IndexError, TypeError):
                raise ValueError(f"--output-file {self.path} line {k} is not a run-batch output "
                                 "line; refusing to resume into it") from None
            self.done[number] = obj.get("custom_id")

    def write(self, line: dict) -> None:
        self._f.write((json.dumps(line, ensure_ascii=False) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _error_line(number: int, custom_id, status: Optional[int], err: dict) -> dict:
    """A failed line: with `status`, OpenAI's error response; else a line-level error."""
    if status is None:
        return {"id": f"batch_req_{number}", "custom_id": custom_id, "response": None,
                "error": {"code": err.get("code") or "invalid_request", "message": err["message"]}}
    return {"id": f"batch_req_{number}", "custom_id": custom_id, "error": None,
            "response": {"status_code": status, "request_id": f"req_{number}",
                         "body": {"error": err}}}


def _read_lines(path: str) -> list[tuple[int, str]]:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    return [(n, s) for n, s in enumerate(text.splitlines(), start=1) if s.strip()]


def _check_line(number: int, text: str, seen: set) -> tuple[Optional[dict], Optional[dict]]:
    """(the request object, None) or (None, a line-level error line)."""
    from conserve_server.openai_api.schemas import ENDPOINTS

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, _error_line(number, None, None, {"code": "invalid_json", "message":
                                                      f"line {number} is not valid JSON: {e.msg}"})
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    problem = None
    if not isinstance(obj, dict):
        problem = "must be a JSON object"
    elif not isinstance(cid, str) or not cid:
        problem, cid = "custom_id must be a non-empty string", None
    elif cid in seen:
        problem = f"custom_id {cid!r} is used twice"
    elif obj.get("method") != "POST":
        problem = "method must be 'POST'"
    elif obj.get("url") not in ENDPOINTS:
        problem = f"url must be one of {sorted(ENDPOINTS)}"
    elif not isinstance(obj.get("body"), dict):
        problem = "body must be an object"
    if problem:
        return None, _error_line(number, cid, None, {"code": "invalid_request",
                                                     "message": f"line {number}: {problem}"})
    seen.add(cid)
    return obj, None


def run(args) -> int:
    from conserve_server.main import build_engine
    from conserve_server.openai_api import render
    from conserve_server.openai_api.samples import sample_requests
    from conserve_server.openai_api.errors import ApiError
    from conserve_server.openai_api.schemas import ENDPOINTS, parse_body, to_generation
    from conserve_jax.entrypoints.progress import RequestsBar

    if not args.input_file or not args.output_file:
        print("run-batch needs -i/--input-file and -o/--output-file", file=sys.stderr)
        return 2
    if args.max_in_flight is not None and args.max_in_flight < 1:
        print(f"--max-in-flight must be >= 1, got {args.max_in_flight}", file=sys.stderr)
        return 2
    try:
        lines = _read_lines(args.input_file)
    except OSError as e:
        print(f"cannot read --input-file: {e}", file=sys.stderr)
        return 2
    out = _Output(args.output_file)
    try:
        out.open(args.resume)
    except (ValueError, OSError) as e:
        print(str(e) if isinstance(e, ValueError) else f"cannot open --output-file: {e}",
              file=sys.stderr)
        return 2
    try:
        engine, config = build_engine(args)
    except (ImportError, ValueError, OSError) as e:
        out.close()
        print(f"cannot build the engine for --model {args.model}: {e}", file=sys.stderr)
        return 2
    model = args.served_model_name or config.model
    limit = args.max_in_flight or 2 * config.max_num_seqs
    ready: "queue.Queue[tuple[_Line, int]]" = queue.Queue()  # (line, choice) with output
    seen: set = set()
    pending, skipped = [], 0
    for number, text in lines:
        obj, err = _check_line(number, text, seen)
        if number in out.done:
            if obj is not None and out.done[number] not in (None, obj["custom_id"]):
                print(f"--resume: output line for input line {number} has custom_id "
                      f"{out.done[number]!r} but the input has {obj['custom_id']!r}: not the "
                      "same input file", file=sys.stderr)
                engine.shutdown()
                out.close()
                return 2
            skipped += 1
            continue
        pending.append((number, obj, err))
    counts = {"ok": 0, "errors": 0}
    verbose = logging.getLogger("conserve_jax").isEnabledFor(logging.INFO)
    if skipped:
        log.info("--resume: %d of %d lines already answered in %s", skipped, len(lines),
                 args.output_file)

    def finish(item: _Line) -> None:
        failed = [a for a in item.answers if a.finish_reason == "error"]
        if failed:
            out.write(_error_line(item.number, item.custom_id, 500, {
                "message": failed[0].error or "engine error", "type": "server_error",
                "param": None, "code": None}))
            counts["errors"] += 1
        else:
            out.write({"id": f"batch_req_{item.number}", "custom_id": item.custom_id,
                       "error": None, "response": {
                           "status_code": 200, "request_id": f"req_{item.number}",
                           "body": render.full_response(item.meta, engine.tokenizer,
                                                        item.answers)}})
            counts["ok"] += 1
        bar.done(item.answers[0].prompt_tokens, sum(a.completion_tokens for a in item.answers))

    def drain(block: bool) -> int:
        """Take the finished requests' outputs; returns how many engine requests finished."""
        n = 0
        while True:
            try:
                item, k = ready.get(block=block and n == 0, timeout=None)
            except queue.Empty:
                return n
            while True:
                try:
                    delta = item.streams[k].get(timeout=0)
                except queue.Empty:
                    break
                item.answers[k].add(delta)
                if delta.finished:
                    n += 1
                    item.left -= 1
                    if item.left == 0:
                        finish(item)
            block = False

    in_flight = 0
    bar = RequestsBar(len(lines), enabled=verbose, initial=skipped)
    try:
        for number, obj, err in pending:
            if err is not None:
                out.write(err)
                counts["errors"] += 1
                bar.done()
                continue
            kind = ENDPOINTS[obj["url"]]
            try:
                if obj["body"].get("stream"):
                    raise ApiError(400, "stream is not allowed in a batch", "stream",
                                   "invalid_value")
                parsed = parse_body(kind, obj["body"])
                if parsed.model != model:
                    raise ApiError(404, f"The model {parsed.model!r} does not exist; this run "
                                        f"serves {model!r}", "model", "model_not_found")
                gen = to_generation(parsed, engine, f"run-batch-{number}",
                                    request_class=RequestClass.OFFLINE)
                item = _Line(number, obj["custom_id"], kind,
                             [render.Answer() for _ in range(parsed.n)],
                             render.Meta(kind, render.new_id(kind), model, "flex",
                                         logprobs=parsed.logprobs, top_logprobs=parsed.top_logprobs))
                # all n at once: offline twins of one prompt wait for the first one's
                # prefill and reuse its cached blocks (the scheduler's prefix groups)
                for req in sample_requests(gen, parsed.n):
                    item.streams.append(engine.submit(req))
                item.left = parsed.n
            except ApiError as e:
                out.write(_error_line(number, obj["custom_id"], e.status, e.body()["error"]))
                counts["errors"] += 1
                bar.done()
                continue
            except ValueError as e:  # the engine's own checks
                out.write(_error_line(number, obj["custom_id"], 400, {
                    "message": str(e), "type": "invalid_request_error", "param": None,
                    "code": "invalid_value"}))
                counts["errors"] += 1
                bar.done()
                continue
            for k, stream in enumerate(item.streams):
                stream.set_listener(lambda item=item, k=k: ready.put((item, k)))
                if stream.done.is_set():  # finished before the listener was set
                    ready.put((item, k))
            in_flight += parsed.n
            while in_flight >= limit:
                in_flight -= drain(block=True)
        while in_flight > 0:
            in_flight -= drain(block=True)
    finally:
        bar.close()
        engine.shutdown()
        out.close()
    log.info("run-batch: %d lines: %d answered, %d errors, %d already in %s",
             len(lines), counts["ok"], counts["errors"], skipped, args.output_file)
    return 0
