import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]

class BatchState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_STATE_UNSPECIFIED: _ClassVar[BatchState]
    BATCH_STATE_QUEUED: _ClassVar[BatchState]
    BATCH_STATE_RUNNING: _ClassVar[BatchState]
    BATCH_STATE_COMPLETED: _ClassVar[BatchState]
    BATCH_STATE_CANCELLED: _ClassVar[BatchState]
    BATCH_STATE_FAILED: _ClassVar[BatchState]
    BATCH_STATE_EXPIRED: _ClassVar[BatchState]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_ERROR: FinishReason
BATCH_STATE_UNSPECIFIED: BatchState
BATCH_STATE_QUEUED: BatchState
BATCH_STATE_RUNNING: BatchState
BATCH_STATE_COMPLETED: BatchState
BATCH_STATE_CANCELLED: BatchState
BATCH_STATE_FAILED: BatchState
BATCH_STATE_EXPIRED: BatchState

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "token_ids", "messages", "sampling", "ttft_s", "tpot_s", "request_id", "expected_output_tokens")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    token_ids: TokenIds
    messages: ChatMessages
    sampling: SamplingParams
    ttft_s: float
    tpot_s: float
    request_id: str
    expected_output_tokens: int
    def __init__(self, prompt: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ..., request_id: _Optional[str] = ..., expected_output_tokens: _Optional[int] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "ttft_s", "tpot_s", "num_cached_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tpot_s: float
    num_cached_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "logprobs", "finished", "finish_reason", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finished: bool
    finish_reason: FinishReason
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("requests", "deadline", "idempotency_key")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[GenerateRequest]
    deadline: _timestamp_pb2.Timestamp
    idempotency_key: str
    def __init__(self, requests: _Optional[_Iterable[_Union[GenerateRequest, _Mapping]]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("batch_id", "estimated_completion_at")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COMPLETION_AT_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    estimated_completion_at: _timestamp_pb2.Timestamp
    def __init__(self, batch_id: _Optional[str] = ..., estimated_completion_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("batch_id", "state", "total", "done", "failed", "cancelled", "created_at", "started_at", "finished_at", "deadline", "error", "estimated_completion_at_submit", "estimated_completion_at", "slack_s", "at_risk")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COMPLETION_AT_SUBMIT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COMPLETION_AT_FIELD_NUMBER: _ClassVar[int]
    SLACK_S_FIELD_NUMBER: _ClassVar[int]
    AT_RISK_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    state: BatchState
    total: int
    done: int
    failed: int
    cancelled: int
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    error: str
    estimated_completion_at_submit: _timestamp_pb2.Timestamp
    estimated_completion_at: _timestamp_pb2.Timestamp
    slack_s: float
    at_risk: bool
    def __init__(self, batch_id: _Optional[str] = ..., state: _Optional[_Union[BatchState, str]] = ..., total: _Optional[int] = ..., done: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., estimated_completion_at_submit: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., estimated_completion_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., slack_s: _Optional[float] = ..., at_risk: _Optional[bool] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("batches", "next_page_token")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[Batch]
    next_page_token: str
    def __init__(self, batches: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelBatchRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class DeleteBatchRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class DeleteBatchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamBatchResultsRequest(_message.Message):
    __slots__ = ("batch_id", "start_index")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    start_index: int
    def __init__(self, batch_id: _Optional[str] = ..., start_index: _Optional[int] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("index", "request_id", "token_ids", "text", "logprobs", "finish_reason", "usage", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finish_reason: FinishReason
    usage: Usage
    error: str
    def __init__(self, index: _Optional[int] = ..., request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class GetServerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("online_waiting", "online_running", "offline_waiting", "offline_running", "kv_blocks_total", "kv_blocks_online", "kv_blocks_offline", "host_pool_slots_total", "host_pool_slots_used", "online_tokens_per_s", "offline_tokens_per_s", "online_tokens_total", "offline_tokens_total", "preemptions", "preempted_tokens_discarded", "preemptions_resumed", "evictions", "recomputed_tokens", "restored_tokens", "iterations", "online_in_flight", "online_queue_limit", "batches_active", "batch_items_pending", "batch_items_in_flight", "uptime_s", "online_prefill_tokens_total", "offline_prefill_tokens_total", "kv_blocks_reserved_unused", "kv_reservations_grown", "kv_blocks_lent", "kv_blocks_returned", "kv_loans_recalled", "predictor_observed", "predictor_mae_tokens", "predictor_within_25pct", "predictor_baseline_mae_tokens", "prefix_cache_queries_online", "prefix_cache_queries_offline", "prefix_cache_hits_online", "prefix_cache_hits_offline", "kv_blocks_cached_free", "prefix_cache_evictions", "deadline_met", "deadline_missed", "deadline_refused", "deadline_at_risk_batches", "deadline_at_risk_items", "harvest_rate", "deadline_estimate_error_mean", "deadline_borrowed_s")
    ONLINE_WAITING_FIELD_NUMBER: _ClassVar[int]
    ONLINE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_WAITING_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    HOST_POOL_SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HOST_POOL_SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    ONLINE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ONLINE_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_TOKENS_DISCARDED_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_RESUMED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    ONLINE_QUEUE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    BATCHES_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    BATCH_ITEMS_PENDING_FIELD_NUMBER: _ClassVar[int]
    BATCH_ITEMS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    ONLINE_PREFILL_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_PREFILL_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_RESERVED_UNUSED_FIELD_NUMBER: _ClassVar[int]
    KV_RESERVATIONS_GROWN_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_LENT_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_RETURNED_FIELD_NUMBER: _ClassVar[int]
    KV_LOANS_RECALLED_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_OBSERVED_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_MAE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_WITHIN_25PCT_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_BASELINE_MAE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_ONLINE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FREE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MET_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MISSED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_REFUSED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_AT_RISK_BATCHES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_AT_RISK_ITEMS_FIELD_NUMBER: _ClassVar[int]
    HARVEST_RATE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_ESTIMATE_ERROR_MEAN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_BORROWED_S_FIELD_NUMBER: _ClassVar[int]
    online_waiting: int
    online_running: int
    offline_waiting: int
    offline_running: int
    kv_blocks_total: int
    kv_blocks_online: int
    kv_blocks_offline: int
    host_pool_slots_total: int
    host_pool_slots_used: int
    online_tokens_per_s: float
    offline_tokens_per_s: float
    online_tokens_total: int
    offline_tokens_total: int
    preemptions: int
    preempted_tokens_discarded: int
    preemptions_resumed: int
    evictions: int
    recomputed_tokens: int
    restored_tokens: int
    iterations: int
    online_in_flight: int
    online_queue_limit: int
    batches_active: int
    batch_items_pending: int
    batch_items_in_flight: int
    uptime_s: float
    online_prefill_tokens_total: int
    offline_prefill_tokens_total: int
    kv_blocks_reserved_unused: int
    kv_reservations_grown: int
    kv_blocks_lent: int
    kv_blocks_returned: int
    kv_loans_recalled: int
    predictor_observed: int
    predictor_mae_tokens: float
    predictor_within_25pct: float
    predictor_baseline_mae_tokens: float
    prefix_cache_queries_online: int
    prefix_cache_queries_offline: int
    prefix_cache_hits_online: int
    prefix_cache_hits_offline: int
    kv_blocks_cached_free: int
    prefix_cache_evictions: int
    deadline_met: int
    deadline_missed: int
    deadline_refused: int
    deadline_at_risk_batches: int
    deadline_at_risk_items: int
    harvest_rate: float
    deadline_estimate_error_mean: float
    deadline_borrowed_s: float
    def __init__(self, online_waiting: _Optional[int] = ..., online_running: _Optional[int] = ..., offline_waiting: _Optional[int] = ..., offline_running: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_online: _Optional[int] = ..., kv_blocks_offline: _Optional[int] = ..., host_pool_slots_total: _Optional[int] = ..., host_pool_slots_used: _Optional[int] = ..., online_tokens_per_s: _Optional[float] = ..., offline_tokens_per_s: _Optional[float] = ..., online_tokens_total: _Optional[int] = ..., offline_tokens_total: _Optional[int] = ..., preemptions: _Optional[int] = ..., preempted_tokens_discarded: _Optional[int] = ..., preemptions_resumed: _Optional[int] = ..., evictions: _Optional[int] = ..., recomputed_tokens: _Optional[int] = ..., restored_tokens: _Optional[int] = ..., iterations: _Optional[int] = ..., online_in_flight: _Optional[int] = ..., online_queue_limit: _Optional[int] = ..., batches_active: _Optional[int] = ..., batch_items_pending: _Optional[int] = ..., batch_items_in_flight: _Optional[int] = ..., uptime_s: _Optional[float] = ..., online_prefill_tokens_total: _Optional[int] = ..., offline_prefill_tokens_total: _Optional[int] = ..., kv_blocks_reserved_unused: _Optional[int] = ..., kv_reservations_grown: _Optional[int] = ..., kv_blocks_lent: _Optional[int] = ..., kv_blocks_returned: _Optional[int] = ..., kv_loans_recalled: _Optional[int] = ..., predictor_observed: _Optional[int] = ..., predictor_mae_tokens: _Optional[float] = ..., predictor_within_25pct: _Optional[float] = ..., predictor_baseline_mae_tokens: _Optional[float] = ..., prefix_cache_queries_online: _Optional[int] = ..., prefix_cache_queries_offline: _Optional[int] = ..., prefix_cache_hits_online: _Optional[int] = ..., prefix_cache_hits_offline: _Optional[int] = ..., kv_blocks_cached_free: _Optional[int] = ..., prefix_cache_evictions: _Optional[int] = ..., deadline_met: _Optional[int] = ..., deadline_missed: _Optional[int] = ..., deadline_refused: _Optional[int] = ..., deadline_at_risk_batches: _Optional[int] = ..., deadline_at_risk_items: _Optional[int] = ..., harvest_rate: _Optional[float] = ..., deadline_estimate_error_mean: _Optional[float] = ..., deadline_borrowed_s: _Optional[float] = ...) -> None: ...
