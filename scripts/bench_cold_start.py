"""A fresh server (fresh HOME, fresh compilation cache) under a steady online load: TTFT per
window from the first request on, memory mappings, time to listen.

The benchmark is conserve_jax/bench/cold_start.py (its module doc says what is measured);
this file only runs its `main`.

    python scripts/bench_cold_start.py --duration-s 600 --json out/cold_start.json
    python scripts/bench_cold_start.py --duration-s 60 --window-s 10 -- --model random:tiny
"""
import sys

from conserve_jax.bench.cold_start import main

if __name__ == "__main__":
    sys.exit(main())
