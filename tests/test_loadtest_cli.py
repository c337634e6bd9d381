"""`conserve-jax loadtest` end to end against the in-process `FakeClient` (injected through
`run(args, client_factory=...)`), plus the runner's bounds."""
import argparse
import itertools
import json
import os
import time

import pytest

from conserve_jax.entrypoints.cli import main as cli_main
from conserve_jax.loadtest import cli
from conserve_jax.loadtest.adapter import ClientAdapter
from conserve_jax.loadtest.fake import FakeClient
from conserve_jax.loadtest.run_config import RunConfig
from conserve_jax.loadtest.runner import Runner
from conserve_jax.loadtest.trace import RequestSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = os.path.join(REPO, "data", "traces", "azure_llm_2023_conv.csv")


def parse(*argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(["--target", "fake:1", "--no-progress", *argv])


def factory(made, **kw):
    def make(target, token, tls_ca):
        c = FakeClient(target, token, tls_ca, **kw)
        made.append(c)
        return c
    return make


@pytest.fixture
def trace_file(tmp_path):
    """20 rows of the real trace from 10 minutes in (about 4 s of arrivals)."""
    path = tmp_path / "trace.csv"
    with open(TRACE) as f:
        header = next(f)
        rows = list(itertools.islice(f, 3000, 3020))
    path.write_text(header + "".join(rows))
    return str(path)


def test_trace_replay_with_offline_batches(tmp_path, trace_file, capsys):
    made = []
    token_file = tmp_path / "tok"
    token_file.write_text("\n  secret-1 \nsecret-2\n")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    args = parse("--trace", trace_file, "--rate-scale", "2", "--token-scale", "0.05",
                 "--max-context", "256", "--duration", "3", "--grace", "2",
                 "--offline-requests", "30", "--offline-batches", "3",
                 "--offline-input-len", "20", "--offline-output-len", "8",
                 "--slo-ttft", "0.5", "--slo-tpot", "0.05", "--token-file", str(token_file),
                 "--json", str(out_json), "--plot", str(out_png))
    t0 = time.monotonic()
    rc = cli.run(args, client_factory=factory(made, ttft_s=0.03, itl_s=0.002, chunk_size=3,
                                              offline_item_s=0.02))
    elapsed = time.monotonic() - t0
    assert rc == 0 and elapsed > 2.9  # the window is 3 s (no upper bound: wall-clock under load)
    fake = made[0]
    assert fake.token == "secret-1" and fake.target == "fake:1" and fake.closed
    d = json.loads(out_json.read_text())
    on, off = d["online"], d["offline"]
    assert on["issued"] == on["completed"] == len(fake.calls) > 0 and on["failed"] == 0
    assert on["output_len_mismatches"] == 0
    assert on["slo"]["ttft_s"] == 0.5
    assert on["slo"]["attainment"] == pytest.approx(on["slo"]["met"] / on["issued"])
    # lower bounds only: the fake sleeps at least this long; upper bounds depend on load
    assert on["ttft_s"]["p50"] >= 0.03 and on["itl_s"]["mean"] > 0.001
    assert on["request_throughput"] == pytest.approx(on["completed"] / d["duration_s"])
    for call in fake.calls:  # forced lengths, objectives and a bounded deadline sent
        assert call["ignore_eos"] is True and call["ttft"] == 0.5 and call["tpot"] == 0.05
        assert len(call["token_ids"]) + call["max_tokens"] <= 256
        assert 0 < call["timeout"] <= 6.0
    assert off["requests"] == 30 and len(off["batches"]) == 3
    assert off["completed_at_window_end"] == 30 and off["results_collected"] == 30
    assert off["output_tokens"] == 240 and off["tokens_source"] == "results"
    assert off["tokens_per_s"] == pytest.approx(240 / d["duration_s"])
    assert off["all_finished_at_s"] is not None and off["cancelled_batches"] == []
    assert d["server"]["preemptions"] >= 0
    assert d["config"]["trace"] == trace_file and "token" not in d["config"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "offline tokens/s" in printed


def test_synthetic_errors_by_code_and_offline_cancel(tmp_path, capsys):
    made = []
    out_json = tmp_path / "r.json"
    args = parse("--rate", "40", "--burstiness", "0.5", "--input-len", "50", "--output-len",
                 "10", "--range-ratio", "0.5", "--duration", "1.5", "--grace", "1",
                 "--max-context", "100", "--offline-requests", "1000", "--offline-input-len",
                 "20", "--offline-output-len", "64", "--json", str(out_json))
    rc = cli.run(args, client_factory=factory(made, ttft_s=0.01, itl_s=0.002, fail_every=5,
                                              offline_item_s=0.01, max_context=55))
    assert rc == 0
    d = json.loads(out_json.read_text())
    on = d["online"]
    assert on["issued"] > 20 and on["failed"] > 0
    # prompts over the fake's context of 55 are refused; of the rest, every 5th call fails
    assert set(on["errors_by_code"]) == {"UNAVAILABLE", "INVALID_ARGUMENT"}
    assert sum(on["errors_by_code"].values()) == on["failed"]
    assert on["slo"]["attainment"] == pytest.approx(on["slo"]["met"] / on["issued"])
    off = d["offline"]
    assert off["cancelled_batches"] == ["batch-1"] and off["all_finished_at_s"] is None
    assert 0 < off["completed_at_window_end"] < 1000
    assert off["output_tokens"] == 64 * off["results_collected"]
    # the fake counts one per request started while the batch runs; which requests those
    # are depends on thread timing, so compare with the fake's own per-call record
    during = sum(c["during_batch"] for c in made[0].calls)
    assert d["server"]["preemptions"] == during and 0 < during <= on["issued"]


def test_window_is_bounded_and_stragglers_are_incomplete():
    fake = FakeClient(ttft_s=0.05, itl_s=0.5)  # 20 tokens would take 10 s
    workload = [RequestSpec(0.0, 10, 20), RequestSpec(0.1, 10, 1)]
    result = Runner(ClientAdapter(fake), workload,
                    RunConfig(duration_s=0.5, grace_s=0.5, progress=False)).run()
    assert result.duration_s >= 0.99  # window + grace; the 10 s request did not hold it up
    by_index = {r.index: r for r in result.records}
    assert by_index[0].error == "INCOMPLETE" and by_index[1].ok
    assert fake.calls[0]["timeout"] == pytest.approx(2.0, abs=0.1)  # bound + 1 s backstop


def test_issuing_stops_at_duration_and_concurrency_limit():
    fake = FakeClient(ttft_s=0.2, itl_s=0.0)
    workload = [RequestSpec(0.01 * i, 5, 1) for i in range(100)]
    result = Runner(ClientAdapter(fake), workload,
                    RunConfig(duration_s=0.6, grace_s=1.0, max_concurrency=2,
                              progress=False)).run()
    # two at a time, at least 0.2 s each: at most 8 fit before issuing stops at 0.6 s (how
    # many fewer depends on machine load)
    assert 2 <= len(result.records) <= 8 and result.not_issued == 100 - len(result.records)
    assert all(r.ok for r in result.records)
    assert max(r.sent_s - r.scheduled_s for r in result.records) > 0.1  # held back


def test_progress_bar_on_stderr(capsys):
    fake = FakeClient(ttft_s=0.01, itl_s=0.0)
    Runner(ClientAdapter(fake), [RequestSpec(0.0, 5, 2)],
           RunConfig(duration_s=0.6, grace_s=0.5, progress=True)).run()
    err = capsys.readouterr().err
    assert "loadtest" in err and "1/1" in err and "sent=1" in err and "failed=0" in err


@pytest.mark.parametrize("argv", [
    (),                                                  # nothing to do
    ("--rate", "5"),                                     # no count or duration
    ("--trace", "x.csv", "--rate", "5"),                 # both workloads
    ("--offline-requests", "5"),                         # offline only, no duration
    ("--rate", "5", "--duration", "1", "--token", "a", "--token-file", "b"),
    ("--trace", "/nonexistent/trace.csv"),
])
def test_bad_options_exit_2(argv, capsys):
    made = []
    assert cli.run(parse(*argv), client_factory=factory(made)) == 2
    assert made == [] and "loadtest:" in capsys.readouterr().err


def test_unreachable_server_exits_1(capsys):
    made = []
    args = parse("--rate", "inf", "--num-requests", "3", "--input-len", "5", "--output-len", "2")
    assert cli.run(args, client_factory=factory(made, fail_every=1)) == 1
    assert "UNAVAILABLE=3" in capsys.readouterr().out


def test_dispatcher_knows_loadtest(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["loadtest", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--trace-window", "--rate-scale", "--token-scale", "--burstiness",
                "--offline-requests", "--slo-ttft", "--json", "--plot", "--no-progress"):
        assert opt in out
