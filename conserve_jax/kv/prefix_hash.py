"""Content keys of full KV blocks: a hash chain over token ids.

The key of block i of a sequence is blake2b(key of block i-1, the block's token ids); the
chain starts at a root key made of what the KV depends on beyond the tokens (the model
and its weights, dtypes, block size) and a salt (the tenant, unless the operator shares
the cache across tenants). Equal keys therefore mean equal KV, and a salted request never
finds another salt's blocks. A cryptographic hash, not Python's `hash()`: the keys are the
same in every process, so several processes (or a restarted one) agree on them.

Pure functions on plain Python data; any thread.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional, Sequence

import numpy as np

_DIGEST = 16  # bytes; 128-bit keys


def root_key(fingerprint: dict, salt: Optional[str] = None) -> bytes:
    """The chain's start for one KV layout (`fingerprint`: JSON-able) and one salt."""
    doc = json.dumps({"layout": fingerprint, "salt": salt}, sort_keys=True, default=str)
    return hashlib.blake2b(doc.encode(), digest_size=_DIGEST).digest()


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=_DIGEST)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def extend_chain(chain: list[bytes], root: bytes, token_ids: Sequence[int], block_size: int,
                 num_blocks: int) -> list[bytes]:
    """Append to `chain` (keys of the first len(chain) blocks of `token_ids`) the keys of
    blocks up to `num_blocks` (each must be full); returns `chain`."""
    for i in range(len(chain), num_blocks):
        parent = chain[i - 1] if i else root
        chain.append(block_key(parent, token_ids[i * block_size: (i + 1) * block_size]))
    return chain
