"""Smoke test of `conserve-jax loadtest` against a live server: starts
`python -m conserve_jax.entrypoints.cli serve --model mock --port 0 --data-dir TMP` as a subprocess, replays
a dozen lines of the real trace for ~6 s with a small offline batch next to it, through the
real gRPC client, and checks the JSON report. Both processes are stopped by the test."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = os.path.join(REPO, "data", "traces", "azure_llm_2023_conv.csv")


@pytest.fixture
def live_server(tmp_path):
    """(target, process) of a mock-model server on a free loopback port."""
    err = open(tmp_path / "server.err", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--model", "mock", "--port", "0",
         "--http-port", "0", "--data-dir", str(tmp_path / "data"), "--mock-token-delay", "0.005"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    found = []

    def read():
        for line in proc.stdout:
            if line.startswith("listening on ") and not found:
                found.append(line.split("listening on ", 1)[1].strip())

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 30
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        if not found:
            pytest.fail(f"server did not start: {(tmp_path / 'server.err').read_text()}")
        yield found[0], proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err.close()


def test_loadtest_against_live_server(tmp_path, live_server):
    target, server = live_server
    trace = tmp_path / "trace.csv"
    with open(TRACE) as f:
        lines = f.readlines()
    lines = lines[:1] + lines[3001:3013]  # header + 12 rows, ~2.5 s of arrivals
    trace.write_text("".join(lines))
    out_json, out_png = tmp_path / "report.json", tmp_path / "report.png"
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "loadtest", "--target", target,
           "--trace", str(trace), "--token-scale", "0.05", "--max-context", "256",
           "--duration", "6", "--grace", "10", "--offline-requests", "6",
           "--offline-input-len", "16", "--offline-output-len", "16",
           "--slo-ttft", "2", "--slo-tpot", "0.5", "--json", str(out_json),
           "--plot", str(out_png), "--no-progress"]
    t0 = time.monotonic()
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - t0 > 5.5  # the requested window was kept
    assert server.poll() is None
    assert "TTFT" in run.stdout and "offline tokens/s" in run.stdout

    d = json.loads(out_json.read_text())
    on, off = d["online"], d["offline"]
    assert on["issued"] == 12 and on["completed"] == 12 and on["failed"] == 0, on["errors_by_code"]
    assert on["output_len_mismatches"] == 0  # ignore_eos + max_tokens honoured end to end
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert on[key]["count"] > 0 and 0 < on[key]["p50"] <= on[key]["p99"]
    assert on["ttft_s"]["p99"] < 2.0 and on["slo"]["attainment"] == 1.0
    assert on["output_tokens_per_s"] > 0 and 5.5 < d["duration_s"] < 17
    assert off["requests"] == 6 and off["submit_errors"] == {}
    assert off["completed_at_window_end"] == 6 and off["results_collected"] == 6
    assert off["output_tokens"] == 96 and off["tokens_per_s"] > 0
    assert isinstance(d["server"]["preemptions"], int)
    assert d["server"]["stats_delta"]["offline_tokens_total"] >= 96
    assert out_png.read_bytes()[:4] == b"\x89PNG"
