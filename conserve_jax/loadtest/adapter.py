"""`ClientAdapter`: the small surface of `conserve_jax.entrypoints.client.Client` the runner uses.

The runner talks only to this adapter, so anything with `Client`'s methods can be driven
(the real gRPC client, or `fake.FakeClient` in tests). It normalises what may differ
between implementations: chunk fields read with `getattr`, batch states given as strings,
enums or proto enum numbers, and server stats given as a dict, dataclass or protobuf
message (flattened to `{"name": number}`, nested fields as "outer.inner").

Every unary call carries a deadline (`rpc_timeout_s`), so a stalled server cannot hang
the runner. Thread-safety: whatever the wrapped client offers (gRPC channels are).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

BATCH_STATES = ("unspecified", "queued", "running", "completed", "cancelled", "failed",
                "expired")
TERMINAL_STATES = frozenset({"completed", "cancelled", "failed", "expired"})
FAILED_REASONS = frozenset({"cancelled", "error", "abort", "aborted"})


def error_code(exc: BaseException) -> str:
    """A gRPC status code name (`grpc.RpcError.code().name`) or the exception type name."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            c = code()
            return str(getattr(c, "name", c))
        except Exception:  # an RpcError without status details
            pass
    return type(exc).__name__


def error_message(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        try:
            return str(details())
        except Exception:
            pass
    return str(exc)


def state_name(state: Any) -> str:
    """Lower-case batch state name from a string, an enum, or a proto enum number."""
    if isinstance(state, str):
        s = state.lower()
        return s.removeprefix("batch_state_").removeprefix("state_")
    name = getattr(state, "name", None)
    if isinstance(name, str):
        return state_name(name)
    if isinstance(state, int) and 0 <= state < len(BATCH_STATES):
        return BATCH_STATES[state]
    return str(state).lower()


def flatten_numbers(obj: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric fields of a dict / dataclass / protobuf message / plain object, flattened."""
    if obj is None or depth > 3:
        return {}
    if isinstance(obj, dict):
        items = list(obj.items())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "DESCRIPTOR") and hasattr(obj, "ListFields"):
        items = [(f.name, getattr(obj, f.name)) for f in obj.DESCRIPTOR.fields]
    elif hasattr(obj, "__dict__"):
        items = [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]
    else:
        return {}
    out: dict[str, float] = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = value
        elif not isinstance(value, (str, bytes, list, tuple)):
            out.update(flatten_numbers(value, name + ".", depth + 1))
    return out


class ClientAdapter:
    """Wraps a `Client`-like object (see module doc). Owns it: `close()` closes it."""

    def __init__(self, client: Any, rpc_timeout_s: float = 10.0) -> None:
        self.client = client
        self.rpc_timeout_s = rpc_timeout_s

    def stream(self, token_ids: list[int], max_tokens: int, *, ttft: Optional[float] = None,
               tpot: Optional[float] = None, timeout: Optional[float] = None,
               on_call: Optional[Callable[[Any], None]] = None
               ) -> Iterator[tuple[int, bool, Optional[str]]]:
        """Send one online request with forced output length (ignore_eos) and yield
        (tokens in chunk, finished, finish_reason) per chunk. Errors propagate.

        `on_call` receives the call object first (it may have `cancel()`, which ends the
        RPC; the iteration then raises a CANCELLED error)."""
        kwargs: dict[str, Any] = {"token_ids": token_ids, "max_tokens": int(max_tokens),
                                  "ignore_eos": True, "timeout": timeout}
        if ttft is not None:
            kwargs["ttft"] = ttft
        if tpot is not None:
            kwargs["tpot"] = tpot
        call = self.client.generate(**kwargs)
        if on_call is not None:
            on_call(call)
        for chunk in call:
            ids = getattr(chunk, "token_ids", None) or ()
            yield len(ids), bool(getattr(chunk, "finished", False)), \
                getattr(chunk, "finish_reason", None) or None

    def submit_batch(self, requests: list[dict]) -> str:
        return self.client.submit_batch(requests, timeout=max(60.0, self.rpc_timeout_s))

    def batch_status(self, batch_id: str) -> dict:
        """{"state": lower-case name, "done": int, "total": int, "failed": int}."""
        b = self.client.get_batch(batch_id, timeout=self.rpc_timeout_s)
        return {"state": state_name(getattr(b, "state", "")),
                "done": int(getattr(b, "done", 0) or 0),
                "total": int(getattr(b, "total", 0) or 0),
                "failed": int(getattr(b, "failed", 0) or 0)}

    def batch_results(self, batch_id: str, timeout: Optional[float] = None
                      ) -> Iterator[tuple[int, int, Optional[str]]]:
        """Yield (index, output tokens, finish_reason) per stored result. The server's
        stream waits for unfinished items, so give a `timeout` (an RPC deadline)."""
        for r in self.client.batch_results(batch_id, start=0, timeout=timeout):
            yield (int(getattr(r, "index", -1)), len(getattr(r, "token_ids", None) or ()),
                   getattr(r, "finish_reason", None) or None)

    def cancel_batch(self, batch_id: str) -> bool:
        """Cancel a batch if the client can; False if it cannot."""
        cancel = getattr(self.client, "cancel_batch", None)
        if cancel is None:
            return False
        cancel(batch_id, timeout=self.rpc_timeout_s)
        return True

    def stats(self) -> Optional[dict[str, float]]:
        """Flattened server stats, or None if the call fails (logged)."""
        try:
            return flatten_numbers(self.client.stats(timeout=self.rpc_timeout_s))
        except Exception as e:
            log.warning("server stats unavailable: %s", error_message(e))
            return None

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
