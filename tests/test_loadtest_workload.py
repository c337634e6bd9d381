"""Load tester workloads: Azure trace reading/windowing/scaling, gamma arrivals, prompts."""
import itertools
import os

import numpy as np
import pytest

from conserve_jax.loadtest.arrivals import gamma_arrivals, sample_lengths, synthetic_workload
from conserve_jax.loadtest.prompts import OFFLINE, ONLINE, prompt_token_ids
from conserve_jax.loadtest.trace import (RequestSpec, clamp_to_context, load_trace,
                                         read_azure_trace, scale_rate, scale_tokens, window)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = os.path.join(REPO, "data", "traces", "azure_llm_2023_conv.csv")


@pytest.fixture
def real_head(tmp_path):
    """The header and first 11 data rows of the real trace, as a small file."""
    path = tmp_path / "head.csv"
    with open(TRACE) as f:
        path.write_text("".join(itertools.islice(f, 12)))
    return str(path)


def test_real_trace_head(real_head):
    specs = read_azure_trace(real_head)
    assert len(specs) == 11
    # first rows of the published trace: 18:15:46.6805900 374/44, 18:15:50.9951690 396/109
    assert specs[0] == RequestSpec(0.0, 374, 44)
    assert specs[1].arrival_s == pytest.approx(50.9951690 - 46.6805900, abs=1e-9)
    assert (specs[1].input_len, specs[1].output_len) == (396, 109)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(specs, specs[1:]))


def test_real_trace_limit_and_whole_file():
    assert len(read_azure_trace(TRACE, limit=5)) == 5
    specs = read_azure_trace(TRACE)
    assert len(specs) == 19366  # every data row (the README rounds to 19,365)
    assert 3400 < specs[-1].arrival_s < 3600  # about one hour


def _write(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_small_csv_numeric_times_unsorted_and_zero_tokens(tmp_path):
    path = _write(tmp_path, "timestamp,generatedtokens,contexttokens\n"  # other column order
                  "12.5,10,100\n10,0,50\n\n11,3,0\n")
    specs = read_azure_trace(path)
    assert specs == [RequestSpec(0.0, 50, 1), RequestSpec(1.0, 1, 3), RequestSpec(2.5, 100, 10)]


def test_bad_csv_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="header"):
        read_azure_trace(_write(tmp_path, "a,b,c\n1,2,3\n"))
    with pytest.raises(ValueError, match=":3"):
        read_azure_trace(_write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                "1,2,3\nnot-a-time,2,3\n", "bad.csv"))


def test_window_and_rate_scale():
    specs = [RequestSpec(float(t), 10, 5) for t in range(10)]
    w = window(specs, 2.0, 3.0)
    assert [s.arrival_s for s in w] == [0.0, 1.0, 2.0]
    assert len(window(specs, 8.0)) == 2
    fast = scale_rate(w, 2.0)
    assert [s.arrival_s for s in fast] == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        scale_rate(w, 0)


def test_token_scale_and_clamp():
    specs = [RequestSpec(0.0, 800, 80), RequestSpec(1.0, 4, 3), RequestSpec(2.0, 3000, 1000)]
    out = scale_tokens(specs, 0.125, max_context=256)
    assert (out[0].input_len, out[0].output_len) == (100, 10)
    assert (out[1].input_len, out[1].output_len) == (1, 1)  # rounded, at least 1 each
    assert out[2].input_len + out[2].output_len <= 256
    assert out[2].input_len == pytest.approx(3 * out[2].output_len, rel=0.05)  # ratio kept
    for n_in, n_out, ctx in [(5000, 1, 100), (1, 5000, 100), (7, 9, 2), (60, 60, 101)]:
        a, b = clamp_to_context(n_in, n_out, ctx)
        assert a >= 1 and b >= 1 and a + b <= ctx


def test_load_trace_pipeline(real_head):
    specs = load_trace(real_head, start_s=4.0, window_s=2.0, rate_scale=2.0, token_scale=0.5,
                       max_context=300)
    raw = window(read_azure_trace(real_head), 4.0, 2.0)
    assert len(specs) == len(raw) > 0
    for s, r in zip(specs, raw):
        assert s.arrival_s == pytest.approx(r.arrival_s / 2)
        assert s.input_len + s.output_len <= 300


def test_gamma_mean_rate_and_burstiness():
    rng = np.random.default_rng(0)
    for burstiness in (0.25, 1.0, 4.0):
        t = gamma_arrivals(10.0, burstiness, num_requests=20000, rng=rng)
        gaps = np.diff(t)
        assert t[0] == 0.0 and np.all(gaps >= 0)
        assert 1 / gaps.mean() == pytest.approx(10.0, rel=0.05)
        cv = gaps.std() / gaps.mean()
        assert cv == pytest.approx(1 / np.sqrt(burstiness), rel=0.08)


def test_gamma_duration_inf_and_errors():
    t = gamma_arrivals(50.0, 1.0, duration_s=10.0, rng=np.random.default_rng(1))
    assert t.max() < 10.0 and 400 < len(t) < 600
    assert np.all(gamma_arrivals(float("inf"), 1.0, num_requests=7,
                                 rng=np.random.default_rng(1)) == 0)
    with pytest.raises(ValueError):
        gamma_arrivals(float("inf"), 1.0, duration_s=5.0, rng=np.random.default_rng(1))
    with pytest.raises(ValueError):
        gamma_arrivals(1.0, 0.0, num_requests=3, rng=np.random.default_rng(1))


def test_lengths_and_synthetic_workload():
    rng = np.random.default_rng(2)
    lens = sample_lengths(100, 0.5, 5000, rng)
    assert lens.min() >= 50 and lens.max() <= 150 and abs(lens.mean() - 100) < 3
    assert np.all(sample_lengths(7, 0.0, 10, rng) == 7)
    a = synthetic_workload(rate=5, input_len=300, output_len=40, range_ratio=0.2,
                           num_requests=50, max_context=320, seed=3)
    b = synthetic_workload(rate=5, input_len=300, output_len=40, range_ratio=0.2,
                           num_requests=50, max_context=320, seed=3)
    assert a == b and len(a) == 50
    assert all(s.input_len + s.output_len <= 320 for s in a)


def test_prompts_deterministic_in_range_and_distinct():
    p = prompt_token_ids(64, 3, seed=1)
    assert p == prompt_token_ids(64, 3, seed=1) and len(p) == 64
    assert all(100 <= t < 250 for t in p)
    assert p != prompt_token_ids(64, 4, seed=1)
    assert p != prompt_token_ids(64, 3, seed=2)
    assert prompt_token_ids(64, 3, seed=1, stream=OFFLINE) != prompt_token_ids(
        64, 3, seed=1, stream=ONLINE)
    assert set(prompt_token_ids(500, 0, token_range=(5, 7))) == {5, 6}
