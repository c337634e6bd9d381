"""How fast can a chain of per-layer matmuls run here, in XLA and in numpy? (issue 10)

The batch-1 roofline of `bench_engine` divides the weights' bytes by the bandwidth of one
large matvec. A decode step is instead a chain of 4 x layers smaller matmuls, each
depending on the last. This probe runs that chain alone: the default model's matmul shapes
(fused QKV 576x960, o 576x576, gate/up 576x3072, down 1536x576; 30 layers; random float32
weights), batch `--rows`, as one jitted XLA function and as numpy `@` (OpenBLAS). Each backend
runs in a fresh process of its own (co-resident thread pools slow each other several-fold),
alternating for `--rounds` rounds; each round times `--calls` calls after one untimed call.

    python scripts/probe_matvec_chain.py --rows 1 --rounds 3

Prints, per backend, ms per chain (median, min) and the bandwidth the min implies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peers import timed_calls  # noqa: E402  (module-level imports: numpy only)

H, I, QKV, LAYERS = 576, 1536, 960, 30


def _weights(np):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((H, QKV), np.float32) * .02,
             rng.standard_normal((H, H), np.float32) * .02,
             rng.standard_normal((H, 2 * I), np.float32) * .02,
             rng.standard_normal((I, H), np.float32) * .02) for _ in range(LAYERS)]


def _chain(x, ws, silu):
    for a, b, c, d in ws:
        q = x @ a
        x = x + q[:, :H] @ b
        gu = x @ c
        x = x + (silu(gu[:, :I]) * gu[:, I:]) @ d
    return x


def _worker(backend: str, rows: int, calls: int) -> dict:
    import numpy as np
    ws = _weights(np)
    nbytes = sum(w.nbytes for layer in ws for w in layer)
    x0 = np.random.default_rng(1).standard_normal((rows, H)).astype(np.float32) * .01
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        dev = [tuple(jnp.asarray(w) for w in layer) for layer in ws]
        fn = jax.jit(lambda w, x: _chain(x, w, jax.nn.silu))
        xd = jnp.asarray(x0)
        run = lambda: fn(dev, xd).block_until_ready()  # noqa: E731
    else:
        silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
        run = lambda: _chain(x0, ws, silu)  # noqa: E731
    return {"times_s": timed_calls(run, calls, warm=1), "bytes": nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", choices=["jax", "numpy"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(_worker(a.worker, a.rows, a.calls)))
        return
    import numpy as np
    got: dict = {"jax": [], "numpy": []}
    nbytes = 0
    for r in range(a.rounds):
        for backend in (("jax", "numpy") if r % 2 == 0 else ("numpy", "jax")):
            out = subprocess.run([sys.executable, __file__, "--worker", backend, "--rows",
                                  str(a.rows), "--calls", str(a.calls)],
                                 check=True, capture_output=True, text=True).stdout
            d = json.loads(out.strip().splitlines()[-1])
            got[backend] += d["times_s"]
            nbytes = d["bytes"]
    res = {"rows": a.rows, "weight_bytes": nbytes}
    for backend, ts in got.items():
        res[backend] = {"ms_median": 1e3 * float(np.median(ts)), "ms_min": 1e3 * min(ts),
                        "gb_s_at_min": nbytes / min(ts) / 1e9}
        print(f"{backend:6s} chain of {4 * LAYERS} matmuls, {a.rows} row(s): "
              f"median {res[backend]['ms_median']:.1f} ms, min {res[backend]['ms_min']:.1f} ms "
              f"({res[backend]['gb_s_at_min']:.1f} GB/s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
