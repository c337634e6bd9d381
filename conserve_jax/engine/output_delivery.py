"""The output thread: detokenizes, finds stop strings and delivers deltas to request streams,
off the engine's step loop.

Contract. The step-loop thread calls `token` and `finish` (cheap: they enqueue an event)
and never touches an `OutputState`; the output thread owns every `OutputState` and is the
only writer of request streams once the request is registered (`register`, step-loop
thread). When a stop string appears, the output thread ends the stream itself with
finish_reason "stop" and calls `on_stop(request_id)` so that the step loop stops the
sequence; tokens the step loop still produced for it meanwhile are dropped here, so the
client never sees them. Events of one request are handled in the order they were sent.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from conserve_jax.engine_api import GenerationRequest, RequestOutput, RequestStream
from conserve_jax.engine.output_processor import OutputProcessor, OutputState
from conserve_jax.runtime.step_plan import SampledToken

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Register:
    request: GenerationRequest
    stream: RequestStream
    prompt_len: int
    prior_ids: tuple[int, ...] = ()  # generated before a restart (a resumed request)


@dataclass(frozen=True)
class FinalStats:
    """A request's engine-measured numbers, carried by its final delta (`RequestOutput`'s
    fields of the same names)."""

    ttft_s: Optional[float] = None
    mean_tpot_s: Optional[float] = None
    num_cached_tokens: Optional[int] = None  # prompt tokens found in the prefix cache
    queue_time_s: Optional[float] = None  # submit to first scheduling

    def apply(self, out: RequestOutput) -> None:
        out.ttft_s, out.mean_tpot_s = self.ttft_s, self.mean_tpot_s
        out.num_cached_tokens, out.queue_time_s = self.num_cached_tokens, self.queue_time_s


@dataclass(frozen=True)
class _Token:
    request_id: str
    token: SampledToken
    finish_reason: Optional[str]  # set when this token ends the request
    final: FinalStats


@dataclass(frozen=True)
class _Finish:
    request_id: str
    reason: str
    error: Optional[str]
    final: FinalStats


@dataclass
class _Live:
    reg: _Register
    state: OutputState
    done: bool = False


class OutputDelivery:
    def __init__(self, processor: OutputProcessor, on_stop: Callable[[str], None]) -> None:
        self.processor = processor
        self.on_stop = on_stop
        self._q: "queue.Queue" = queue.Queue()
        self._live: dict[str, _Live] = {}
        self._thread = threading.Thread(target=self._loop, name="engine-output", daemon=True)
        self._thread.start()

    # ---- step-loop thread -----------------------------------------------------------------
    def register(self, request: GenerationRequest, stream: RequestStream, prompt_len: int,
                 prior_ids=()) -> None:
        """`prior_ids`: tokens a resumed request generated before; its first delta
        carries them (and their text) as if they had just been generated."""
        self._q.put(_Register(request, stream, prompt_len, tuple(prior_ids)))

    def token(self, request_id: str, token: SampledToken, finish_reason: Optional[str] = None,
              final: FinalStats = FinalStats()) -> None:
        """`final`: used when this token ends the request (`finish_reason`, or a stop
        string the output thread finds)."""
        self._q.put(_Token(request_id, token, finish_reason, final))

    def finish(self, request_id: str, reason: str, error: Optional[str] = None,
               final: FinalStats = FinalStats()) -> None:
        self._q.put(_Finish(request_id, reason, error, final))

    def close(self) -> None:
        """Deliver everything sent so far, then stop the thread (engine shutdown)."""
        self._q.put(None)
        self._thread.join(timeout=30)

    # ---- output thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            ev = self._q.get()
            if ev is None:
                return
            try:
                self._handle(ev)
            except Exception:  # never lose the thread: fail that request, keep delivering
                log.exception("output delivery failed")
                live = self._live.pop(getattr(ev, "request_id", None), None)
                if live is not None and not live.done:
                    self._end(live, "error", "output processing failed", None, None)

    def _handle(self, ev) -> None:
        if isinstance(ev, _Register):
            st = self.processor.new_state()
            for tok in ev.prior_ids:
                self.processor.on_token(ev.request, st, SampledToken(tok, 0.0, []))
            self._live[ev.request.request_id] = _Live(ev, st)
            return
        live = self._live.get(ev.request_id)
        if live is None:
            return
        if isinstance(ev, _Finish):
            del self._live[ev.request_id]
            if not live.done:
                self._end(live, ev.reason, ev.error, ev.final)
            return
        if live.done:  # stopped by a stop string; the step loop has not seen it yet
            if ev.finish_reason is not None:  # ...and never will: it ended the request itself
                del self._live[ev.request_id]
            return
        hit_stop = self.processor.on_token(live.reg.request, live.state, ev.token)
        if hit_stop:
            self._end(live, "stop", None, ev.final)
            self.on_stop(ev.request_id)
        elif ev.finish_reason is not None:
            del self._live[ev.request_id]
            self._end(live, ev.finish_reason, None, ev.final)
        else:
            live.reg.stream.put(self.processor.delta(live.reg.request, live.reg.prompt_len,
                                                     live.state, finished=False))

    def _end(self, live: _Live, reason: str, error: Optional[str], final: FinalStats) -> None:
        live.done = True
        out = self.processor.delta(live.reg.request, live.reg.prompt_len, live.state,
                                   finished=True)
        out.finished, out.finish_reason, out.error = True, reason, error
        final.apply(out)
        live.reg.stream.put(out)
