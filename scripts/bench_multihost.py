"""Multi-process step time (issue 28): 2 processes x 2 CPU devices against 1 process x 4
devices on one model, and the plan broadcast's cost per step.

The benchmark is conserve_jax/bench/multihost.py (its module doc says what is measured and
how); this file only runs its `main`.

    python scripts/bench_multihost.py        # random:small, 5 interleaved repeats per layout
"""
from conserve_jax.bench.multihost import main

if __name__ == "__main__":
    main()  # returns the result dict
