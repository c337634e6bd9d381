"""Prefix-caching benchmark (issue 25): offline shared-instruction batch, multi-turn chat,
co-serving with a shared-prefix offline batch and a no-sharing control, each with the
prefix cache on and off, interleaved in one process.

The benchmark is conserve_jax/bench/prefix.py (its module doc says what is measured and
how); this file only runs its `main`.

    python scripts/bench_prefix.py                 # default model, ~25-30 min
    python scripts/bench_prefix.py --quick         # smaller cases, 60 s co-serving runs, ~12 min
    python scripts/bench_prefix.py --cases offline,nosharing --repeats 3
"""
from conserve_jax.bench.prefix import main

if __name__ == "__main__":
    main()  # returns the result dict
