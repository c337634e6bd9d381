"""Deterministic synthetic prompts.

Prompts are token ids drawn uniformly from [low, high) with a generator seeded by
(seed, stream, index): the same run options give the same prompts, online request i and
offline request i differ (`stream` 0 and 1), and prompts do not share prefixes (so a
prefix cache cannot make the replay cheaper than the trace). The default range [100, 250)
avoids the special tokens at the bottom of common vocabularies and fits any vocabulary of
at least 250 ids.
"""
from __future__ import annotations

import numpy as np

DEFAULT_TOKEN_RANGE = (100, 250)
ONLINE, OFFLINE = 0, 1


def prompt_token_ids(length: int, index: int, *, seed: int = 0, stream: int = ONLINE,
                     token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> list[int]:
    """`length` (>= 1) token ids for request `index` of `stream`."""
    low, high = token_range
    if not 0 <= low < high:
        raise ValueError(f"token id range must satisfy 0 <= low < high, got {token_range}")
    rng = np.random.default_rng([int(seed), int(stream), int(index)])
    return rng.integers(low, high, size=max(1, int(length))).tolist()
