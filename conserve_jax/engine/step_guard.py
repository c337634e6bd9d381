"""`StepGuard`: the failure policy of an engine's step loop, shared by `Engine` and
`MockEngine`.

An exception inside one iteration must not hang streams or kill the loop silently:

- a request the failure can be pinned on (it was in the failed step) gets a strike; when
  the step can be rolled back (nothing committed yet) it is retried, and a second strike
  fails it (finish_reason "error", message `ITERATION_FAILED`; no exception text reaches
  clients, the traceback goes to the log);
- a failure nobody can be blamed for (scheduling, intake) is retried;
- `max_consecutive` failed iterations in a row mean the loop is broken: the engine dies.
  Every open stream then ends with finish_reason "error" and message `ENGINE_STOPPED`,
  `submit` raises RuntimeError, and `EngineAPI.failure` says why, so a server can turn
  unhealthy and exit for its supervisor to restart it.

Used only on the owning engine's step-loop thread (no locking here).
"""
from __future__ import annotations

import logging

from conserve_jax.engine_api import RequestOutput, RequestStream

log = logging.getLogger(__name__)

ITERATION_FAILED = "engine error: an iteration running this request failed"
ENGINE_STOPPED = "engine stopped"


class StepGuard:
    def __init__(self, max_strikes: int = 2, max_consecutive: int = 4) -> None:
        self.max_strikes = max_strikes
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.failed_iterations = 0
        self._strikes: dict[str, int] = {}

    def succeeded(self) -> None:
        """An iteration completed."""
        self.consecutive = 0

    def failed(self) -> bool:
        """Count a failed iteration; True when the loop should give up (die)."""
        self.consecutive += 1
        self.failed_iterations += 1
        return self.consecutive >= self.max_consecutive

    def strike(self, request_id: str) -> bool:
        """Blame a request for a failure; True when it has used up its retries."""
        n = self._strikes.get(request_id, 0) + 1
        self._strikes[request_id] = n
        return n >= self.max_strikes

    def forget(self, request_id: str) -> None:
        self._strikes.pop(request_id, None)


def end_stream(stream: RequestStream, request_id: str, error: str,
               prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    """Deliver a final error delta without touching any engine state (last resort)."""
    stream.put(RequestOutput(request_id, finished=True, finish_reason="error", error=error,
                             prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
