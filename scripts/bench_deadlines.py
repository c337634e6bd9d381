"""Offline deadlines benchmark (issue 27): bench_coserve's online load plus three batch jobs
with completion windows (tight / medium / loose) under the deadline policies today
(claim by deadline alone), isolate and borrow, and an online-only reference.

The benchmark is conserve_jax/bench/deadlines.py (its module doc says what is measured and
how); this file only runs its `main`.

    python scripts/bench_deadlines.py --quick     # 4 variants x ~2 min
    python scripts/bench_deadlines.py             # 4 variants x ~6 min
"""
from conserve_jax.bench.deadlines import main

if __name__ == "__main__":
    main()  # returns the result dict
