"""One process of a multi-process run, launched by tests/test_multiprocess.py:
`LLM("random:tiny", ...)` over the coordinator on 127.0.0.1, greedy generation of
`PROMPTS` for `--rounds` rounds; process 0 prints "round i done" after each round and writes
the outputs (token ids, chosen and top logprobs) of the last round as JSON to `--out`.
Followers never get past the `LLM` constructor (it exits the process when process 0
closes). `--mode runner` drives the runner alone through abandon and resume
(`preempt_and_resume`); `--mode coserve` runs `coserve_mix` on an `Engine` (offline work
evicted to host and restored when online work needs its memory). Not a test module (pytest
collects test_*.py only)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from conserve_jax.entrypoints.llm import LLM
from conserve_jax.sampling_params import SamplingParams

# a few compiled shapes only: short context, few sequences, small prefill chunks
ENGINE = dict(model="random:tiny", warmup=False, max_model_len=64, max_num_seqs=4,
              max_prefill_tokens=32, block_size=4, kv_cache_tokens=256,
              safepoint_interval=1, enable_prefix_caching=False)
PROMPTS = [[5 + (7 * i + j) % 250 for j in range(6 + 9 * i)] for i in range(3)]
MAX_TOKENS = 12


def sampling() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)


def outputs_json(outs) -> list[dict]:
    return [{"token_ids": o.token_ids,
             "logprobs": [[lp.token_id, lp.logprob, [list(t) for t in lp.top]]
                          for lp in o.logprobs]}
            for o in outs]


def preempt_and_resume(config, out: str) -> None:
    """`--mode runner`: the runner alone (no engine). Process 0 runs one plan straight
    through, then abandons it at the safepoint after layer 1 and resumes it, then abandons
    it again, cuts its decode rows loose and resumes it; the followers follow. Writes the
    sampled tokens of the three runs."""
    from conserve_jax.models.loader import load_model
    from conserve_jax.runtime import distributed
    from conserve_jax.runtime.pipeline_leader import make_runner
    from conserve_jax.scheduling.profiler import synthetic_plan

    config = distributed.start(config)
    loaded = load_model(config.model, seed=config.seed)
    runner = make_runner(loaded.config, loaded.params, config)  # pp: the first stage
    plan, _ = synthetic_plan(runner, 2, 8, 16)
    tokens = lambda r: [t.token for t in r.tokens]
    straight = tokens(runner.execute(plan))
    assert runner.execute(plan, lambda done: True) is None
    resumed = tokens(runner.resume(runner.take_suspended(), lambda done: False))
    assert runner.execute(plan, lambda done: True) is None
    it = runner.detach_decodes(runner.take_suspended(), range(len(plan.decodes)))
    detached = tokens(runner.resume(it))
    runner.close()
    with open(out, "w") as f:
        json.dump({"straight": straight, "resumed": resumed, "detached": detached}, f)


# the co-serving mix: a KV cache too small for everything at once, so online arrivals evict
# offline requests (their KV checkpointed to host) and preempt offline iterations
COSERVE = dict(ENGINE, policy="conserve", max_model_len=128, max_prefill_tokens=64,
               kv_cache_tokens=None, num_blocks=36, max_num_seqs=8)
OFFLINE = [[5 + (11 * i + 3 * j) % 500 for j in range(28 + 5 * i)] for i in range(4)]
ONLINE = [[7 + (13 * i + 5 * j) % 500 for j in range(40 + 3 * i)] for i in range(3)]
N_OFF, N_ON = 24, 8


def coserve_mix(config) -> dict:
    """Offline requests first; once they decode, online requests that need their memory
    arrive. Returns every request's tokens and the engine's eviction/restore counters."""
    from conserve_jax.engine.engine import Engine
    from tests.coserve_helpers import collect, req, wait_until

    eng = Engine(config)
    try:
        offs = {f"off{i}": eng.submit(req(f"off{i}", p, N_OFF)) for i, p in enumerate(OFFLINE)}
        wait_until(lambda: eng.stats().offline_tokens_total >= 8, timeout=300)
        ons = {f"on{i}": eng.submit(req(f"on{i}", p, N_ON, online=True, ttft=30, tpot=30))
               for i, p in enumerate(ONLINE)}
        got = {k: collect(s, timeout=300)[0] for k, s in {**offs, **ons}.items()}
        wait_until(lambda: not eng.stats().online_running + eng.stats().offline_running)
        time.sleep(0.2)  # the step loop releases finished requests' host slots
        st = eng.stats()
        ck = eng.checkpointer
        return {"tokens": got, "evictions": st.evictions, "restored_tokens": st.restored_tokens,
                "blocks_restored": ck.counters.blocks_restored if ck else 0,
                "preemptions": st.preemptions,
                "host_slots_used": ck.pool.num_used if ck else 0}
    finally:
        eng.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--cpu-devices", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--timeout", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--engine", default="{}", help="JSON: engine keyword arguments over ENGINE")
    p.add_argument("--mode", choices=("llm", "runner", "coserve"), default="llm")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"p{args.process_id} %(levelname)s %(name)s: %(message)s")
    if args.mode in ("runner", "coserve"):
        from conserve_jax.engine_args import engine_config
        from conserve_jax.runtime.follower import follow_if_follower

        config = engine_config(**{**(ENGINE if args.mode == "runner" else COSERVE),
                                  **json.loads(args.engine)},
                               coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               cpu_devices=args.cpu_devices, process_timeout_s=args.timeout)
        if follow_if_follower(config) is not None:
            return 0
        if args.mode == "runner":
            preempt_and_resume(config, args.out)
        else:
            with open(args.out, "w") as f:
                json.dump(coserve_mix(config), f)
        return 0
    llm = LLM(**{**ENGINE, **json.loads(args.engine)},
              coordinator_address=args.coordinator, num_processes=args.num_processes,
              process_id=args.process_id, cpu_devices=args.cpu_devices,
              process_timeout_s=args.timeout)
    outs = None
    for r in range(args.rounds):
        outs = llm.generate(PROMPTS, sampling())
        print(f"round {r} done", flush=True)
    llm.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(outputs_json(outs), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
