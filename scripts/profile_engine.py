"""Where one engine iteration's time goes: a jax.profiler trace of decode steps, aggregated.

The benchmark is conserve_jax/bench/step_profile.py (its module doc says what is measured and
how); this file only runs its `main`.

    python scripts/profile_engine.py --batches 1,32 --context 256 --json out/profile_engine.json
"""
import sys

from conserve_jax.bench.step_profile import main

if __name__ == "__main__":
    sys.exit(main())
