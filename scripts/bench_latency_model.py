"""Latency-model accuracy on this machine: predictions against measured iterations.

The benchmark is conserve_jax/bench/latency_model_accuracy.py (its module doc says what is measured and
how); this file only runs its `main`.

    python scripts/bench_latency_model.py --repeats 3 --json out/bench_latency_model.json
"""
import sys

from conserve_jax.bench.latency_model_accuracy import main

if __name__ == "__main__":
    sys.exit(main())
