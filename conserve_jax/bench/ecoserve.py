"""EcoServe benchmark: fcfs, sarathi and ecoserve on the same KV-bound online workload, at
several arrival rates, in one process.

Workload (ecoserve_workload says exactly how): Azure conversation trace arrivals
(bursts kept) stretched to each --rate over --duration s; prompts = shared system prefix +
task marker + random content (ContextTokens/8 in [16, 256]); natural answer lengths from the
trace (GeneratedTokens/3, long-tailed), produced by a per-request stop token found in a
cached greedy pre-pass; greedy, EOS/stop honoured, max_tokens --max-tokens for everyone;
--hint-frac of requests carry a noisy expected_output_tokens.
Engine (same for every policy): --model (default random:small: 4 layers, fast enough on this
2-core CPU that a run takes minutes while the KV cache, not compute, limits concurrency),
--kv-cache-tokens (default 2048: ~9 average requests fit while --max-num-seqs 32 would
allow more, so KV memory, not compute, limits the batch), 16-token blocks, 128 prefill
tokens per iteration. Each (rate, policy) gets a fresh engine; policy order rotates per
rate; compiled functions are shared between engines.

Measured per rate and policy (client side, time.monotonic; medians over --repeats runs,
each kept under `runs`): SLO attainment (finished with
TTFT <= --ttft and mean TPOT <= --tpot, over all requests; unfinished at the end of the
drain count as misses), goodput (requests within SLO / duration), mean and p99 job
completion time (arrival -> last token), p99 TTFT/TPOT, preemptions (evictions + abandoned
iterations), recomputed tokens, predictor error (ecoserve). JSON: out/bench_ecoserve.json,
plot: out/bench_ecoserve.png.

    python scripts/bench_ecoserve.py --trace data/traces/azure_llm_2023_conv.csv  # ~25 min
    python scripts/bench_ecoserve.py --trace ... --quick     # 2 rates, 1 run each
    python scripts/bench_ecoserve.py --trace ... --offline-compare   # item 3: conserve +-
        offline_kv_reservation on an online + saturating offline mix (evictions, recompute)

Engine knobs are the engine's own flags (add_engine_args: --model, --kv-cache-tokens,
--max-num-seqs, --block-size, --dtype, --sarathi-token-budget, --compilation-cache-dir, ...)
with the defaults above. Not flags here: --policy (--policies), --offline-kv-reservation
(--offline-compare varies it), the engine's --warmup (the first engine compiles every
bucket, later ones reuse it), --default-ttft-s/--default-tpot-s (--ttft/--tpot set them).

Callers: scripts/bench_ecoserve.py (the entry point; also `python -m
conserve_jax.bench.ecoserve`); tests/test_bench_scripts_args.py checks `parse_args`,
`config` and `prepass_config`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

from conserve_jax.bench import ecoserve_workload as wl
from conserve_jax.bench import script_io
from conserve_jax.config import EngineConfig
from conserve_jax.engine.engine import Engine
from conserve_jax.engine_api import SLO, GenerationRequest, RequestClass
from conserve_jax.engine_args import add_engine_args, engine_config_from_args
from conserve_jax.models.loader import load_model
from conserve_jax.sampling_params import SamplingParams

# the benchmark's engine (same for every policy), where it differs from the engine's defaults
ENGINE_DEFAULTS = {"model": "random:small", "kv_cache_tokens": 2048, "max_num_seqs": 32,
                   "max_model_len": 768, "max_prefill_tokens": 128, "max_prefill_seqs": 1,
                   "block_size": 16, "host_pool_bytes": 1 << 28, "sarathi_token_budget": 64,
                   "compilation_cache_dir": "out/xla_cache"}
NOT_FLAGS = ("policy", "offline_kv_reservation", "warmup", "default_ttft_s", "default_tpot_s")
SHARED = ("_groups", "_layer", "_embed", "_select", "_head", "_gather", "_scatter")


class Compiled:
    """Jitted callables of the first engine handed to later ones (same model and shapes)."""

    def __init__(self) -> None:
        self.fns: dict = {}

    def adopt(self, eng: Engine) -> None:
        for obj in (eng.runner, eng.checkpointer):
            for n in SHARED:
                if obj is None or not hasattr(obj, n):
                    continue
                if n in self.fns:
                    setattr(obj, n, self.fns[n])
                else:
                    self.fns[n] = getattr(obj, n)


def config(a, policy: str, **kw) -> EngineConfig:
    """The engine flags with `policy`, the SLO as the engine's default objectives, and a
    run's overrides `kw`."""
    return engine_config_from_args(a, policy=policy, default_ttft_s=a.ttft,
                                   default_tpot_s=a.tpot, **kw)


