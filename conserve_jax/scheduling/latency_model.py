"""Iteration latency model: predicted seconds of one iteration from the work in it.

ConServe-style separate terms, fitted by least squares on profiled iterations:

    t = c0 + c_tok * T + c_dec_ctx * (Dc * L) + c_pre_ctx * (T * Bp * L)
          + c_chunk * T^2 + c_rows * S

where T is the token bucket (decode and prefill rows on one axis), Dc = min(T,
max_num_seqs) the rows of the decode part of attention (counted when there are decodes),
L the context each row reads from the cache (whole attention chunks up to the longest
context, `BucketSet.blocks_read`; for a prefill chunk, the context before it), Bp the
prefill sequences per iteration (counted when there is a prefill), T^2 the causal
attention inside the chunks (query blocks against the token axis), S the sampled rows
(padded: `BucketSet.sample_rows`). Features are taken on the *bucketed* shapes because
that is the work the device really does. The
engine corrects the fit online with a multiplicative factor (an exponential average of
measured / predicted). Pure host code; the scheduler (step-loop
thread) calls `predict` many times per iteration, so it is cheap.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from scipy.optimize import nnls

from conserve_jax.runtime.buckets import BucketSet, bucket_for

FEATURES = ("const", "tokens", "decode_context", "prefill_context", "prefill_chunk_sq",
            "sample_rows")


@dataclass
class WorkShape:
    """Unpadded work of an iteration (what the scheduler knows while planning)."""

    num_decodes: int = 0
    prefill_tokens: int = 0
    prefill_seqs: int = 0
    max_context: int = 0  # longest context read from the cache (prefill: before the chunk)
    sample_rows: int = 0

    def add_decode(self, context: int) -> "WorkShape":
        return WorkShape(self.num_decodes + 1, self.prefill_tokens, self.prefill_seqs,
                         max(self.max_context, context), self.sample_rows + 1)

    def add_prefill(self, n: int, context: int, samples: bool) -> "WorkShape":
        """A chunk of n tokens ending at `context` (so it reads context - n from the cache)."""
        return WorkShape(self.num_decodes, self.prefill_tokens + n, self.prefill_seqs + 1,
                         max(self.max_context, context - n), self.sample_rows + int(samples))


def features(w: WorkShape, buckets: BucketSet, block_size: int) -> np.ndarray:
    T = bucket_for(max(1, w.num_decodes + w.prefill_tokens), buckets.tokens)
    L = buckets.blocks_read(-(-w.max_context // block_size)) * block_size
    dec = buckets.decode_rows_read(T, w.num_decodes) * L
    pre = T * buckets.max_prefill_seqs * L if w.prefill_seqs else 0
    S = buckets.sample_rows(T) if w.sample_rows else 0
    return np.array([1.0, T, dec, pre, T * T, S], np.float64)


@dataclass
class LatencyModel:
    coef: np.ndarray
    buckets: BucketSet
    block_size: int
    num_layers: int
    correction: float = 1.0
    alpha: float = 0.05  # weight of one new measurement in the online correction
    clamp: float = 4.0  # one measurement counts as at most clamp x (at least 1/clamp x) predicted
    fit_error: dict = field(default_factory=dict)  # relative errors on held-out points

    def predict(self, w: WorkShape) -> float:
        return float(max(0.0, features(w, self.buckets, self.block_size) @ self.coef)) * self.correction

    def observe(self, w: WorkShape, measured_s: float) -> None:
        """Online correction from a measured iteration (step-loop thread)."""
        base = float(features(w, self.buckets, self.block_size) @ self.coef)
        if base > 0 and measured_s > 0:
            ratio = min(self.clamp, max(1.0 / self.clamp, measured_s / base))
            self.correction = (1 - self.alpha) * self.correction + self.alpha * ratio

    # ---- fitting ------------------------------------------------------------------------
    @classmethod
    def fit(cls, samples: Iterable[tuple[WorkShape, float]], buckets: BucketSet,
            block_size: int, num_layers: int, holdout_every: int = 4) -> "LatencyModel":
        """Least squares on relative error (rows weighted by 1/t), non-negative terms;
        every `holdout_every`-th sample is held out to report the fit's error."""
        samples = list(samples)
        train = [s for i, s in enumerate(samples) if i % holdout_every != holdout_every - 1]
        test = [s for i, s in enumerate(samples) if i % holdout_every == holdout_every - 1]
        coef = _nnls_relative(train, buckets, block_size)
        m = cls(coef, buckets, block_size, num_layers)
        errs = [abs(m.predict(w) - t) / t for w, t in (test or train)]
        m.fit_error = {"held_out_points": len(test), "median_rel_error": float(np.median(errs)),
                       "p90_rel_error": float(np.percentile(errs, 90)),
                       "max_rel_error": float(np.max(errs))}
        return m

    def to_json(self) -> dict:
        return {"features": list(FEATURES), "coef": [float(c) for c in self.coef],
                "block_size": self.block_size, "num_layers": self.num_layers,
                "fit_error": self.fit_error}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)

    @classmethod
    def load(cls, path: str, buckets: BucketSet, block_size: int, num_layers: int) -> "LatencyModel":
        with open(path) as f:
            d = json.load(f)
        if d.get("features") != list(FEATURES):
            raise ValueError(f"{path}: latency model features {d.get('features')} != {FEATURES}")
        if d.get("num_layers") != num_layers:
            raise ValueError(f"{path} was profiled for {d.get('num_layers')} layers, "
                             f"this model has {num_layers}")
        return cls(np.asarray(d["coef"], np.float64), buckets, block_size, num_layers,
                   fit_error=d.get("fit_error", {}))


def _nnls_relative(samples, buckets: BucketSet, block_size: int) -> np.ndarray:
    """Non-negative least squares on relative error: rows scaled by 1/t, target 1."""
    X = np.stack([features(w, buckets, block_size) for w, _ in samples])
    y = np.array([t for _, t in samples])
    coef, _ = nnls(X / y[:, None], np.ones_like(y))
    return coef
