"""Peers for the engine speed benchmark (`engine_speed`, run as scripts/bench_engine.py): the
same GGUF weights in transformers (float32, torch with the same thread count),
llama-cpp-python when installed, and the matvec bandwidth roofline.

Every peer exposes the measures the engine side has, as zero-argument callables that run
one timed unit of work (one decode step of a batch at a context, or one whole prefill), so
the benchmark can interleave engine and peers round by round.

`make_peers` hosts each peer in a worker process of its own (`PeerProcess`), and
`matvec_bandwidth_isolated` runs the roofline probe in one too: BLAS and OpenMP thread
pools (numpy's OpenBLAS, torch's) keep spinning after a call, and sharing a process with
XLA's pool they slowed the engine's own steps several-fold in a skeleton test here (a
30-layer batch-1 matvec chain: 120 ms alone in its process, 420 ms with numpy and torch
interleaved in the same process). Timing happens inside the process that does the work.
So torch, transformers and llama_cpp are imported only inside the functions the worker
processes run: importing this module loads numpy and nothing heavier.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Callable, Optional

import numpy as np


def matvec_bandwidth(weight_bytes: int, hidden: int, threads: int, repeats: int = 5) -> dict:
    """Bytes/s of a float32 matrix-vector product over a matrix of `weight_bytes` (the
    model's per-token weight traffic), best of `repeats`, by numpy, torch (`threads`) and
    jax. A batch-1 decode step can go no faster than weight_bytes / the best of these."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    rows = max(1, weight_bytes // (4 * hidden))
    w = np.random.default_rng(0).standard_normal((rows, hidden), dtype=np.float32)
    x = np.ones(hidden, np.float32)
    wt, xt = torch.from_numpy(w), torch.from_numpy(x)
    wj, xj = jnp.asarray(w), jnp.asarray(x)
    mv = jax.jit(lambda a, b: a @ b)
    mv(wj, xj).block_until_ready()
    runs = {"numpy": lambda: w @ x, "torch": lambda: torch.mv(wt, xt),
            "jax": lambda: mv(wj, xj).block_until_ready()}
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return {k: w.nbytes / v for k, v in best.items()}


class TransformersPeer:
    """The GGUF loaded by transformers (dequantized to float32), eager, no grad."""

    name = "transformers"

    def __init__(self, gguf_path: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
            dtype=torch.float32)
        self.model.eval()
        self.vocab = self.model.config.vocab_size

    def _ids(self, batch: int, n: int, seed: int):
        rng = np.random.default_rng(seed)
        return self.torch.from_numpy(rng.integers(3, self.vocab, (batch, n)).astype(np.int64))

    def decode_step(self, batch: int, context: int) -> Callable[[], None]:
        """One new token per sequence attending to `context` tokens (cache of context-1)."""
        torch = self.torch
        with torch.no_grad():
            out = self.model(self._ids(batch, context - 1, 1), use_cache=True, logits_to_keep=1)
        cache = out.cache
        tok = self._ids(batch, 1, 2)
        pos = torch.full((batch, 1), context - 1, dtype=torch.long)

        def step():
            with torch.no_grad():
                o = self.model(tok, cache=cache, position_ids=pos, use_cache=True,
                               logits_to_keep=1)
                o.logits.argmax(-1)
            cache.crop(-1)  # drop the token just added: the context stays the same
        return step

    def prefill(self, n: int) -> Callable[[], None]:
        torch = self.torch
        ids = self._ids(1, n, 3)

        def run():
            with torch.no_grad():
                self.model(ids, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        return run

    def generate(self, prompt: list[int], max_tokens: int) -> Callable[[], None]:
        """`model.generate`, greedy, exactly max_tokens new tokens (the public path)."""
        torch = self.torch
        ids = torch.tensor([prompt])

        def run():
            with torch.no_grad():
                self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        return run


class LlamaCppPeer:
    """llama-cpp-python on the GGUF as shipped (quantized: not the same arithmetic)."""

    name = "llama_cpp"

    def __init__(self, gguf_path: str, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=gguf_path, n_threads=threads, n_ctx=n_ctx,
                                   n_batch=2048, verbose=False)

    def decode_step(self, batch: int, context: int) -> Optional[Callable[[], None]]:
        if batch != 1:
            return None  # the high-level API has no batched decode
        toks = [5] * (context - 1)
        self.llm.reset()
        self.llm.eval(toks)

        def step():
            self.llm.n_tokens = context - 1
            self.llm.eval([7])
        return step

    def prefill(self, n: int) -> Callable[[], None]:
        toks = [5] * n

        def run():
            self.llm.reset()
            self.llm.eval(toks)
        return run


PEER_NAMES = ("transformers", "llama-cpp", "llama_cpp")


def _new_peer(name: str, gguf_path: Optional[str], threads: int, n_ctx: int):
    if name == "transformers":
        return TransformersPeer(gguf_path, threads)
    return LlamaCppPeer(gguf_path, threads, n_ctx)


def timed_calls(fn: Callable[[], None], n: int, warm: int = 0) -> list[float]:
    """Durations of n calls of fn, after `warm` untimed ones (steady state for this shape:
    weights and context back in cache after other measures ran)."""
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _serve_peer(conn, name: str, gguf_path: Optional[str], threads: int, n_ctx: int) -> None:
    """Worker process: build the peer, then answer (op, key, args) requests until None.
    ops: "make" (args = method name and its arguments; replies whether the peer has that
    measure, stored under `key`), "time" (args = (n, warm): `timed_calls` of measure `key`;
    replies the durations)."""
    try:
        peer = _new_peer(name, gguf_path, threads, n_ctx)
        conn.send(("ok", peer.name, hasattr(peer, "generate")))
    except ImportError as e:
        conn.send(("missing", str(e), False))
        return
    fns: dict = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        op, key, args = msg
        if op == "make":
            method, margs = args
            fn = getattr(peer, method)(*margs)
            if fn is not None:
                fns[key] = fn
            conn.send(fn is not None)
        elif op == "time":
            conn.send(timed_calls(fns[key], *args))


class RemoteMeasure:
    """One measure of a peer in its worker: `timed(n)` runs it n times there."""

    def __init__(self, proc: "PeerProcess", key: str) -> None:
        self.proc, self.key = proc, key

    def timed(self, n: int, warm: int = 0) -> list[float]:
        return self.proc.request("time", self.key, (n, warm))

    def __call__(self) -> None:
        self.timed(1)


class PeerProcess:
    """A peer living in its own (spawned) process; same measure methods as the peer, each
    returning a RemoteMeasure (or None where the peer has no such measure)."""

    def __init__(self, name: str, gguf_path: Optional[str], threads: int, n_ctx: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        # passive OpenMP waiting: idle torch threads must not spin while the engine runs
        env_backup = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            self.proc = ctx.Process(target=_serve_peer, args=(child, name, gguf_path, threads, n_ctx),
                                    daemon=True)
            self.proc.start()
        finally:
            if env_backup is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = env_backup
        status, self.name, self.has_generate = self.conn.recv()
        if status != "ok":
            self.proc.join()
            raise ImportError(self.name)
        self._n = 0

    def request(self, op: str, key, args):
        self.conn.send((op, key, args))
        return self.conn.recv()

    def _make(self, method: str, *args) -> Optional[RemoteMeasure]:
        self._n += 1
        key = f"{method}{self._n}"
        return RemoteMeasure(self, key) if self.request("make", key, (method, args)) else None

    def decode_step(self, batch: int, context: int):
        return self._make("decode_step", batch, context)

    def prefill(self, n: int):
        return self._make("prefill", n)

    def generate(self, prompt: list[int], max_tokens: int):
        return self._make("generate", prompt, max_tokens)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(timeout=30)


def matvec_bandwidth_isolated(weight_bytes: int, hidden: int, threads: int, repeats: int = 5) -> dict:
    """`matvec_bandwidth` in a fresh spawned process (its thread pools never share a process
    with the engine)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(matvec_bandwidth, (weight_bytes, hidden, threads, repeats))


def make_peers(names: list[str], gguf_path: Optional[str], threads: int, n_ctx: int) -> list:
    """One `PeerProcess` per named peer (a peer whose library is missing is skipped)."""
    peers = []
    for name in names:
        if name not in PEER_NAMES:
            raise SystemExit(f"--peers: unknown peer {name!r} (transformers, llama-cpp)")
        if gguf_path is None:
            raise SystemExit(f"--peers {name} needs a GGUF model (e.g. --model default)")
        try:
            peers.append(PeerProcess(name, gguf_path, threads, n_ctx))
        except ImportError as e:
            print(f"{name}: not installed ({e}): skipping that peer")
    return peers
