"""Offline admission by shared prefix: twins run together, after their prefix is cached.

Offline batches repeat one instruction in front of many items. Two rules make the prefix
cache pay off for them (online order is never touched):
- `order`: the waiting offline queue is regrouped so that requests whose first KV block
  is the same (same salt, same first `block_size` tokens) are admitted together, groups in
  the order their first member arrived, members in queue order; one batch's instruction
  then stays resident while its items run.
- `held`: a waiting request whose group has a member still prefilling a prefix the two
  share, not yet cached, waits for that member to commit it (then it hits instead of
  computing the same blocks at once); it waits at most `hold_s` seconds from its arrival,
  so a group never starves.

Called by the scheduler on the engine's step-loop thread; reads sequences (and extends
their key chains), mutates nothing else.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from conserve_jax.kv.prefix_hash import extend_chain
from conserve_jax.request import Sequence


class PrefixGroups:
    def __init__(self, block_size: int, hold_s: float) -> None:
        self.block_size = block_size
        self.hold_s = hold_s

    def key(self, seq: Sequence) -> Optional[bytes]:
        """The key of `seq`'s first full prompt block, or None (prompt shorter than a block,
        or sequences without a key root, i.e. prefix caching off)."""
        if not seq.cache_root or seq.prompt_len <= self.block_size:
            return None
        return extend_chain(seq.block_hashes, seq.cache_root, seq.token_ids,
                            self.block_size, 1)[0]

    def order(self, seqs: list[Sequence]) -> list[Sequence]:
        """`seqs` (a waiting queue in order) with each prefix group gathered at the place of
        its first member."""
        groups: dict = {}
        out: list[list[Sequence]] = []
        for s in seqs:
            k = self.key(s)
            if k is None:
                out.append([s])
            elif k in groups:
                groups[k].append(s)
            else:
                groups[k] = [s]
                out.append(groups[k])
        return [s for g in out for s in g]

    def leaders(self, running: list[Sequence]) -> dict:
        """Group key -> running offline sequences still prefilling their prompt."""
        out: dict = {}
        for s in running:
            if not s.online and s.num_computed < s.prompt_len:
                k = self.key(s)
                if k is not None:
                    out.setdefault(k, []).append(s)
        return out

    def held(self, seq: Sequence, leaders: dict, cached_blocks: Callable[[Sequence], int],
             now: Optional[float] = None) -> bool:
        """Should waiting `seq` wait for a leader of its group? Only if a leader is still
        computing blocks the two share that are not cached yet (`cached_blocks(seq)`: how
        many leading blocks of `seq`'s prompt are cached now), and `seq` has waited less
        than `hold_s`."""
        k = self.key(seq)
        if k is None or k not in leaders:
            return False
        now = time.monotonic() if now is None else now
        if now - seq.arrival >= self.hold_s:
            return False
        bs = self.block_size
        mine = extend_chain(seq.block_hashes, seq.cache_root, seq.token_ids, bs,
                            (seq.prompt_len - 1) // bs)
        have = cached_blocks(seq)
        for lead in leaders[k]:
            theirs = extend_chain(lead.block_hashes, lead.cache_root, lead.token_ids, bs,
                                  (lead.prompt_len - 1) // bs)
            shared = 0
            for a, b in zip(mine, theirs):
                if a != b:
                    break
                shared += 1
            if shared > have and lead.num_computed < shared * bs:
                return True
        return False
