"""Azure LLM inference trace (2023 format) reading and shaping.

The CSV has a header with `TIMESTAMP, ContextTokens, GeneratedTokens` (matched case-
insensitively). TIMESTAMP is either a date-time `YYYY-MM-DD HH:MM:SS[.fraction]` (any
number of fraction digits, as in the published trace) or a plain number of seconds.
Rows are returned sorted by time, with arrival times in seconds relative to the first
row of the file.

Shaping, in the order `load_trace` applies it:
1. `window(start_s, length_s)`: keep rows with start <= t < start + length, re-based to 0.
2. `scale_rate(x)`: arrival times divided by x (x = 2 doubles the request rate, keeping the
   shape of the bursts).
3. `scale_tokens(x, max_context)`: token counts multiplied by x and rounded (at least 1
   each), then clamped so that prompt + output <= max_context (see `clamp_to_context`).
"""
from __future__ import annotations

import csv
import datetime as _dt
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: when to send it (seconds from the start of the run),
    how many prompt tokens to send and how many output tokens to force."""

    arrival_s: float
    input_len: int
    output_len: int


_COLUMNS = ("timestamp", "contexttokens", "generatedtokens")


def _parse_time(text: str) -> tuple[int, float]:
    """(whole seconds since the epoch, fraction) for a date-time (naive = UTC), or
    (0, value) for a plain number. Kept apart so that sub-microsecond differences survive
    the subtraction of the first time stamp."""
    text = text.strip()
    try:
        return 0, float(text)
    except ValueError:
        pass
    whole, _, frac = text.partition(".")
    stamp = _dt.datetime.strptime(whole.replace("T", " "), "%Y-%m-%d %H:%M:%S")
    seconds = int(stamp.replace(tzinfo=_dt.timezone.utc).timestamp())
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds in TIMESTAMP {text!r}")
    return seconds, (int(frac) / 10 ** len(frac) if frac else 0.0)


def read_azure_trace(path: str, limit: Optional[int] = None) -> list[RequestSpec]:
    """Read the trace at `path` (at most `limit` data rows if given).

    Raises ValueError naming the column or line when the file does not have the expected
    shape. Token counts below 1 are raised to 1 (an empty prompt cannot be sent).
    """
    specs: list[tuple[tuple[int, float], int, int]] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty trace file")
        names = [h.strip().lower() for h in header]
        try:
            cols = [names.index(c) for c in _COLUMNS]
        except ValueError:
            raise ValueError(f"{path}: header must contain TIMESTAMP, ContextTokens, "
                             f"GeneratedTokens; got {header}") from None
        for lineno, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if limit is not None and len(specs) >= limit:
                break
            try:
                t = _parse_time(row[cols[0]])
                n_in, n_out = int(row[cols[1]]), int(row[cols[2]])
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{lineno}: bad row {row}: {e}") from None
            specs.append((t, max(1, n_in), max(1, n_out)))
    if not specs:
        return []
    specs.sort(key=lambda s: s[0])
    (w0, f0) = specs[0][0]
    return [RequestSpec((w - w0) + (f - f0), n_in, n_out) for (w, f), n_in, n_out in specs]


def window(specs: Sequence[RequestSpec], start_s: float = 0.0,
           length_s: Optional[float] = None) -> list[RequestSpec]:
    """Rows with start_s <= arrival < start_s + length_s (no upper bound if None),
    re-based so that `start_s` becomes time 0."""
    end = float("inf") if length_s is None else start_s + length_s
    return [replace(s, arrival_s=s.arrival_s - start_s)
            for s in specs if start_s <= s.arrival_s < end]


def scale_rate(specs: Sequence[RequestSpec], rate_scale: float) -> list[RequestSpec]:
    """Multiply the arrival rate by `rate_scale` (> 0): arrival times are divided by it."""
    if not rate_scale > 0:
        raise ValueError(f"rate scale must be > 0, got {rate_scale}")
    return [replace(s, arrival_s=s.arrival_s / rate_scale) for s in specs]


def clamp_to_context(input_len: int, output_len: int, max_context: int) -> tuple[int, int]:
    """Shrink (input, output) so that input + output <= max_context (>= 2).

    Both are scaled down by the same factor (keeping the request's prompt/output ratio),
    each kept >= 1; any rounding excess is then taken from the larger of the two.
    """
    if max_context < 2:
        raise ValueError(f"max context must be >= 2, got {max_context}")
    input_len, output_len = max(1, int(input_len)), max(1, int(output_len))
    total = input_len + output_len
    if total <= max_context:
        return input_len, output_len
    f = max_context / total
    input_len, output_len = max(1, int(input_len * f)), max(1, int(output_len * f))
    while input_len + output_len > max_context:
        if input_len >= output_len:
            input_len -= 1
        else:
            output_len -= 1
    return input_len, output_len


def scale_tokens(specs: Iterable[RequestSpec], token_scale: float = 1.0,
                 max_context: Optional[int] = None) -> list[RequestSpec]:
    """Multiply token counts by `token_scale` (> 0, rounded, >= 1), then clamp each request
    to `max_context` with `clamp_to_context` (no clamp if None)."""
    if not token_scale > 0:
        raise ValueError(f"token scale must be > 0, got {token_scale}")
    out = []
    for s in specs:
        n_in = max(1, round(s.input_len * token_scale))
        n_out = max(1, round(s.output_len * token_scale))
        if max_context is not None:
            n_in, n_out = clamp_to_context(n_in, n_out, max_context)
        out.append(RequestSpec(s.arrival_s, n_in, n_out))
    return out


def load_trace(path: str, *, start_s: float = 0.0, window_s: Optional[float] = None,
               rate_scale: float = 1.0, token_scale: float = 1.0,
               max_context: Optional[int] = None) -> list[RequestSpec]:
    """Read, window, rate-scale and token-scale a trace, in that order (see module doc).

    `start_s`/`window_s` are in the trace's own time (before rate scaling).
    """
    specs = window(read_azure_trace(path), start_s, window_s)
    return scale_tokens(scale_rate(specs, rate_scale), token_scale, max_context)
