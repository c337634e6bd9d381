"""EcoServe benchmark: fcfs, sarathi and ecoserve on the same KV-bound online workload, at
several arrival rates, in one process.

The benchmark is conserve_jax/bench/ecoserve.py (its module doc says what is measured and
how); this file only runs its `main`.

    python scripts/bench_ecoserve.py --trace data/traces/azure_llm_2023_conv.csv  # ~25 min
    python scripts/bench_ecoserve.py --trace ... --quick     # 2 rates, 1 run each
    python scripts/bench_ecoserve.py --trace ... --offline-compare
"""
import sys

from conserve_jax.bench.ecoserve import main

if __name__ == "__main__":
    sys.exit(main())
