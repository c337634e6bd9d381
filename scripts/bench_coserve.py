"""Co-serving benchmark: every policy on the same online + offline workload, in one process.

The benchmark is conserve_jax/bench/coserve.py (its module doc says what is measured and
how); this file only runs its `main`.

    python scripts/bench_coserve.py --quick            # 5 x ~2 min + set-up
    python scripts/bench_coserve.py --quick --sweep    # 13 x ~2 min + set-up
    python scripts/bench_coserve.py                    # 5 x ~5.5 min + set-up
"""
from conserve_jax.bench.coserve import main

if __name__ == "__main__":
    main()  # returns the result dict
