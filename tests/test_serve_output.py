"""What `serve` prints at the default log level (issue 29, items 2 and 3): the start-up
stages on stderr (weights with bytes and seconds, compiling shapes with a progress bar,
the latency model profiled or cached, one ready line with the addresses), nothing of that on
stdout, quiet with `--log-level warning`; README's quickstart (serve, then its curl and
grpcurl calls) with a fresh HOME; and the periodic stats line while busy. Real server
processes: the tiny random model for start-up, the mock engine for stats."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
    ProtoReflectionDescriptorDatabase

from conserve_jax.client import Client
from conserve_jax.engine_api import EngineStats
from conserve_server.stats_log import StatsLog, stats_line
from tests.conftest_server import REPO, wait_until

TINY = ("--model", "random:tiny", "--max-model-len", "128", "--max-num-seqs", "2",
        "--max-prefill-tokens", "64", "--block-size", "4", "--num-blocks", "128")


class _Proc:
    """A `serve` process whose stdout and stderr are collected as they arrive."""

    def __init__(self, cmd, env=None) -> None:
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for pipe, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(pipe, sink), daemon=True).start()

    @staticmethod
    def _pump(pipe, sink) -> None:
        while True:
            chunk = pipe.read(1)  # unbuffered enough for \r-drawn progress bars
            if not chunk:
                return
            sink.append(chunk)

    def stdout(self) -> str:
        return "".join(self.out)

    def stderr(self) -> str:
        return "".join(self.err)

    def port(self) -> int:
        m = re.search(r"^listening on .*:(\d+)$", self.stdout(), re.M)
        return int(m.group(1)) if m else 0

    def wait_listening(self, timeout: float) -> int:
        assert wait_until(lambda: self.port() or self.proc.poll() is not None, timeout, 0.1), \
            "server did not start in time"
        assert self.port(), f"server exited: {self.stderr()[-3000:]}"
        return self.port()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _serve(tmp_path, *args, home=None, log_level=None):
    env = {**os.environ, "HOME": str(home or tmp_path)}
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli"]
    if log_level:
        cmd += ["--log-level", log_level]
    cmd += ["serve", "--port", "0", "--data-dir", str(tmp_path / "data"), *args]
    return _Proc(cmd, env)


def _up_then_stop(s: _Proc, while_up=None) -> _Proc:
    """Wait for `s` to listen and log its ready line, run `while_up(s)`, stop it."""
    try:
        s.wait_listening(600)
        assert wait_until(lambda: "ready in" in s.stderr(), 10)
        if while_up is not None:
            while_up(s)
    finally:
        s.stop()
    return s


def _readme_calls(s: _Proc) -> None:
    """README's quickstart against `s`: its curl chat completion (same path and body) on
    the HTTP port, and its grpcurl call done as grpcurl does it (the method found through
    the server's reflection, the request built from README's JSON)."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert "conserve-jax serve\n" in readme  # the example: serve on the default ports
    curl = re.search(r"curl -s http://127\.0\.0\.1:8000(/v1/chat/completions).*?-d '(.*?)'",
                     readme, re.S)
    http = int(re.search(r"^http on .*:(\d+)$", s.stdout(), re.M).group(1))
    req = urllib.request.Request(f"http://127.0.0.1:{http}{curl.group(1)}",
                                 data=curl.group(2).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        body = json.loads(r.read())
    assert body["object"] == "chat.completion" and body["model"] == "default"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert 0 < body["usage"]["completion_tokens"] <= 32

    grpcurl = re.search(r"grpcurl -plaintext -d '(.*?)'\s*\\\s*127\.0\.0\.1:50051 "
                        r"([\w.]+)/(\w+)", readme, re.S)
    service, method = grpcurl.group(2), grpcurl.group(3)
    with grpc.insecure_channel(f"127.0.0.1:{s.port()}") as ch:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        m = pool.FindServiceByName(service).FindMethodByName(method)
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        call = ch.unary_stream(f"/{service}/{method}", req_cls.SerializeToString,
                               resp_cls.FromString)
        replies = [json_format.MessageToDict(r) for r in call(
            json_format.Parse(grpcurl.group(1), req_cls()), timeout=120)]
    assert replies and replies[-1].get("finished"), replies
    assert 0 < sum(len(r.get("tokenIds", [])) for r in replies) <= 32


STAGES = ["loading weights: random:tiny", "loaded weights: random:tiny", "compiling shapes",
          "latency model", "ready in"]


def test_start_up_stages_show_on_stderr_then_quiet_with_log_level_warning(tmp_path):
    home = tmp_path / "home"
    xla = ("--compilation-cache-dir", str(tmp_path / "xla"))
    # README's serve example with its default ports replaced by free ones; its curl and
    # grpcurl calls answered while it is up
    s = _up_then_stop(_serve(tmp_path / "a", *TINY, *xla, "--http-port", "free",
                             "--served-model-name", "default", home=home), _readme_calls)
    err, out = s.stderr(), s.stdout()
    for stage in STAGES:
        assert stage in err, stage
        assert stage not in out, stage  # stdout keeps only the machine-readable lines
    assert re.search(r"loaded weights: random:tiny .*, [\d.]+ (MB|GB) in [\d.]+ s", err)
    # the compile bar: a count out of the total with an ETA, drawn on stderr
    bars = re.findall(r"compiling shapes:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[\d:]+<[\d:?]+", err)
    assert bars and bars[-1][0] == bars[-1][1], err[-2000:]
    assert re.search(r"compiled \d+ shapes and the sampler in [\d.]+ s \(persistent cache: "
                     r"\d+ hits, \d+ compiled\)", err)
    # a fresh HOME: the latency model is profiled, with its own bar
    assert "latency model: not cached" in err and "profiling latency model" in err
    assert re.search(r"latency model: profiled \d+ points in [\d.]+ s", err)
    ready = re.search(r"ready in [\d.]+ s: gRPC on 127\.0\.0\.1:(\d+), OpenAI-compatible HTTP "
                      r"on http://127\.0\.0\.1:(\d+)/v1", err)
    assert ready and int(ready.group(1)) == s.port()
    assert f"http on 127.0.0.1:{ready.group(2)}" in out

    # the second start finds the latency model (and compiled executables) cached
    s = _up_then_stop(_serve(tmp_path / "b", *TINY, *xla, "--http-port", "0", home=home))
    err = s.stderr()
    assert "latency model: loaded" in err and "profiling latency model" not in err
    hits = re.search(r"persistent cache: (\d+) hits", err)
    assert hits and int(hits.group(1)) > 0

    # --log-level warning: none of it (no lines, no bars)
    s = _serve(tmp_path / "c", *TINY, *xla, "--http-port", "0", home=home,
               log_level="warning")
    try:
        s.wait_listening(600)
        time.sleep(0.5)
    finally:
        s.stop()
    err = s.stderr()
    for stage in STAGES + ["%|", "stats"]:
        assert stage not in err, (stage, err[-2000:])


# ---- the stats line -------------------------------------------------------------------
def test_stats_line_reports_the_interval_from_cumulative_counters():
    prev = EngineStats(online_prefill_tokens_total=100, offline_prefill_tokens_total=1000,
                       online_tokens_total=10, offline_tokens_total=50, preemptions=2,
                       kv_blocks_total=200)
    cur = EngineStats(online_running=2, online_waiting=1, offline_running=6,
                      offline_waiting=40, online_prefill_tokens_total=300,
                      offline_prefill_tokens_total=1800, online_tokens_total=30,
                      offline_tokens_total=90, preemptions=5, kv_blocks_total=200,
                      kv_blocks_online=30, kv_blocks_offline=52)
    line = stats_line(prev, cur, 2.0)
    assert line == ("online: 2 running, 1 waiting; offline: 6 running, 40 waiting; "
                    "prompt 500.0 tok/s, generation 30.0 tok/s; KV 41.0%; preemptions 3; "
                    "offline harvested 420.0 tok/s (1890 total)")


def test_stats_interval_must_be_positive():
    try:
        StatsLog(EngineStats, 0)
    except ValueError as e:
        assert "stats_interval" in str(e)
    else:
        raise AssertionError("interval 0 accepted")


def test_serve_logs_stats_while_busy_and_not_when_idle(tmp_path):
    s = _serve(tmp_path, "--model", "mock", "--mock-token-delay", "0.01", "--http-port", "0",
               "--stats-interval", "0.2")
    try:
        port = s.wait_listening(60)
        time.sleep(0.6)
        assert "online:" not in s.stderr()  # idle since start: no stats lines
        with Client(f"127.0.0.1:{port}") as c:
            streams = [c.generate("busy busy", max_tokens=60) for _ in range(3)]
            texts = ["".join(ch.text for ch in st) for st in streams]
        assert all(len(t) == 60 for t in texts)
        lines = lambda: re.findall(r"conserve_server\.stats: (online: .*)", s.stderr())  # noqa: E731
        assert wait_until(lambda: len(lines()) >= 2, 5)
        busy = [ln for ln in lines() if re.search(r"generation [1-9][\d.]* tok/s", ln)]
        assert busy, lines()
        assert re.search(r"online: \d+ running, \d+ waiting; offline: 0 running, 0 waiting; "
                         r"prompt [\d.]+ tok/s, generation [\d.]+ tok/s; KV [\d.]+%; "
                         r"preemptions \d+; offline harvested 0\.0 tok/s \(0 total\)", busy[0])
        time.sleep(0.6)  # the interval that saw the last tokens may still log once
        n = len(lines())
        time.sleep(1.0)
        assert len(lines()) == n  # idle again: silent
    finally:
        s.stop()


def test_negative_stats_interval_is_refused_naming_the_flag(tmp_path):
    r = subprocess.run([sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve",
                        "--model", "mock", "--port", "0", "--http-port", "0", "--data-dir",
                        str(tmp_path / "d"), "--stats-interval", "-1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--stats-interval" in r.stderr
