"""`serve` answers on both faces by default (issue 29, item 1): gRPC :50051 and the
OpenAI-compatible HTTP API :8000; `--http-port 0` turns HTTP off, `--http-port free` picks a
free port (what tests use). The README's first serving example (its curl and grpcurl
bodies) works against a real server process on the mock model."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
from google.protobuf import json_format

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server import main as server_main
from conserve_server.config import server_config_from_args
from tests.conftest_server import REPO, wait_until


def _parse(*argv):
    p = argparse.ArgumentParser()
    server_main.add_arguments(p)
    return server_config_from_args(p.parse_args(list(argv)))


def test_http_is_on_at_8000_by_default_and_0_turns_it_off():
    assert _parse().http_port == 8000 and _parse().port == 50051
    for off in ("0", "none", "off"):
        assert _parse("--http-port", off).http_port is None
    assert _parse("--http-port", "free").http_port == 0  # bound to a free port at start
    assert _parse("--http-port", "8080").http_port == 8080


@pytest.mark.parametrize("bad", ["x", "70000", "-3"])
def test_bad_http_port_is_refused_naming_the_flag(bad):
    r = subprocess.run([sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve",
                        "--http-port", bad], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--http-port" in r.stderr and bad in r.stderr


def test_serve_help_says_both_faces_are_on():
    r = subprocess.run([sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--help"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    assert "gRPC on :50051 and the OpenAI-compatible HTTP API on :8000" in text
    assert "--http-port 0 turns HTTP off" in text
    assert "0 or none: HTTP off; free: a free port" in text and "(default 8000)" in text


def _spawn(tmp_path, *extra):
    """A `serve --model mock` process; returns (process, {'http': port, 'listening': port})."""
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--model", "mock",
           "--port", "0", "--data-dir", str(tmp_path / "data"), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    ports: dict = {}

    def read():
        for line in proc.stdout:
            name, _, addr = line.strip().partition(" on ")
            if addr:
                ports[name] = int(addr.rsplit(":", 1)[1])
    threading.Thread(target=read, daemon=True).start()
    assert wait_until(lambda: "listening" in ports or proc.poll() is not None, 60)
    assert "listening" in ports, "server did not start"
    return proc, ports


def _readme_example_bodies() -> tuple[dict, dict]:
    """The JSON bodies of the README's first curl and grpcurl commands."""
    text = open(f"{REPO}/README.md").read()
    quick = text[text.index("## Quickstart"):]
    assert re.search(r"```bash\nconserve-jax serve\n```", quick), "README's example is `serve`"
    curl = re.search(r"curl -s http://127\.0\.0\.1:8000/v1/chat/completions.*?-d '(.*?)'", quick, re.S)
    grpcurl = re.search(r"grpcurl -plaintext -d '(.*?)'.*?127\.0\.0\.1:50051 "
                        r"conserve\.v1\.CoServe/Generate", quick, re.S)
    assert curl and grpcurl
    return json.loads(curl.group(1)), json.loads(grpcurl.group(1))


def test_readme_example_answers_over_http_and_grpc(tmp_path):
    chat_body, grpc_body = _readme_example_bodies()
    proc, ports = _spawn(tmp_path, "--http-port", "free", "--served-model-name", "default")
    try:
        assert set(ports) == {"http", "listening"}
        req = urllib.request.Request(f"http://127.0.0.1:{ports['http']}/v1/chat/completions",
                                     data=json.dumps(chat_body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] <= chat_body["max_tokens"]
        request = json_format.ParseDict(grpc_body, pb.GenerateRequest())
        with grpc.insecure_channel(f"127.0.0.1:{ports['listening']}") as ch:
            generate = ch.unary_stream("/conserve.v1.CoServe/Generate",
                                       request_serializer=pb.GenerateRequest.SerializeToString,
                                       response_deserializer=pb.GenerateResponse.FromString)
            text = "".join(m.text for m in generate(request, timeout=30))
        assert text.startswith("The sky is blue because")  # the mock echoes the prompt
    finally:
        proc.terminate()
        proc.wait(30)


def test_http_port_0_serves_grpc_only(tmp_path):
    proc, ports = _spawn(tmp_path, "--http-port", "0")
    try:
        assert set(ports) == {"listening"}
    finally:
        proc.terminate()
        proc.wait(30)
