"""The prefix-caching benchmark's workloads and its pure statistics (helpers of `prefix`, run
as scripts/bench_prefix.py). No JAX: the workloads are token-id lists from a seeded numpy RNG
(ids uniform in [5, vocab), as in coserve_workload), the statistics plain arithmetic.

Workloads (every repeat draws new ids from its own seed, so that a later repeat never hits
blocks an earlier one left cached; within a repeat the cache-on and cache-off sides get the
same prompts):
- `shared_prefix_batch`: one instruction of `prefix_len` tokens + `suffix` (MIN, MAX)
  distinct tokens per item, each with its output length (offline batch; co-serving's
  offline batch);
- `random_batch`: independent prompts with lengths uniform in (MIN, MAX) (no sharing);
- `chat_script`: per conversation and turn, the new user tokens (lengths uniform in
  (MIN, MAX)) and the forced answer length; turn k's prompt is turn k-1's prompt + its
  answer (the tokens the model actually generated) + the new user tokens.

`optimal_hit_tokens` is the hit-rate optimum: for each request (in order), the longest
prefix of its prompt, in full blocks, that the computed tokens of an earlier request
(prompt + all but the last output token, whose KV is never computed) share with it, capped
at (prompt length - 1) // block_size blocks (the last prompt token always runs, to sample).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class Item:
    request_id: str
    prompt: list
    output_len: int


@dataclass
class ChatScript:
    users: list  # [conversation][turn] -> new user token ids
    answer_lens: list  # [conversation][turn] -> forced answer length

    @property
    def conversations(self) -> int:
        return len(self.users)

    @property
    def turns(self) -> int:
        return len(self.users[0]) if self.users else 0


def ids(rng: np.random.Generator, n: int, vocab: int) -> list:
    return [int(x) for x in rng.integers(5, vocab, n)]


def _length(rng: np.random.Generator, span) -> int:
    lo, hi = (span, span) if isinstance(span, int) else span
    return int(rng.integers(lo, hi + 1))


def shared_prefix_batch(rng: np.random.Generator, vocab: int, n: int, prefix_len: int,
                        suffix, output, tag: str) -> list:
    """`n` items: one shared `prefix_len`-token instruction + distinct tokens (`suffix`: a
    length or (MIN, MAX)); output lengths `output` (a length or (MIN, MAX))."""
    prefix = ids(rng, prefix_len, vocab)
    return [Item(f"{tag}-{i}", prefix + ids(rng, _length(rng, suffix), vocab),
                 _length(rng, output)) for i in range(n)]


def random_batch(rng: np.random.Generator, vocab: int, n: int, prompt, output,
                 tag: str) -> list:
    """`n` items of independent random prompts (`prompt`: a length or (MIN, MAX))."""
    return [Item(f"{tag}-{i}", ids(rng, _length(rng, prompt), vocab), _length(rng, output))
            for i in range(n)]


def chat_script(rng: np.random.Generator, vocab: int, conversations: int, turns: int,
                user, answer) -> ChatScript:
    users = [[ids(rng, _length(rng, user), vocab) for _ in range(turns)]
             for _ in range(conversations)]
    lens = [[_length(rng, answer) for _ in range(turns)] for _ in range(conversations)]
    return ChatScript(users, lens)


def optimal_hit_tokens(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                       block_size: int) -> list:
    """Per request, in order: the prompt tokens an ideal prefix cache serves (module doc).
    `outputs[j]` are request j's generated tokens (all but the last count as computed)."""
    seen: set = set()
    out = []
    bs = block_size
    for p, o in zip(prompts, outputs):
        cap = (len(p) - 1) // bs
        key: Optional[tuple] = None
        k = 0
        while k < cap:
            key = (hash(key), tuple(p[k * bs:(k + 1) * bs]))
            if key not in seen:
                break
            k += 1
        out.append(k * bs)
        computed = list(p) + list(o)[:-1]
        key = None
        for j in range(len(computed) // bs):
            key = (hash(key), tuple(computed[j * bs:(j + 1) * bs]))
            seen.add(key)
    return out


def describe_lengths(xs: Sequence[int]) -> dict:
    return {"n": len(xs), "mean": round(float(np.mean(xs)), 1) if xs else None,
            "min": min(xs, default=None), "max": max(xs, default=None), "total": int(sum(xs))}


# ---- statistics --------------------------------------------------------------------------
def pct(xs, q) -> Optional[float]:
    """The q-th percentile (numpy linear interpolation) of the non-None values; None if none."""
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) if xs else None


def div(x, y) -> Optional[float]:
    return None if x is None or y is None or y == 0 else x / y


def summarize(runs: list) -> dict:
    """{"median": {...}, "min": {...}, "max": {...}} over repeats of every numeric field of
    the run dicts (None values skipped; a field None in every run stays None)."""
    out: dict = {"median": {}, "min": {}, "max": {}}
    if not runs:
        return out
    for k in runs[0]:
        vals = [r.get(k) for r in runs]
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                   for v in vals):
            continue
        vals = [v for v in vals if v is not None]
        out["median"][k] = float(np.median(vals)) if vals else None
        out["min"][k] = float(min(vals)) if vals else None
        out["max"][k] = float(max(vals)) if vals else None
    return out


def target(description: str, value, threshold, at_least: bool, **extra) -> dict:
    """One target: value, threshold, met (None without a value)."""
    if value is None:
        met = None
    elif isinstance(threshold, bool):
        met = bool(value) == threshold
    else:
        met = bool(value >= threshold if at_least else value <= threshold)
    return {"description": description, "value": value, "threshold": threshold, "met": met,
            **extra}


def fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    return format(v, spec) if isinstance(v, float) else str(v)
