"""One-off measurements of the co-serving benchmark (helpers of `coserve`, run as
scripts/bench_coserve.py), made on a `conserve` engine whose step loop is stopped, so the
calling thread owns its runner, KV allocator and checkpointer:

- `measure_resume`: resume from the host checkpoint vs recompute at a given context;
- `measure_safepoint_cost`: what per-layer safepoints cost in an offline-only iteration
  (the check itself, and the per-layer calls and device syncs they force).
"""
from __future__ import annotations

import time

import numpy as np

from conserve_jax.engine_api import GenerationRequest, RequestClass, RequestStream
from conserve_jax.kv.checkpointer import KVCheckpointer
from conserve_jax.runtime.step_plan import DecodeItem, PrefillItem, SampleSpec, StepPlan
from conserve_jax.request import Sequence
from conserve_jax.scheduling.scheduled_step import Scheduled, ScheduledStep


def measure_resume(eng, ctx: int, seed: int, rounds: int = 5) -> dict:
    """On a conserve engine whose step loop is stopped. A request with a `ctx`-token
    prompt is prefilled (chunks of max_prefill_tokens, as the scheduler does) and samples
    its first token; its full blocks are checkpointed. Then, alternating, (a) resume:
    restore the checkpointed blocks into fresh blocks + recompute what was not
    checkpointed (the sampled token: one decode), vs (b) recompute: prefill the prompt and
    the sampled token into fresh blocks. Both end with the same next token (checked)."""
    r, alloc = eng.runner, eng.kv.allocator
    # the engine's own checkpointer stopped with its step loop: use a fresh one, sized for
    # this request, with the engine's compiled gather/scatter
    block_bytes = eng.checkpointer.pool.data[0].nbytes if eng.checkpointer.pool.num_slots else 0
    ck = KVCheckpointer(eng.checkpointer.transfer, (-(-(ctx + 1) // r.block_size) + 1) * block_bytes)
    bs, chunk = r.block_size, eng.config.max_prefill_tokens
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, None)
    prompt = [int(x) for x in np.random.default_rng(seed + 7).integers(5, r.cfg.vocab_size, ctx)]
    nb = -(-(ctx + 1) // bs)

    def run(tokens, start, table) -> int:
        while True:
            if len(tokens) == 1 and start > 0:
                plan = StepPlan(decodes=[DecodeItem(tokens[0], start, table, spec)])
            else:
                piece = tokens[:chunk]
                last = len(piece) == len(tokens)
                plan = StepPlan(prefills=[PrefillItem(piece, start, table, spec if last else None)])
            res = r.execute(plan)
            n = plan.num_tokens
            tokens, start = tokens[n:], start + n
            if not tokens:
                return res.tokens[0].token

    b1 = alloc.allocate(nb)
    tok1 = run(prompt, 0, b1)
    ck.checkpoint_new_blocks([("resume", b1, ctx, 0)])
    kept = ck.kept_tokens("resume", ctx, ctx + 1)
    saved = ck.num_saved_blocks("resume")
    full = prompt + [tok1]
    ta, tb, toks = [], [], set()
    for i in range(rounds + 1):  # round 0 warms both paths up
        for which in ("ab" if i % 2 == 0 else "ba"):
            blocks = alloc.allocate(nb)
            t = time.perf_counter()
            if which == "a":
                ck.restore("resume", blocks[:saved])
                tok = run(full[kept:], kept, blocks)
            else:
                tok = run(full, 0, blocks)
            dt = time.perf_counter() - t
            alloc.free(blocks)
            toks.add(tok)
            if i:
                (ta if which == "a" else tb).append(dt)
    toks.add(run([tok1], ctx, b1))  # the request continuing without eviction
    alloc.free(b1)
    ck.release("resume")
    ck.close()
    ra, rb = float(np.median(ta)), float(np.median(tb))
    return {"context_tokens": ctx, "restored_blocks": saved,
            "recomputed_on_resume_tokens": len(full) - kept, "resume_s": ra, "recompute_s": rb,
            "resume_s_all": ta, "recompute_s_all": tb, "ratio": ra / rb,
            "tokens_match": len(toks) == 1, "rounds": rounds}


def _offline_plan(eng, decodes: int, decode_ctx: int, prefill: int, prefill_ctx: int, seed: int):
    """An offline-only iteration like the benchmark's: `decodes` decode tokens at
    `decode_ctx` context and one `prefill`-token chunk after `prefill_ctx` tokens."""
    r, alloc = eng.runner, eng.kv.allocator
    bs = r.block_size
    rng = np.random.default_rng(seed)
    spec = SampleSpec(0.0, 0, 1.0, 0, 0, None)
    held, plan = [], StepPlan()
    if decodes:  # the decodes share one block table (timing only; results are dropped)
        b = alloc.allocate(-(-(decode_ctx + 1) // bs))
        held.append(b)
    for _ in range(decodes):
        plan.decodes.append(DecodeItem(int(rng.integers(5, 1000)), decode_ctx, b, spec))
    if prefill:
        b = alloc.allocate(-(-(prefill_ctx + prefill) // bs))
        held.append(b)
        toks = [int(x) for x in rng.integers(5, 1000, prefill)]
        plan.prefills.append(PrefillItem(toks, prefill_ctx, b, spec))
    return plan, held


def _execute_every(runner, plan: StepPlan, check, every) -> None:
    """`runner.execute(plan)` with the safepoint `check` after every `every` layers (None:
    no safepoints). The runner takes its interval from the configuration
    (`runner.safepoint_every`); the caller owns this stopped engine's runner, so the interval
    is set for the call and put back after it."""
    if check is None:
        runner.execute(plan)
        return
    saved = runner.safepoint_every
    runner.safepoint_every = max(1, min(runner.cfg.num_layers, every))
    try:
        runner.execute(plan, check)
    finally:
        runner.safepoint_every = saved


def measure_safepoint_cost(eng, seed: int, rounds: int = 3) -> dict:
    """Per shape (offline decode batch; decode batch + 128-token prefill chunk): iteration
    time with no safepoints, with a no-op check after every layer, and every 4 layers
    (medians of `rounds` alternating runs after a warm-up round); and the cost of one call
    of conserve's real check when no online request is waiting (the common case)."""
    r, n_layers = eng.runner, eng.runner.cfg.num_layers
    cfg = eng.config
    d, ctx = min(8, cfg.max_num_seqs), min(768, eng.max_model_len - 2)
    pre = min(128, cfg.max_prefill_tokens)
    pre_ctx = max(0, min(256, eng.max_model_len - pre - 1))
    shapes = {f"decode{d}_ctx{ctx}": (d, ctx, 0, 0),
              f"decode{d}_ctx{ctx}+prefill{pre}_ctx{pre_ctx}": (d, ctx, pre, pre_ctx)}
    out = {"num_layers": n_layers, "rounds": rounds, "shapes": {}}
    no = lambda layers: False  # noqa: E731
    for label, shape in shapes.items():
        plan, held = _offline_plan(eng, *shape, seed)
        variants = {"none": (None, None), "every_1": (no, 1), "every_4": (no, 4)}
        times = {k: [] for k in variants}
        for i in range(rounds + 1):
            keys = list(variants) if i % 2 == 0 else list(variants)[::-1]
            for k in keys:
                t = time.perf_counter()
                _execute_every(r, plan, *variants[k])
                if i:
                    times[k].append(time.perf_counter() - t)
        for b in held:
            eng.kv.allocator.free(b)
        med = {k: float(np.median(v)) for k, v in times.items()}
        out["shapes"][label] = {
            "iteration_s": med, "iteration_s_all": times,
            "layer_time_s": med["none"] / n_layers,
            "per_layer_safepoint_overhead_s": (med["every_1"] - med["none"]) / max(1, n_layers - 1),
            "every_1_vs_none": med["every_1"] / med["none"],
            "every_4_vs_none": med["every_4"] / med["none"]}
    # the real check, no arrival waiting: the engine's intake lock + queue scan + bookkeeping
    req = GenerationRequest("probe", [5] * 8, request_class=RequestClass.OFFLINE)
    seq = Sequence(req, RequestStream("probe"), 0, token_ids=[5] * 8, prompt_len=8)
    step = ScheduledStep(StepPlan(), [Scheduled(seq, 8, True, False)])
    sp = eng.policy.safepoints(step)
    calls = 2000
    t = time.perf_counter()
    for i in range(calls):
        sp.check(1 + i % max(1, n_layers - 1))
    out["check_call_s"] = (time.perf_counter() - t) / calls
    return out
