"""The engine contract: the types that cross between the serving layer and the engine.

A small interface in the spirit of JetStream's `engine_api.py`. The gRPC server, the
offline `LLM` API and tests talk to an engine only through `EngineAPI`; `MockEngine`
(conserve_jax/mock_engine.py) implements it deterministically for CPU-fast tests.

Threading: every `EngineAPI` method may be called from any thread. Outputs for one
request are delivered in order through its `RequestStream`.
"""
from __future__ import annotations

import abc
import enum
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence

from conserve_jax.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def urgent_ranks(request_ids) -> dict:
    """`EngineAPI.set_urgent`'s argument as {request id: rank}: a mapping as given (ranks
    as floats), any other iterable of ids with rank 0."""
    if isinstance(request_ids, Mapping):
        return {str(k): float(v) for k, v in request_ids.items()}
    return {str(k): 0.0 for k in request_ids}


class RequestClass(enum.Enum):
    ONLINE = "online"  # latency objectives; never preempted for offline work
    OFFLINE = "offline"  # harvests idle capacity; preemptible


@dataclass(frozen=True)
class SLO:
    """Latency objectives of an online request, in seconds. None means: server default."""

    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None


@dataclass
class GenerationRequest:
    """One request handed to `EngineAPI.submit`. `prompt_token_ids` is already tokenized."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_class: RequestClass = RequestClass.ONLINE
    slo: SLO = field(default_factory=SLO)
    # the client's guess of the response length: a prior for the length predictor, never
    # a limit (None: no guess)
    expected_output_tokens: Optional[int] = None
    # prefix caching: requests share cached KV only with requests of the same salt (the
    # server sets the tenant; None is its own group)
    cache_salt: Optional[str] = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # top-n alternatives


@dataclass
class RequestOutput:
    """A delta for one request: tokens generated since the previous delta.

    The final delta has `finished=True` and a `finish_reason` of "stop" (EOS, stop token
    or stop string), "length" (max_tokens or context), "cancelled" or "error" (then
    `error` holds the message).
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: Optional[float] = None  # set on the final delta
    mean_tpot_s: Optional[float] = None  # set on the final delta
    # submit to the request's first scheduling (vLLM's queued time); set on the final
    # delta, None if it never ran
    queue_time_s: Optional[float] = None
    # prompt tokens whose KV came from the prefix cache (vLLM's num_cached_tokens); set
    # on the final delta
    num_cached_tokens: Optional[int] = None


