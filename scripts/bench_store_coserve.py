"""One real replica co-serving on sqlite and on PostgreSQL (issue 26: the store is not on
the step's path): real `serve` processes under `conserve-jax loadtest`, sides interleaved.

The benchmark is conserve_jax/bench/store_coserve.py (its module doc says what is measured
and how); this file only runs its `main`.

    python scripts/bench_store_coserve.py --quick      # 4 x (server start + 30 s + drain)
    python scripts/bench_store_coserve.py              # 4 x (server start + 120 s + drain)
"""
from conserve_jax.bench.store_coserve import main

if __name__ == "__main__":
    raise SystemExit(main())
