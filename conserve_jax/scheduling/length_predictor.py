"""Response-length (RL) predictor: how many tokens a request will generate, learned online.

Contract: plain Python, no locks; one instance belongs to one policy and is used only by
the engine's step-loop thread (`features`/`predict` at arrival, `observe` when a request
finishes, `extend` when a running request outlives its prediction). Every call costs
microseconds on a CPU (a few dict look-ups and a sort of at most `window` integers).

Features, taken from what a request looks like at arrival:
- the user's own content, not the shared prefix: prompts are cut into `granularity`-token
  pieces whose running hashes are counted; the longest leading run of pieces that at least
  `min_share` earlier prompts also began with (a system prompt, a chat template, the
  earlier turns of a conversation) is skipped. What follows is the content;
- the content's length (half-octave bucket) and its first `first_words` tokens (hashed);
- `max_tokens` (octave bucket) and the tenant (any hashable, None for "unknown").
Per feature bucket the predictor keeps the last `window` observed lengths; a prediction
uses the most specific bucket holding at least `min_samples` of them, falling back to
coarser ones (tenant + length, tenant, all requests). The point estimate is the bucket's
median; the reservation size is its `confidence` quantile.

A hint (`expected_output_tokens`) is a prior, not the truth: the predictor learns the
ratio actual / hint over hinted requests, scales the hint by the median ratio, and blends
it with the bucket estimate in log space weighted by each source's observed dispersion
(its median absolute log error), so a reliable hint dominates and a noisy one does not.

Error statistics (`stats`) compare every point prediction made at arrival with the length
finally generated: mean absolute error, the fraction within +-25%, and the same error of
the "always predict the running mean" baseline evaluated at the same moments.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence


@dataclass
class PredictorConfig:
    confidence: float = 0.8  # quantile used to size reservations
    window: int = 64  # observations kept per bucket
    min_samples: int = 4  # a bucket is used once it holds this many
    granularity: int = 4  # tokens per prefix piece
    prefix_depth: int = 512  # prefix tokens considered for the shared-prefix skip
    min_share: int = 3  # prompts that must share a prefix for it to be skipped
    share_frac: float = 0.5  # ... and this fraction of all prompts seen (a template, not a task)
    first_words: int = 3
    default_length: int = 128  # before anything has been observed (capped by max_tokens)
    max_prefix_entries: int = 200_000  # prune single-use prefix hashes beyond this


@dataclass
class Features:
    """What `features` extracted from one request (kept by the caller until `observe`)."""

    keys: tuple  # bucket keys, most specific first
    max_tokens: int
    hint: Optional[int]
    content_start: int  # tokens of shared prefix skipped
    baseline: float  # the running-mean baseline's prediction at arrival
    point: Optional[int] = None  # the prediction made at arrival (for error stats)


@dataclass
class Prediction:
    point: int  # median estimate of generated tokens
    high: int  # the `confidence` quantile: what a reservation should cover
    source: str  # which bucket level (or "hint", "default") decided


@dataclass
class PredictorStats:
    observed: int = 0
    abs_err_sum: float = 0.0
    within_25: int = 0
    baseline_abs_err_sum: float = 0.0

    @property
    def mae(self) -> Optional[float]:
        return self.abs_err_sum / self.observed if self.observed else None

    @property
    def within_25_frac(self) -> Optional[float]:
        return self.within_25 / self.observed if self.observed else None

    @property
    def baseline_mae(self) -> Optional[float]:
        return self.baseline_abs_err_sum / self.observed if self.observed else None


def _quantile(sorted_xs: list, q: float) -> float:
    if len(sorted_xs) == 1:
        return float(sorted_xs[0])
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


class _Bucket:
    __slots__ = ("xs",)

    def __init__(self, window: int) -> None:
        self.xs: deque = deque(maxlen=window)

    def estimate(self, q: float) -> tuple[float, float, float]:
        """(median, q-quantile, median absolute log deviation)."""
        s = sorted(self.xs)
        med = _quantile(s, 0.5)
        lm = math.log(max(med, 1.0))
        dev = sorted(abs(math.log(max(x, 1)) - lm) for x in s)
        return med, _quantile(s, q), _quantile(dev, 0.5)


class LengthPredictor:
    LEVELS = ("words+len", "words", "len", "tenant", "all")

    def __init__(self, config: Optional[PredictorConfig] = None) -> None:
        self.cfg = config or PredictorConfig()
        self._buckets: dict = {}
        self._prefix_counts: dict = {}
        self._prompts_seen = 0
        self._hint_ratios: deque = deque(maxlen=self.cfg.window)  # actual / hint
        self._mean_sum = 0.0
        self._mean_n = 0
        self.stats = PredictorStats()

    # ---- features ---------------------------------------------------------------------------
    def _content_start(self, ids: Sequence[int], register: bool = True) -> int:
        """Skip the longest prefix (in whole pieces) that `min_share - 1` earlier prompts
        began with; register this prompt's pieces for later prompts (unless `register` is
        False: the prompt was registered before). Never skips the whole prompt (at least
        one piece of content is kept)."""
        g, counts = self.cfg.granularity, self._prefix_counts
        limit = min(self.cfg.prefix_depth, len(ids) - 1)
        h, skip, sharing = 0, 0, True
        need = max(self.cfg.min_share - 1, self.cfg.share_frac * self._prompts_seen)
        self._prompts_seen += int(register)
        for end in range(g, limit + 1, g):
            h = hash((h, tuple(ids[end - g: end])))
            c = counts.get(h, 0)
            if sharing and c >= need:
                skip = end
            else:
                sharing = False
            if register:
                counts[h] = c + 1
        if len(counts) > self.cfg.max_prefix_entries:
            self._prefix_counts = {k: v for k, v in counts.items() if v > 1}
        return skip

    def features(self, prompt_ids: Sequence[int], max_tokens: int, tenant: Hashable = None,
                 hint: Optional[int] = None, register: bool = True) -> Features:
        """Extract the request's features (registers its prefix for the shared-prefix skip
        unless `register` is False: a caller that extracted them before, at submit, and
        extracts them again to observe the actual length)."""
        start = self._content_start(prompt_ids, register)
        n = len(prompt_ids) - start
        words = hash(tuple(prompt_ids[start: start + self.cfg.first_words]))
        lb = int(2 * math.log2(n + 1))
        mb = int(math.log2(max(1, max_tokens)))
        keys = (("wl", tenant, words, lb, mb), ("w", tenant, words), ("l", tenant, lb, mb),
                ("t", tenant), ("a",))
        base = self._mean_sum / self._mean_n if self._mean_n else float(
            min(self.cfg.default_length, max_tokens))
        return Features(keys, max(1, int(max_tokens)), hint, start, min(base, max_tokens))

    # ---- prediction ---------------------------------------------------------------------------
    def _bucket_estimate(self, f: Features):
        for level, key in zip(self.LEVELS, f.keys):
            b = self._buckets.get(key)
            if b is not None and len(b.xs) >= self.cfg.min_samples:
                return (level,) + b.estimate(self.cfg.confidence)
        return None

    def predict(self, f: Features) -> Prediction:
        """Point estimate and reservation size, both in [1, max_tokens]. Records the point
        estimate in `f` for the error statistics."""
        q = self.cfg.confidence
        est = self._bucket_estimate(f)
        if f.hint is not None and f.hint > 0:
            if len(self._hint_ratios) >= self.cfg.min_samples:
                r = sorted(self._hint_ratios)
                scale, high_scale = _quantile(r, 0.5), _quantile(r, q)
                hdev = _quantile(sorted(abs(math.log(x / scale)) for x in r), 0.5)
            else:
                scale, high_scale, hdev = 1.0, 1.25, 0.25  # the hint is trusted moderately at first
            hp, hh = f.hint * scale, f.hint * max(high_scale, scale)
            if est is None:
                point, high, source = hp, hh, "hint"
            else:
                _, bp, bh, bdev = est
                wh, wb = 1.0 / (hdev ** 2 + 1e-3), 1.0 / (bdev ** 2 + 1e-3)
                mix = lambda a, b: math.exp((wh * math.log(max(a, 1)) + wb * math.log(max(b, 1)))
                                            / (wh + wb))
                point, high, source = mix(hp, bp), mix(hh, bh), "hint+" + est[0]
        elif est is not None:
            source, point, high, _ = est
        else:
            point = high = min(self.cfg.default_length, f.max_tokens)
            source = "default"
        clamp = lambda x: int(min(f.max_tokens, max(1, round(x))))
        p = Prediction(clamp(point), clamp(max(high, point)), source)
        f.point = p.point
        return p

    def extend(self, f: Features, generated: int) -> int:
        """A running request has generated `generated` tokens, at or past its reservation:
        the new total to reserve for — the `confidence` quantile of the lengths its bucket
        saw beyond `generated`, or 1.5x `generated` when none is known. In
        (generated, max_tokens] unless max_tokens is already reached."""
        longer = []
        for key in f.keys:
            b = self._buckets.get(key)
            if b is not None:
                longer = sorted(x for x in b.xs if x > generated)
                if len(longer) >= self.cfg.min_samples:
                    break
        guess = _quantile(longer, self.cfg.confidence) if longer else generated * 1.5 + 8
        return int(min(f.max_tokens, max(generated + 1, math.ceil(guess))))

    # ---- learning -----------------------------------------------------------------------------
    def observe(self, f: Features, actual: int) -> None:
        """A request finished after generating `actual` tokens (cancelled or failed requests
        should not be observed: their length says nothing about the answer)."""
        actual = max(1, int(actual))
        for key in f.keys:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = _Bucket(self.cfg.window)
            b.xs.append(actual)
        if f.hint:
            self._hint_ratios.append(actual / f.hint)
        self._mean_sum += actual
        self._mean_n += 1
        if f.point is not None:
            err = abs(f.point - actual)
            self.stats.observed += 1
            self.stats.abs_err_sum += err
            self.stats.within_25 += err <= 0.25 * actual
            self.stats.baseline_abs_err_sum += abs(f.baseline - actual)