class RequestStream:
    """Ordered, thread-safe delivery of `RequestOutput` deltas for one request.

    The engine's step-loop thread calls `put`; any consumer thread iterates. Iteration
    ends after the finished delta. `get(timeout)` raises queue.Empty on timeout.
    `set_listener(fn)` lets an event-loop consumer be woken instead of blocking a thread:
    `fn()` is called on the producer's thread after every `put` (keep it cheap and
    non-raising, e.g. `loop.call_soon_threadsafe(event.set)`).
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._q: "queue.Queue[RequestOutput]" = queue.Queue()
        self.done = threading.Event()
        self._listener: Optional[Callable[[], None]] = None

    def put(self, out: RequestOutput) -> None:
        self._q.put(out)
        if out.finished:
            self.done.set()
        listener = self._listener
        if listener is not None:
            listener()

    def set_listener(self, fn: Optional[Callable[[], None]]) -> None:
        """Install (or with None remove) the one wake-up callback; see the class doc."""
        self._listener = fn

    def get(self, timeout: Optional[float] = None) -> RequestOutput:
        return self._q.get(timeout=timeout)

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            out = self._q.get()
            yield out
            if out.finished:
                return


@dataclass
class EngineStats:
    """A snapshot for `GetServerStats` and benchmarks. Counters are cumulative."""

    online_waiting: int = 0
    online_running: int = 0
    offline_waiting: int = 0
    offline_running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_online: int = 0
    kv_blocks_offline: int = 0
    host_pool_slots_total: int = 0
    host_pool_slots_used: int = 0
    online_tokens_per_s: float = 0.0
    offline_tokens_per_s: float = 0.0
    online_tokens_total: int = 0  # generated tokens
    offline_tokens_total: int = 0
    online_prefill_tokens_total: int = 0  # prompt (and recomputed) tokens committed
    offline_prefill_tokens_total: int = 0
    preemptions: int = 0
    preempted_tokens_discarded: int = 0
    preemptions_resumed: int = 0  # preempted iterations continued from their layer
    evictions: int = 0
    recomputed_tokens: int = 0
    restored_tokens: int = 0
    iterations: int = 0
    # committed iterations that generated offline tokens with no offline prompt chunk in
    # them, and their seconds from scheduling to commit: the pace of offline items served
    # before every other offline prompt (deadline estimates' lead pace)
    offline_free_iterations: int = 0
    offline_free_s: float = 0.0
    # seconds of committed iterations with any offline work in them (the rest of the wall
    # time the engine served online work alone, or waited): their share of backlogged wall
    # time is how much of it an offline item served first advances in
    offline_busy_s: float = 0.0
    # the latency model's online correction now (measured / fitted iteration time, an
    # exponential average; 1 without a latency model): scales predictions made earlier
    latency_correction: float = 1.0
    # KV planning (response-length reservations; see scheduling/kv_planner.py)
    kv_blocks_reserved_unused: int = 0  # held by running requests beyond what they wrote
    kv_reservations_grown: int = 0  # a request outlived its predicted length
    kv_blocks_lent: int = 0
    kv_blocks_returned: int = 0
    kv_loans_recalled: int = 0  # borrowers evicted so an owner got its KV back
    predictor_observed: int = 0
    predictor_mae_tokens: float = 0.0
    predictor_within_25pct: float = 0.0  # fraction of predictions within +-25%
    predictor_baseline_mae_tokens: float = 0.0  # always predicting the running mean
    # prefix caching: prompt tokens of requests at their first start (queries) and those
    # found cached (hits), by class; cached blocks nobody holds (reusable at once), and
    # cached blocks whose content was dropped to reuse them
    prefix_cache_queries_online: int = 0
    prefix_cache_queries_offline: int = 0
    prefix_cache_hits_online: int = 0
    prefix_cache_hits_offline: int = 0
    kv_blocks_cached_free: int = 0
    prefix_cache_evictions: int = 0
    # offline deadlines: predicted seconds of online iterations' time beyond the isolation
    # budget that at-risk offline work was given (deadline_policy "borrow")
    deadline_borrowed_s: float = 0.0


@dataclass(frozen=True)
class IterationStats:
    """One committed engine iteration, handed to iteration listeners (vLLM's
    IterationStats, in part): prompt tokens committed (prefill, incl. recompute) and tokens
    generated, by class. Summed over iterations they are `EngineStats`' prefill and
    generated totals."""

    online_prompt_tokens: int = 0
    online_generation_tokens: int = 0
    offline_prompt_tokens: int = 0
    offline_generation_tokens: int = 0

    @property
    def online_tokens(self) -> int:
        return self.online_prompt_tokens + self.online_generation_tokens

    @property
    def offline_tokens(self) -> int:
        return self.offline_prompt_tokens + self.offline_generation_tokens


class EngineAPI(abc.ABC):
    """What the serving layer may ask of an engine."""

    # listeners of committed iterations (a tuple, replaced on change: the step loop reads
    # it without a lock); see add_iteration_listener
    _iteration_listeners: tuple = ()
    _listeners_lock = threading.Lock()

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """A `conserve_jax.tokenizer.Tokenizer` (encode/decode/apply_chat_template)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and enqueue; raises ValueError naming the field for bad input."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request and free its KV at once; its stream ends with "cancelled".
        Unknown or finished ids are ignored."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop admitting; wait up to drain_timeout_s for running work; stop the loop.
        Unfinished requests end with finish_reason "cancelled"."""

    def set_urgent(self, request_ids) -> None:
        """Offline requests to serve first among offline work (items of jobs at risk of
        missing their deadline; under deadline_policy "borrow" they may also use online
        iterations' budget up to isolation_max). A mapping request id -> rank orders them
        (lower first: the batch runner passes its batch's place in earliest-deadline-first
        order); a plain set of ids ranks them all alike (`urgent_ranks`). Replaces the
        previous set; ids not in the engine are ignored. Any thread. Default: ignored (an
        engine without that order)."""

    def add_iteration_listener(self, fn: Callable[[IterationStats], None]) -> None:
        """Call `fn(IterationStats)` after every committed iteration, on the engine's step
        loop thread: keep it cheap (e.g. observe a histogram). An exception in `fn` is
        logged and ignored. Any thread."""
        with self._listeners_lock:
            self._iteration_listeners = self._iteration_listeners + (fn,)

    def remove_iteration_listener(self, fn: Callable[[IterationStats], None]) -> None:
        """Stop calling `fn` (unknown listeners are ignored). Any thread."""
        with self._listeners_lock:
            self._iteration_listeners = tuple(f for f in self._iteration_listeners if f != fn)

    def _iteration_done(self, it: IterationStats) -> None:
        """Engines call this on their step loop thread after each committed iteration."""
        for fn in self._iteration_listeners:
            try:
                fn(it)
            except Exception:
                log.exception("iteration listener failed")

    @property
    def failure(self) -> Optional[str]:
        """None while the engine works; once its step loop has died, why (then every
        stream has ended with "engine stopped" and `submit` raises RuntimeError)."""
        return None


def validate_prompt(token_ids: Sequence[int], vocab_size: int, max_model_len: int,
                    field_name: str = "prompt") -> None:
    """Raise ValueError naming `field_name` if the prompt is empty, too long or has
    token ids outside the vocabulary. Shared by every engine and the server."""
    if len(token_ids) == 0:
        raise ValueError(f"{field_name} is empty")
    if len(token_ids) >= max_model_len:
        raise ValueError(
            f"{field_name} has {len(token_ids)} tokens; the context is {max_model_len} "
            f"and at least one token must be generated")
    bad = [t for t in token_ids if not (isinstance(t, (int,)) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"{field_name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def validate_expected_output_tokens(value, field_name: str = "expected_output_tokens") -> None:
    """Raise ValueError naming the field unless `value` is None or an integer >= 1."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{field_name} must be an integer >= 1, got {value!r}")
