"""KV reservation and lending bookkeeping ("KV pipelining"), in blocks.

Plain Python, no device state, no knowledge of sequences: holders are opaque hashable keys.
Owned by one scheduling policy on the engine's step-loop thread (no locks).

- A *reservation* (claim) is the number of blocks a holder has been promised: enough for
  its prompt and its predicted response. The holder normally holds them physically (the
  policy allocates them up front), so growing inside the reservation cannot fail.
- A *loan* moves the top `blocks` of an owner's reservation that it will not touch for a
  while to a borrower predicted to finish before the owner gets there. While a loan is
  outstanding the owner physically holds `claim - lent` blocks; its claim is unchanged.
- A loan ends by being *returned* (the borrower finished or was evicted and the owner took
  its blocks back) or *recalled* (the owner was about to need them and the borrower was
  preempted to free them). Either way the owner holds its full claim again before it
  writes past `claim - lent` blocks: the policy checks `due` before every iteration.
- An owner that finishes or loses its reservation *forgives* its loans (nothing to return).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable


@dataclass
class Loan:
    owner: Hashable
    borrower: Hashable
    blocks: int


@dataclass
class ReservationCounters:
    reservations: int = 0  # reservations made
    grown: int = 0  # reservations enlarged because a request outlived its prediction
    shrunk_blocks: int = 0  # unused reserved blocks taken back for others (not lent)
    loans: int = 0
    lent_blocks: int = 0
    returned_blocks: int = 0  # by borrowers that finished or were evicted
    recalled_blocks: int = 0  # by preempting a borrower before its owner needed them
    forgiven_blocks: int = 0  # the owner ended first


class ReservationLedger:
    def __init__(self) -> None:
        self._claims: dict = {}
        self._loans: list[Loan] = []
        self.counters = ReservationCounters()

    # ---- reservations -------------------------------------------------------------------
    def claim(self, key: Hashable) -> int:
        return self._claims.get(key, 0)

    def has(self, key: Hashable) -> bool:
        return key in self._claims

    def holders(self) -> list:
        return list(self._claims)

    def reserve(self, key: Hashable, blocks: int) -> None:
        """Set `key`'s reservation (a new one, or a fresh one after it was dropped)."""
        if blocks < 0:
            raise ValueError("a reservation cannot be negative")
        if key not in self._claims:
            self.counters.reservations += 1
        self._claims[key] = blocks

    def grow(self, key: Hashable, blocks: int) -> None:
        """Enlarge `key`'s reservation to `blocks` (a misprediction)."""
        if blocks > self._claims.get(key, 0):
            self._claims[key] = blocks
            self.counters.grown += 1

    def shrink(self, key: Hashable, blocks: int) -> None:
        """Lower `key`'s reservation to `blocks` (never below what it has lent out): its
        unused top was given to someone else outright."""
        old = self._claims.get(key, 0)
        blocks = max(blocks, self.lent(key))
        if blocks < old:
            self._claims[key] = blocks
            self.counters.shrunk_blocks += old - blocks

    def drop(self, key: Hashable) -> list[Loan]:
        """`key` finished or lost its KV: forget its reservation, forgive what it lent, and
        end what it borrowed. Returns the loans `key` had borrowed (now returned): the
        caller gives their owners the blocks back."""
        self._claims.pop(key, None)
        self.forgive(key)
        back = [ln for ln in self._loans if ln.borrower == key]
        for ln in back:
            self._end(ln, recalled=False)
        return back

    # ---- loans --------------------------------------------------------------------------
    def lent(self, owner: Hashable) -> int:
        return sum(ln.blocks for ln in self._loans if ln.owner == owner)

    def loans_of(self, owner: Hashable) -> list[Loan]:
        return [ln for ln in self._loans if ln.owner == owner]

    def borrowed(self, borrower: Hashable) -> list[Loan]:
        return [ln for ln in self._loans if ln.borrower == borrower]

    def loans(self) -> list[Loan]:
        return list(self._loans)

    def lend(self, owner: Hashable, borrower: Hashable, blocks: int) -> Loan:
        if owner == borrower or blocks <= 0:
            raise ValueError("a loan needs two holders and at least one block")
        if self.lent(owner) + blocks > self.claim(owner):
            raise ValueError("cannot lend more than the owner's reservation")
        ln = Loan(owner, borrower, blocks)
        self._loans.append(ln)
        self.counters.loans += 1
        self.counters.lent_blocks += blocks
        return ln

    def settle(self, loan: Loan, recalled: bool) -> None:
        """The owner has its `loan.blocks` back (returned, or recalled from the borrower)."""
        self._end(loan, recalled)

    def forgive(self, owner: Hashable) -> None:
        for ln in [ln for ln in self._loans if ln.owner == owner]:
            self._loans.remove(ln)
            self.counters.forgiven_blocks += ln.blocks

    def _end(self, ln: Loan, recalled: bool) -> None:
        self._loans.remove(ln)
        if recalled:
            self.counters.recalled_blocks += ln.blocks
        else:
            self.counters.returned_blocks += ln.blocks

    # ---- totals -------------------------------------------------------------------------
    def unused(self, held: dict, needed: dict) -> int:
        """Reserved-but-unused blocks: for each holder, what it holds beyond what it has
        written (`held[key]`, `needed[key]` in blocks; holders missing count 0)."""
        return sum(max(0, held.get(k, 0) - needed.get(k, 0)) for k in self._claims)

    def outstanding(self) -> int:
        return sum(ln.blocks for ln in self._loans)

    def check(self, held: dict, capacity: int, keys: Iterable = ()) -> None:
        """Raise AssertionError unless the books balance: every loan's parties hold
        reservations, no owner lent more than it reserved, owners hold exactly
        `claim - lent` blocks or more (`held`, keyed by holder; `keys` limits the check),
        and held blocks fit in `capacity`."""
        for ln in self._loans:
            assert ln.owner in self._claims and ln.borrower in self._claims, ln
        for k in (keys or self._claims):
            assert self.lent(k) <= self.claim(k), (k, self.lent(k), self.claim(k))
        assert sum(held.values()) <= capacity, (sum(held.values()), capacity)
