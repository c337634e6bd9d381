"""Peers for `bench_engine.py`: the same GGUF weights in transformers (float32, torch with the
same thread count), llama-cpp-python when installed, and the matvec bandwidth roofline.

Every peer exposes the measures the engine side has, as zero-argument callables that run
one timed unit of work (one decode step of a batch at a context, or one whole prefill), so
the benchmark can interleave engine and peers round by round.
"""
from __future__ import annotations

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


def make_peers(names: list[str], gguf_path: Optional[str], threads: int, n_ctx: int) -> list:
    peers = []
    for name in names:
        if name == "transformers":
            if gguf_path is None:
                raise SystemExit("--peers transformers needs a GGUF model (e.g. --model default)")
            peers.append(TransformersPeer(gguf_path, threads))
        elif name in ("llama-cpp", "llama_cpp"):
            try:
                peers.append(LlamaCppPeer(gguf_path, threads, n_ctx))
            except ImportError:
                print("llama-cpp-python is not installed: skipping that peer")
        else:
            raise SystemExit(f"--peers: unknown peer {name!r} (transformers, llama-cpp)")
    return peers
