"""One process of a multi-process run, launched by tests/test_multiprocess.py:
`LLM("random:tiny", ...)` over the coordinator on 127.0.0.1, greedy generation of
`PROMPTS` for `--rounds` rounds; process 0 prints "round i done" after each round and writes
the outputs (token ids, chosen and top logprobs) of the last round as JSON to `--out`.
Followers never get past the `LLM` constructor (it exits the process when process 0
closes). Not a test module (pytest collects test_*.py only)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"p{args.process_id} %(levelname)s %(name)s: %(message)s")
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
