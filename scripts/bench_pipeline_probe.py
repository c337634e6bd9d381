"""Pipeline parallelism across processes (issue 28 spike): 2 processes x 2 CPU devices as
two pipeline stages (tensor parallel inside each) against 1 process x 4 devices and today's
2 x 2 tensor parallelism over gloo.

The benchmark is conserve_jax/bench/pipeline_probe.py (its module doc says what is measured
and how); this file only runs its `main`.

    python scripts/bench_pipeline_probe.py      # random:small, 3 interleaved repeats x 30 steps
"""
from conserve_jax.bench.pipeline_probe import main

if __name__ == "__main__":
    main()  # returns the result dict
