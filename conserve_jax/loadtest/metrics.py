"""Latency metrics of online requests, measured on the client.

All times are seconds from the start of the run (`time.perf_counter()` based).

- TTFT: first token-bearing chunk's arrival minus the moment the request was sent.
- ITL (inter-token latency): gaps between consecutive token-bearing chunks. A chunk that
  carries k > 1 tokens after a gap g contributes k samples of g / k (the gap is divided
  evenly). Tokens that arrive in the same chunk as the first token carry no ITL sample
  (their latency is part of TTFT).
- TPOT: (E2E - TTFT) / (output_tokens - 1), per request; undefined for one output token.
- E2E: last chunk's arrival (the finished one) minus the moment the request was sent.

Statistics are mean and p50/p90/p99 by `numpy.percentile` (linear interpolation). TTFT,
TPOT and E2E stats are per successful request; ITL stats pool every sample of every
successful request. A request "meets the SLO" if it succeeded, its TTFT <= slo_ttft (when
set) and its TPOT <= slo_tpot (when set; a one-token request meets any TPOT objective).
SLO attainment = requests meeting the SLO / requests issued (failed ones count as misses);
goodput = requests meeting the SLO / duration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the runner observed for one online request.

    `scheduled_s`: when the workload wanted it sent; `sent_s`: when it was (later if the
    concurrency limit held it back). `chunk_times`/`chunk_tokens`: arrival time and token
    count of every token-bearing chunk. `error`: None on success, else a status code name
    (e.g. "UNAVAILABLE", "DEADLINE_EXCEEDED") or an exception type name.
    """

    index: int
    scheduled_s: float
    input_len: int
    expected_output_len: int
    sent_s: float = 0.0
    end_s: Optional[float] = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    error_message: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None

    @property
    def output_tokens(self) -> int:
        return int(sum(self.chunk_tokens))

    @property
    def ttft(self) -> Optional[float]:
        return self.chunk_times[0] - self.sent_s if self.chunk_times else None

    @property
    def e2e(self) -> Optional[float]:
        return None if self.end_s is None else self.end_s - self.sent_s

    @property
    def tpot(self) -> Optional[float]:
        n, ttft, e2e = self.output_tokens, self.ttft, self.e2e
        if n < 2 or ttft is None or e2e is None:
            return None
        return (e2e - ttft) / (n - 1)

    def itl(self) -> list[float]:
        """Inter-token latencies (see module doc for multi-token chunks)."""
        out: list[float] = []
        for i in range(1, len(self.chunk_times)):
            k = self.chunk_tokens[i]
            if k > 0:
                out.extend([(self.chunk_times[i] - self.chunk_times[i - 1]) / k] * k)
        return out


def stats(values: Sequence[float]) -> dict:
    """{"count", "mean", "p50", "p90", "p99", "max"}; the numbers are None when empty."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {"count": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    pct = np.percentile(arr, PERCENTILES)
    return {"count": int(arr.size), "mean": float(arr.mean()),
            **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)}, "max": float(arr.max())}


def meets_slo(r: RequestRecord, slo_ttft: Optional[float], slo_tpot: Optional[float]) -> bool:
    """True if `r` succeeded and is within both objectives (None = no objective)."""
    if not r.ok:
        return False
    if slo_ttft is not None and (r.ttft is None or r.ttft > slo_ttft):
        return False
    tpot = r.tpot
    if slo_tpot is not None and tpot is not None and tpot > slo_tpot:
        return False
    return True


def errors_by_code(records: Iterable[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            counts[r.error] = counts.get(r.error, 0) + 1
    return dict(sorted(counts.items()))


def summarize_online(records: Sequence[RequestRecord], duration_s: float,
                     slo_ttft: Optional[float] = None,
                     slo_tpot: Optional[float] = None) -> dict:
    """The online part of the report (see `report.SCHEMA` for the fields)."""
    ok = [r for r in records if r.ok]
    good = sum(meets_slo(r, slo_ttft, slo_tpot) for r in records)
    out_tokens = sum(r.output_tokens for r in ok)
    dur = max(float(duration_s), 1e-9)
    return {
        "issued": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors_by_code": errors_by_code(records),
        "output_len_mismatches": sum(r.output_tokens != r.expected_output_len for r in ok),
        "input_tokens": int(sum(r.input_len for r in ok)),
        "output_tokens": int(out_tokens),
        "request_throughput": len(ok) / dur,
        "output_tokens_per_s": out_tokens / dur,
        "ttft_s": stats([r.ttft for r in ok]),
        "tpot_s": stats([r.tpot for r in ok]),
        "itl_s": stats([x for r in ok for x in r.itl()]),
        "e2e_s": stats([r.e2e for r in ok]),
        "send_lag_s": stats([r.sent_s - r.scheduled_s for r in records]),
        "slo": {
            "ttft_s": slo_ttft,
            "tpot_s": slo_tpot,
            "met": int(good),
            "attainment": good / len(records) if records else None,
            "goodput_rps": good / dur,
        },
    }
