"""Batched token sampling on device: greedy, temperature, top-k, top-p, per-row seeds.

Called by the runner (step-loop thread) on float32 logits [B, V]. Each row carries its own
parameters. Randomness for a row is `fold_in(key(seed), counter)` where counter is the
number of tokens that request has generated so far, so a seeded request samples the same
tokens whatever it is batched with. Logprobs are of the model's distribution (raw logits,
before temperature), as vLLM reports them.

Three compiled variants, chosen per iteration by `sampler_mode`: "greedy" (argmax only),
"sample" (temperature, no filtering) and "filter" (sorts each row for top-k/top-p).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass
class SamplingRows:
    """Host-side per-row parameters, padded to the sample-row bucket."""

    temperature: np.ndarray  # f32 [B]; 0 = greedy
    top_k: np.ndarray  # i32 [B]; 0 = off
    top_p: np.ndarray  # f32 [B]; 1 = off
    seed: np.ndarray  # u32 [B]
    counter: np.ndarray  # i32 [B]

    @classmethod
    def empty(cls, n: int) -> "SamplingRows":
        return cls(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
                   np.zeros(n, np.uint32), np.zeros(n, np.int32))


def sampler_mode(rows: SamplingRows, n_real: int) -> str:
    t = rows.temperature[:n_real]
    if not np.any(t > 0):
        return "greedy"
    live = t > 0
    if np.any((rows.top_k[:n_real] > 0) & live) or np.any((rows.top_p[:n_real] < 1.0) & live):
        return "filter"
    return "sample"


def sample(logits: jax.Array, temperature, top_k, top_p, seed, counter, *, mode: str,
           num_top: int):
    """-> (token ids [B] i32, chosen logprobs [B] f32, top ids [B, num_top], top logprobs)."""
    logits = logits.astype(jnp.float32)
    # no [B, V] log-softmax: logprob = logit - logsumexp; top_k(., 1) is XLA:CPU's fastest
    # argmax (same first-index tie-breaking)
    lse = jax.nn.logsumexp(logits, axis=-1)
    greedy = _argmax(logits)
    if mode == "greedy":
        tokens = greedy
    else:
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed, counter)
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        if mode == "filter":
            vals, idx = jax.lax.top_k(scaled, scaled.shape[-1])  # full descending sort
            rank = jnp.arange(vals.shape[-1])[None, :]
            k = jnp.where(top_k > 0, top_k, vals.shape[-1])[:, None]
            probs = jax.nn.softmax(vals, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
            keep = (rank < k) & ((before < top_p[:, None]) | (rank == 0))
            vals = jnp.where(keep, vals, -jnp.inf)
            choice = jax.vmap(jax.random.categorical)(keys, vals)
            sampled = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
        else:
            sampled = jax.vmap(jax.random.categorical)(keys, scaled)
        tokens = jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    if num_top:
        top_l, top_ids = jax.lax.top_k(logits, num_top)
        top_lp = top_l - lse[:, None]
    else:
        top_lp = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return tokens, chosen, top_ids.astype(jnp.int32), top_lp


def _argmax(logits: jax.Array) -> jax.Array:
    return jax.lax.top_k(logits, 1)[1][:, 0].astype(jnp.int32)
