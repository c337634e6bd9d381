"""A/B of two source trees through the public `LLM.generate` path (used for the architecture
refactor of issue 12, whose two boundary commits share this API unchanged).

    python scripts/ab_llm_generate.py SRC_ROOT OUT.json [--compilation-cache-dir DIR]

imports SRC_ROOT's conserve_jax (first on sys.path) and times, after one untimed warm-up call
per case, batch 1 / 8 / 32 decode (128-token prompts, 32 generated tokens, greedy,
ignore_eos) and a 512-token prefill (1 generated token): 3 calls each, median and best
tokens/s. Only the engine runs in the process (no numpy BLAS work, no torch beside it).
Run the two trees alternately (A B B A), one process at a time, on a quiet machine; compare
the ranges. The engine geometry is fixed (max_model_len 1280, 32 sequences, 512-token
prefill chunks) and everything else is each tree's own default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peers import timed_calls  # noqa: E402  (module-level imports: numpy only)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src_root", help="a checkout whose conserve_jax is measured")
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--compilation-cache-dir", default=None)
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.src_root))
    import numpy as np
    from conserve_jax.llm import LLM
    from conserve_jax.sampling_params import SamplingParams

    kw = {"compilation_cache_dir": a.compilation_cache_dir} if a.compilation_cache_dir else {}
    llm = LLM(model="default", max_model_len=1280, max_num_seqs=32, max_prefill_tokens=512, **kw)
    rng = np.random.default_rng(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[int(t) for t in rng.integers(100, 40000, length)] for _ in range(n)]

    decode = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    cases = {"b1": (prompts(1, 128), decode), "b8": (prompts(8, 128), decode),
             "b32": (prompts(32, 128), decode),
             "prefill512": (prompts(1, 512),
                            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))}
    res: dict = {"root": os.path.abspath(a.src_root)}
    for name, (ps, sp) in cases.items():
        outs = llm.generate(ps, sp)  # warm-up: compiles this case's shapes
        # greedy with ignore_eos: every call generates the warm-up's token count
        times = timed_calls(lambda: llm.generate(ps, sp), 3)
        toks = 512 if name == "prefill512" else sum(len(o.token_ids) for o in outs)
        res[name] = {"tok_s_median": toks / float(np.median(times)), "tok_s_best": toks / min(times),
                     "times_s": times}
        print(f"{name:11s} {res[name]['tok_s_median']:8.1f} tok/s", flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    os._exit(0)  # skip the engine's orderly shutdown: nothing else to keep


if __name__ == "__main__":
    main()
