"""The OpenAI Batch API over the durable `BatchStore`: input-file checks, batch creation
(each line validated and tokenized exactly like an online request, then stored as a
conserve.v1 item whose request_id is the line's custom_id), the OpenAI batch object, and
the output/error files rendered from the stored results.

Status mapping (store -> OpenAI): queued/running -> in_progress; completed -> completed;
cancelled -> cancelling while items are still finishing, then cancelled; failed by the
completion deadline -> finalizing while items are still finishing, then expired;
otherwise failed. Result lines follow OpenAI's format:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`; items
cut by cancellation or expiry go to the error file with `response: null` and
`error.code` batch_cancelled / batch_expired. Functions here run on HTTP worker threads.
"""
from __future__ import annotations

import json
import re
import time
from typing import Optional

from conserve_jax.engine_api import RequestClass
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.deadlines import DEADLINE_ERROR
from conserve_server.batch.store import TERMINAL, BatchRow, BatchStore
from conserve_server.openai_api import render
from conserve_server.openai_api.errors import ApiError, bad_request, invalid_value
from conserve_server.openai_api.files import FileStore
from conserve_server.openai_api.schemas import ENDPOINTS, parse_body, to_generation

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(h|m|s|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(value) -> float:
    """`completion_window` ("24h", "30m", "90s", "1d") in seconds; ApiError 400 otherwise."""
    m = _WINDOW.match(value) if isinstance(value, str) else None
    if not m or float(m.group(1)) <= 0:
        raise invalid_value("completion_window",
                            f"completion_window must be a duration such as '24h' or '30m', got {value!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_jsonl(data: bytes, max_lines: int) -> list[dict]:
    """The request lines of a batch input file; ApiError 400 naming the line otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_value("file", "file must be UTF-8 JSONL") from None
    lines, seen = [], set()
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise invalid_value("file", f"file line {n} is not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise invalid_value("file", f"file line {n} must be a JSON object")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise invalid_value("file", f"file line {n}: custom_id must be a non-empty string")
        if cid in seen:
            raise invalid_value("file", f"file line {n}: custom_id {cid!r} is used twice")
        seen.add(cid)
        if obj.get("method") != "POST":
            raise invalid_value("file", f"file line {n}: method must be 'POST'")
        if not isinstance(obj.get("url"), str) or obj["url"] not in ENDPOINTS:
            raise invalid_value("file", f"file line {n}: url must be one of {sorted(ENDPOINTS)}")
        if not isinstance(obj.get("body"), dict):
            raise invalid_value("file", f"file line {n}: body must be an object")
        obj["_line"] = n
        lines.append(obj)
        if len(lines) > max_lines:
            raise invalid_value("file", f"file has more than {max_lines} requests")
    if not lines:
        raise invalid_value("file", "file holds no requests")
    return lines


def build_items(lines: list[dict], endpoint: str, engine, model_name: str,
                max_logprobs: int) -> list[tuple[pb.GenerateRequest, list[int]]]:
    """Validate and tokenize every line for `endpoint`; ApiError 400 naming the line."""
    kind = ENDPOINTS[endpoint]
    items = []
    for obj in lines:
        n = obj["_line"]
        where = f"input file line {n}: "
        if obj["url"] != endpoint:
            raise bad_request(f"{where}url {obj['url']!r} differs from the batch endpoint {endpoint!r}",
                              "input_file_id")
        body = obj["body"]
        if body.get("stream"):
            raise bad_request(f"{where}stream is not allowed in a batch", "input_file_id")
        try:
            parsed = parse_body(kind, body)
        except ApiError as e:
            raise ApiError(400, where + e.message, "input_file_id", e.code) from None
        if parsed.n != 1:  # a stored item is one engine request (conserve-jax run-batch takes n)
            raise bad_request(f"{where}n must be 1 in the Batch API, got {parsed.n}",
                              "input_file_id")
        if parsed.model != model_name:
            raise ApiError(400, f"{where}model {parsed.model!r} is not served here "
                                f"(this server serves {model_name!r})", "input_file_id", "model_not_found")
        gen = to_generation(parsed, engine, "-", max_logprobs=max_logprobs,
                            request_class=RequestClass.OFFLINE, prefix=where)
        parsed.proto.request_id = obj["custom_id"]
        items.append((parsed.proto, gen.prompt_token_ids))
    return items


def output_file_ids(batch_id: str) -> tuple[str, str]:
    return f"file-{batch_id}-output", f"file-{batch_id}-errors"


def batch_of_file(file_id: str) -> Optional[tuple[str, str]]:
    """(batch_id, "output" | "errors") for a rendered result file id, else None."""
    m = re.match(r"^file-(batch_[0-9a-f]+)-(output|errors)$", file_id)
    return (m.group(1), m.group(2)) if m else None


def _status(row: BatchRow) -> str:
    if row.state in ("queued", "running"):
        return "in_progress"
    if row.state == "cancelled":
        return "cancelled" if row.done >= row.total else "cancelling"
    if row.state == "failed":
        if row.done < row.total:  # stopped items are still being committed
            return "finalizing"
        return "expired" if row.error == DEADLINE_ERROR else "failed"
    return "completed"


def finished(row: BatchRow) -> bool:
    """Every item has its result: the output files are final."""
    return row.state in TERMINAL and row.done >= row.total


def batch_object(row: BatchRow, meta: Optional[dict], est=None) -> dict:
    """The OpenAI batch object, plus this server's deadline estimates (unix s, null when
    unknown): `estimated_completion_at` (current, `est`: a `slack.Estimate`, while the batch
    is in progress) and `estimated_completion_at_submit`."""
    meta = meta or {}
    status = _status(row)
    ok = row.done - row.failed - row.cancelled
    out_id = err_id = None
    if finished(row):
        o, e = output_file_ids(row.id)
        out_id = o if ok else None
        err_id = e if row.failed + row.cancelled else None
    ts = lambda t: int(t) if t is not None else None  # noqa: E731
    end = ts(row.finished_at)
    errors = None
    if row.state == "failed" and status == "failed":
        errors = {"object": "list", "data": [{"code": "batch_failed", "message": row.error,
                                              "param": None, "line": None}]}
    return {
        "id": row.id, "object": "batch", "endpoint": meta.get("endpoint", "/v1/completions"),
        "errors": errors, "input_file_id": meta.get("input_file_id", ""),
        "completion_window": meta.get("completion_window", ""), "status": status,
        "output_file_id": out_id, "error_file_id": err_id, "created_at": int(row.created_at),
        "in_progress_at": ts(row.started_at), "expires_at": ts(row.deadline),
        "finalizing_at": end if finished(row) else None,
        "completed_at": end if status == "completed" else None,
        "failed_at": end if status == "failed" else None,
        "expired_at": end if status == "expired" else None,
        "cancelling_at": end if row.state == "cancelled" else None,
        "cancelled_at": end if status == "cancelled" else None,
        "request_counts": {"total": row.total, "completed": ok,
                           "failed": row.failed + row.cancelled},
        "metadata": meta.get("metadata"),
        "estimated_completion_at_submit": ts(row.estimate_at),
        "estimated_completion_at": (ts(est.finish_at) if est is not None and status == "in_progress"
                                    else None),
    }


def _line(batch_id: str, r: pb.BatchResult, kind: str, model: str, tokenizer,
          created: int) -> tuple[str, dict]:
    """("output" | "errors", the result line) for one stored result."""
    line = {"id": f"batch_req_{batch_id[6:]}_{r.index}", "custom_id": r.request_id,
            "response": None, "error": None}
    request_id = f"req_{batch_id[6:]}_{r.index}"
    if r.finish_reason == pb.FINISH_REASON_CANCELLED:
        line["error"] = {"code": "batch_cancelled", "message": r.error or "the batch was cancelled"}
        return "errors", line
    if r.finish_reason == pb.FINISH_REASON_ERROR:
        if r.error == DEADLINE_ERROR:
            line["error"] = {"code": "batch_expired", "message":
                             "the request could not be executed before the completion window expired"}
        else:
            line["response"] = {"status_code": 500, "request_id": request_id, "body": {"error": {
                "message": r.error or "engine error", "type": "server_error", "param": None,
                "code": None}}}
        return "errors", line
    ans = render.Answer.from_result(r)
    meta = render.Meta(kind, render.new_id(kind), model, "flex", logprobs=bool(ans.logprobs),
                       top_logprobs=1 << 20, created=created)
    line["response"] = {"status_code": 200, "request_id": request_id,
                        "body": render.full_response(meta, tokenizer, ans)}
    return "output", line


def render_files(store: BatchStore, row: BatchRow, meta: Optional[dict], model: str,
                 tokenizer) -> dict[str, bytes]:
    """{"output": bytes, "errors": bytes}: the result files of a finished batch, one JSONL
    line per item in input order."""
    kind = ENDPOINTS.get((meta or {}).get("endpoint"), "completion")
    created = int(row.finished_at or time.time())
    parts: dict[str, list[str]] = {"output": [], "errors": []}
    nxt = 0
    while nxt < row.total:
        got = store.results(row.id, nxt)
        if not got:
            break
        for idx, blob in got:
            which, line = _line(row.id, pb.BatchResult.FromString(blob), kind, model, tokenizer, created)
            parts[which].append(json.dumps(line))
            nxt = idx + 1
    return {k: "".join(s + "\n" for s in v).encode() for k, v in parts.items()}


def result_file(files: FileStore, store: BatchStore, row: BatchRow, which: str, model: str,
                tokenizer) -> bytes:
    """A finished batch's output or error file; rendered once, then kept in `files`."""
    file_id = output_file_ids(row.id)[0 if which == "output" else 1]
    if files.get(file_id) is not None:
        return files.content(file_id)
    rendered = render_files(store, row, files.get_doc(row.id), model, tokenizer)
    for name, data in rendered.items():
        fid = output_file_ids(row.id)[0 if name == "output" else 1]
        files.create(row.tenant, f"{row.id}_{name}.jsonl", "batch_output", data, file_id=fid)
    return rendered[which]
