"""Engine speed on one machine, all numbers from one run, optionally beside peers.

The benchmark is conserve_jax/bench/engine_speed.py (its module doc says what is measured and
how); this file only runs its `main`.

    python scripts/bench_engine.py --peers transformers --json out/bench_engine.json
    python scripts/bench_engine.py --quick --peers transformers    # a few minutes
"""
import sys

from conserve_jax.bench.engine_speed import main

if __name__ == "__main__":
    sys.exit(main())