def prepass_config(a) -> EngineConfig:
    """fcfs with KV for --max-num-seqs full contexts (ample: the pre-pass is not measured)."""
    return config(a, "fcfs", kv_cache_tokens=None,
                  num_blocks=a.max_num_seqs * -(-a.max_model_len // a.block_size) + 1)


def prepass(a, loaded, items) -> dict:
    """Greedy continuations (ignore_eos, max_tokens tokens) of every prompt, ample KV."""
    eng = Engine(prepass_config(a), loaded=loaded)
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    streams = {it.rid: eng.submit(GenerationRequest("pre-" + it.rid, list(it.prompt), sp))
               for it in items}
    out = {}
    for rid, st in streams.items():
        out[rid] = [t for d in st for t in d.token_ids]
    eng.shutdown()
    return out


def run_one(a, loaded, compiled, policy: str, items, cfg_kw=None, offline=()) -> dict:
    eng = Engine(config(a, policy, **(cfg_kw or {})), loaded=loaded, warmup=not compiled.fns)
    compiled.adopt(eng)
    recs = {it.rid: {"arrival": None, "times": [], "reason": None} for it in items}

    def consume(it, stream):
        rec = recs[it.rid]
        for d in stream:
            now = time.monotonic()
            rec["times"] += [now] * len(d.token_ids)
            if d.finished:
                rec["reason"] = d.finish_reason

    def request(it):
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0,
                            stop_token_ids=(it.stop_token,) if it.stop_token >= 0 else ())
        return GenerationRequest(it.rid, list(it.prompt), sp, RequestClass.ONLINE,
                                 SLO(a.ttft, a.tpot), expected_output_tokens=it.hint)

    for i, (p, n) in enumerate(offline):  # saturating offline work, submitted first
        eng.submit(GenerationRequest(f"off-{i}", p, SamplingParams(max_tokens=n, temperature=0.0,
                                                                   ignore_eos=True),
                                     RequestClass.OFFLINE))
    threads = []
    t0 = time.monotonic()
    for it in items:
        delay = t0 + it.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        recs[it.rid]["arrival"] = time.monotonic()
        th = threading.Thread(target=consume, args=(it, eng.submit(request(it))), daemon=True)
        th.start()
        threads.append(th)
    deadline = time.monotonic() + a.drain
    for th in threads:
        th.join(timeout=max(0.0, deadline - time.monotonic()))
    st = eng.stats()
    eng.shutdown()
    for th in threads:
        th.join(timeout=5)
    records = []
    for it in items:
        r = recs[it.rid]
        ts, arr = list(r["times"]), r["arrival"]
        fin = r["reason"] in ("stop", "length")
        records.append({"arrival": arr - t0, "finished": fin,
                        "ttft": ts[0] - arr if ts else None,
                        "tpot": (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else None,
                        "jct": ts[-1] - arr if fin and ts else None})
    m = wl.summarize(records, a.duration, a.ttft, a.tpot)
    m.update(preemptions=st.evictions + st.preemptions, evictions=st.evictions,
             recomputed_tokens=st.recomputed_tokens,
             predictor_mae_tokens=st.predictor_mae_tokens if st.predictor_observed else None,
             predictor_baseline_mae_tokens=(st.predictor_baseline_mae_tokens
                                            if st.predictor_observed else None),
             predictor_within_25pct=st.predictor_within_25pct if st.predictor_observed else None,
             kv_reservations_grown=st.kv_reservations_grown, kv_blocks_lent=st.kv_blocks_lent,
             kv_blocks_returned=st.kv_blocks_returned, kv_loans_recalled=st.kv_loans_recalled,
             offline_tokens_total=st.offline_tokens_total)
    return m


def plot(path: str, res: dict, policies: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = [r["rate"] for r in res["rates"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for p in policies:
        a1.plot(rates, [r["policies"][p]["slo_attainment"] for r in res["rates"]], "o-", label=p)
        a2.plot(rates, [r["policies"][p]["goodput_rps"] for r in res["rates"]], "o-", label=p)
    a1.axhline(0.9, color="gray", ls="--")
    a1.set_xlabel("arrival rate (req/s)")
    a1.set_ylabel("SLO attainment")
    a2.set_xlabel("arrival rate (req/s)")
    a2.set_ylabel("goodput (req/s within SLO)")
    a1.legend()
    fig.suptitle(f"KV-bound online workload ({res['config']['model']}, "
                 f"{res['config']['kv_cache_tokens']} KV tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def targets(res: dict) -> dict:
    rows = res["rates"]
    ok = [r for r in rows if (r["policies"]["fcfs"]["slo_attainment"] or 0) >= 0.5]
    out = {}
    if ok:
        r = max(ok, key=lambda r: r["rate"])
        f, e = r["policies"]["fcfs"], r["policies"]["ecoserve"]
        div = lambda x, y: None if x is None or not y else x / y
        out["at_rate"] = r["rate"]
        out["goodput_ratio"] = {"value": div(e["goodput_rps"], f["goodput_rps"]), "threshold": 1.3}
        out["ttft_p99_ratio"] = {"value": div(e["ttft_p99_s"], f["ttft_p99_s"]), "threshold": 1.1}
        rc = (None if f["recomputed_tokens"] == 0 and e["recomputed_tokens"] == 0
              else div(e["recomputed_tokens"], f["recomputed_tokens"]))
        out["recomputed_ratio"] = {"value": rc, "threshold": 0.25}
    m = res["max_rate_at_90pct_slo"]
    out["max_rate_ratio"] = {"value": (m["ecoserve"] / m["fcfs"]) if m.get("fcfs") and
                             m.get("ecoserve") is not None else None, "threshold": 1.3}
    for k, v in out.items():
        if isinstance(v, dict):
            le = k in ("ttft_p99_ratio", "recomputed_ratio")
            v["met"] = None if v["value"] is None else (v["value"] <= v["threshold"] if le
                                                        else v["value"] >= v["threshold"])
    return out


def offline_compare(a, loaded, compiled, items) -> dict:
    """Item 3: conserve with and without offline_kv_reservation, same online + offline mix."""
    rng = np.random.default_rng(1)
    offline = [([int(x) for x in rng.integers(5, loaded.config.vocab_size, int(rng.integers(64, 256)))],
                int(rng.integers(32, 192))) for _ in range(a.offline_requests)]
    out = {}
    for name, kw in (("conserve", {"offline_kv_reservation": False}),
                     ("conserve+offline_kv_reservation", {"offline_kv_reservation": True})):
        m = run_one(a, loaded, compiled, "conserve", items, kw, offline)
        out[name] = m
        print(f"{name:34s} evictions {m['evictions']:4d}  recomputed {m['recomputed_tokens']:6d}  "
              f"SLO {m['slo_attainment']:.0%}  ttft p99 {m['ttft_p99_s']:.3f}  "
              f"offline tokens {m['offline_tokens_total']}", flush=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, help="data/traces/azure_llm_2023_conv.csv")
    p.add_argument("--rates", default="2,4,6,8,10")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--drain", type=float, default=40.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ttft", type=float, default=1.0,
                   help="TTFT objective (s) of every request; also the engine's default_ttft_s")
    p.add_argument("--tpot", type=float, default=0.1,
                   help="TPOT objective (s) of every request; also the engine's default_tpot_s")
    p.add_argument("--hint-frac", type=float, default=0.3)
    p.add_argument("--policies", default="fcfs,sarathi,ecoserve")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per rate and policy (order rotated); metrics are medians")
    p.add_argument("--pool", type=int, default=800,
                   help="trace rows pre-computed once (>= max rate x duration)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--offline-compare", action="store_true")
    p.add_argument("--offline-requests", type=int, default=48)
    p.add_argument("--out", default="out/bench_ecoserve.json")
    add_engine_args(p, defaults=ENGINE_DEFAULTS, exclude=NOT_FLAGS)
    return p


def parse_args(argv=None):
    a = script_io.parse_checked(build_parser(), argv, policy="fcfs")
    if a.quick:
        a.rates, a.repeats = "4,8", 1
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    rates = [float(x) for x in a.rates.split(",")]
    policies = a.policies.split(",")
    loaded = load_model(a.model, seed=a.seed)
    vocab = loaded.config.vocab_size
    full = wl.build(a.trace, max(rates), a.duration, vocab, a.max_tokens, pool=a.pool,
                    n=a.pool)
    t = time.monotonic()
    cont = wl.load_or_run_prepass(os.path.join(os.path.dirname(a.out), "ecoserve_prepass.json"),
                                  full, lambda items: prepass(a, loaded, items))
    print(f"pre-pass ready ({time.monotonic() - t:.0f}s)", flush=True)
    compiled = Compiled()
    # the flags, and the script's former names of two engine knobs (earlier JSON has them)
    res = {"config": {**vars(a), "sarathi_budget": a.sarathi_token_budget,
                      "xla_cache": a.compilation_cache_dir}, "rates": []}
    if a.offline_compare:
        items = wl.build(a.trace, rates[0], a.duration, vocab, a.max_tokens, pool=a.pool)
        wl.assign_ends(items, cont, a.hint_frac)
        res["offline_compare"] = offline_compare(a, loaded, compiled, items)
        _write(a.out.replace(".json", "_offline.json"), res)
        return 0
    for i, rate in enumerate(rates):
        items = wl.build(a.trace, rate, a.duration, vocab, a.max_tokens, pool=a.pool)
        wl.assign_ends(items, cont, a.hint_frac)
        nat = [it.natural for it in items]
        row = {"rate": rate, "requests": len(items), "natural_len_mean": float(np.mean(nat)),
               "natural_len_p90": float(np.percentile(nat, 90)), "policies": {}}
        runs = {p_: [] for p_ in policies}
        for rep in range(a.repeats):  # rotate the order across rates and repeats
            k = (i + rep) % len(policies)
            order = policies[k:] + policies[:k]
            if rep % 2:
                order = order[::-1]
            for pol in order:
                runs[pol].append(run_one(a, loaded, compiled, pol, items))
                m = runs[pol][-1]
                print(f"rate {rate:5.2f} {pol:9s} SLO {m['slo_attainment']:.0%} goodput "
                      f"{m['goodput_rps']:.2f} jct {wl_fmt(m['mean_jct_s'])}/{wl_fmt(m['p99_jct_s'])} "
                      f"ttft p99 {wl_fmt(m['ttft_p99_s'])} tpot p99 {wl_fmt(m['tpot_p99_s'])} "
                      f"preempt {m['preemptions']} recomputed {m['recomputed_tokens']} "
                      f"pred MAE {wl_fmt(m['predictor_mae_tokens'])} "
                      f"(mean-baseline {wl_fmt(m['predictor_baseline_mae_tokens'])})", flush=True)
        for pol in policies:
            m = {k: wl.median([r[k] for r in runs[pol]]) for k in runs[pol][0]}
            m["runs"] = runs[pol]
            row["policies"][pol] = m
        row["policies"] = {p_: row["policies"][p_] for p_ in policies}
        res["rates"].append(row)
        _write(a.out, res)
    res["max_rate_at_90pct_slo"] = {
        p_: wl.max_rate_at(rates, [r["policies"][p_]["slo_attainment"] for r in res["rates"]])
        for p_ in policies}
    if "fcfs" in policies and "ecoserve" in policies:
        res["targets"] = targets(res)
    _write(a.out, res)
    plot(a.out.replace(".json", ".png"), res, policies)
    print(json.dumps({"max_rate_at_90pct_slo": res["max_rate_at_90pct_slo"],
                      "targets": res.get("targets")}, indent=1))
    return 0


def wl_fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _write(path: str, res: dict) -> None:
    script_io.write_json(path, res, indent=1, announce=False)


if __name__ == "__main__":
    sys.exit(main())
