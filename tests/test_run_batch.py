"""`conserve-jax run-batch` (issue 29, item 4): an OpenAI batch input file through a local
engine (the mock engine here: real processes), output in OpenAI's batch output format
parsed by the `openai` package's types, errors per line without stopping, and `--resume`
after a kill -9 with every line exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject

from tests.conftest_server import REPO, echo_text, wait_until

N, BAD = 50, {7, 20, 33}
TWO = 4  # this completions line asks for n = 2 choices


def _input(path, n=N, bad=BAD, max_tokens=8):
    """n request lines, alternating chat and completions; the `bad` lines are broken in
    three ways: not JSON, an unknown url, a body field out of range."""
    lines = []
    for i in range(n):
        if i in bad:
            k = sorted(bad).index(i)
            lines.append(["{not json", json.dumps({"custom_id": f"r{i}", "method": "POST",
                                                   "url": "/v1/embeddings", "body": {}}),
                          json.dumps({"custom_id": f"r{i}", "method": "POST",
                                      "url": "/v1/completions",
                                      "body": {"model": "mock", "prompt": "x",
                                               "temperature": 5}})][k % 3])
        elif i % 2:
            lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                     "url": "/v1/chat/completions",
                                     "body": {"model": "mock", "max_tokens": max_tokens,
                                              "messages": [{"role": "user",
                                                            "content": f"q{i}"}]}}))
        else:
            lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                     "url": "/v1/completions",
                                     "body": {"model": "mock", "prompt": f"prompt {i} ",
                                              "max_tokens": max_tokens,
                                              **({"n": 2} if i == TWO else {})}}))
    path.write_text("\n".join(lines) + "\n")


def _cmd(inp, out, *extra):
    return [sys.executable, "-m", "conserve_jax.entrypoints.cli", "run-batch", "-i", str(inp),
            "-o", str(out), "--model", "mock", *extra]


def _check_output(out_path, n=N, bad=BAD, max_tokens=8):
    rows = [json.loads(s) for s in out_path.read_text().splitlines()]
    assert len(rows) == n
    by_line = {int(r["id"].rsplit("_", 1)[1]): r for r in rows}
    assert sorted(by_line) == list(range(1, n + 1))  # every line exactly once
    for i in range(n):
        r = by_line[i + 1]
        if i in bad:
            continue
        assert r["custom_id"] == f"r{i}" and r["error"] is None
        resp = r["response"]
        assert resp["status_code"] == 200 and resp["request_id"]
        if i % 2:
            c = ChatCompletion.model_validate(resp["body"])
            assert c.choices[0].message.content and c.usage.completion_tokens <= max_tokens
        else:
            c = Completion.model_validate(resp["body"])
            choices = 2 if i == TWO else 1
            assert [ch.index for ch in c.choices] == list(range(choices))
            assert all(ch.text == echo_text(f"prompt {i} ", max_tokens) for ch in c.choices)
            assert c.usage.completion_tokens == choices * max_tokens
            assert c.usage.prompt_tokens == len(f"prompt {i} ")
    errors = [by_line[i + 1] for i in sorted(bad)]
    assert errors[0]["response"] is None and errors[0]["error"]["code"] == "invalid_json"
    assert errors[0]["custom_id"] is None
    assert errors[1]["response"] is None and "url" in errors[1]["error"]["message"]
    assert errors[1]["custom_id"] == "r20"
    e = ErrorObject.model_validate(errors[2]["response"]["body"]["error"])
    assert errors[2]["response"]["status_code"] == 400 and e.param == "temperature"
    return rows


def test_fifty_lines_three_bad(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _input(inp)
    r = subprocess.run(_cmd(inp, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = _check_output(out)
    assert sum(1 for x in rows if x["error"] is None
               and x["response"]["status_code"] == 200) == N - len(BAD)
    assert "Processed prompts" in r.stderr and f"{N}/{N}" in r.stderr  # the progress bar
    assert "47 answered, 3 errors" in r.stderr
    assert r.stdout == ""


def test_existing_output_needs_resume(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _input(inp, n=3, bad=set())
    out.write_text('{"id": "batch_req_1", "custom_id": "r0"}\n')
    r = subprocess.run(_cmd(inp, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--resume" in r.stderr and "--output-file" in r.stderr


def test_killed_half_way_and_resumed_answers_every_line_once(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _input(inp, max_tokens=20)
    # slow enough to be killed part-way: 20 tokens x 20 ms per request, 4 at a time
    slow = ("--mock-token-delay", "0.02", "--max-in-flight", "4")
    proc = subprocess.Popen(_cmd(inp, out, *slow), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    lines = lambda: out.read_text().count("\n") if out.exists() else 0  # noqa: E731
    assert wait_until(lambda: lines() >= 15 or proc.poll() is not None, 120, 0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    before = out.read_bytes()
    done_before = before.count(b"\n")
    assert 15 <= done_before < N, done_before
    with open(out, "ab") as f:  # a line torn by the crash: cut off and run again
        f.write(b'{"id": "batch_req_')
    r = subprocess.run(_cmd(inp, out, "--resume"), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    after = out.read_bytes()
    assert after.startswith(before)  # append-only: earlier lines untouched
    _check_output(out, max_tokens=20)
    assert f"--resume: {done_before} of {N} lines already answered" in r.stderr
    assert "dropping a torn last line" in r.stderr
    # a second resume finds everything done and runs nothing
    r = subprocess.run(_cmd(inp, out, "--resume"), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and out.read_bytes() == after
    assert f"0 answered, 0 errors, {N} already in" in r.stderr, r.stderr[-500:]
