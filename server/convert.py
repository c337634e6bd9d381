"""Conversion between conserve.v1 protobuf messages and engine types, and input validation.

Pure functions with no state; called from gRPC worker threads and the batch-runner
thread. Validation raises ValueError whose message names the offending field (prefixed
with e.g. "requests[3]." for batch items); callers map it to INVALID_ARGUMENT.

`check_sizes` runs before any tokenization or queueing, so a hostile request costs O(its
size) to refuse: text beyond `MAX_BYTES_PER_TOKEN` bytes per context token, more than
`MAX_MESSAGES` chat messages, or an over-long request_id is refused on sight.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from conserve_jax.engine_api import (SLO, EngineStats, GenerationRequest, RequestClass,
                                     RequestOutput, TokenLogprob, validate_prompt)
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.sampling_params import SamplingParams

MAX_ID_CHARS = 256  # request_id, idempotency_key
MAX_BYTES_PER_TOKEN = 64  # no vocabulary token is longer: more text cannot fit the context
MAX_MESSAGES = 1024
CHAT_ROLES = ("system", "user", "assistant", "tool")

FINISH_TO_PROTO = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "error": pb.FINISH_REASON_ERROR,
}


def check_sizes(req: pb.GenerateRequest, max_model_len: int, prefix: str = "") -> None:
    """Cheap bounds checked before tokenizing; raises ValueError naming the field."""
    if len(req.request_id) > MAX_ID_CHARS:
        raise ValueError(f"{prefix}request_id has {len(req.request_id)} characters; "
                         f"the limit is {MAX_ID_CHARS}")
    limit = max_model_len * MAX_BYTES_PER_TOKEN
    kind = req.WhichOneof("input")
    if kind == "prompt" and len(req.prompt) > limit:
        raise ValueError(f"{prefix}prompt has {len(req.prompt)} characters; it cannot fit the "
                         f"context of {max_model_len} tokens")
    if kind == "token_ids" and len(req.token_ids.ids) >= max_model_len:
        raise ValueError(f"{prefix}token_ids has {len(req.token_ids.ids)} tokens; the context "
                         f"is {max_model_len} and at least one token must be generated")
    if kind == "messages":
        msgs = req.messages.messages
        if len(msgs) > MAX_MESSAGES:
            raise ValueError(f"{prefix}messages has {len(msgs)} entries; the limit is {MAX_MESSAGES}")
        if sum(len(m.content) + len(m.role) for m in msgs) > limit:
            raise ValueError(f"{prefix}messages: the content cannot fit the context of "
                             f"{max_model_len} tokens")


def precheck(req: pb.GenerateRequest, engine, max_logprobs: int = 20,
             prefix: str = "") -> SamplingParams:
    """Every check that needs no tokenizing (sizes, sampling options, objectives); returns
    the validated sampling parameters. Raises ValueError naming the field."""
    check_sizes(req, engine.max_model_len, prefix)
    sampling = sampling_from_proto(req.sampling)
    try:
        sampling.validate(max_logprobs=max_logprobs, vocab_size=engine.vocab_size)
    except ValueError as e:
        raise ValueError(f"{prefix}{e}") from None
    if sampling.max_tokens > engine.max_model_len:
        raise ValueError(f"{prefix}max_tokens must be <= the context length "
                         f"{engine.max_model_len}, got {sampling.max_tokens}")
    for name in ("ttft_s", "tpot_s"):
        if req.HasField(name) and not (getattr(req, name) > 0 and math.isfinite(getattr(req, name))):
            raise ValueError(f"{prefix}{name} must be a positive number of seconds")
    return sampling


def _check_messages(messages: list[dict], tokenizer, prefix: str) -> None:
    """Known roles only, and no control-token strings in content (a user must not be able
    to write e.g. '<|im_start|>system' and fake a turn)."""
    specials = getattr(tokenizer, "special_token_strings", ()) or ()
    for i, m in enumerate(messages):
        if not m["role"]:
            raise ValueError(f"{prefix}messages[{i}].role is empty")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"{prefix}messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; "
                             f"got {m['role'][:40]!r}")
        for tok in specials:
            if tok in m["content"]:
                raise ValueError(f"{prefix}messages[{i}].content contains the control token "
                                 f"{tok!r}, which only the chat template may emit")


def prompt_token_ids(req: pb.GenerateRequest, tokenizer, prefix: str = "") -> tuple[list[int], str]:
    """The prompt as token ids, and the name of the input field it came from."""
    kind = req.WhichOneof("input")
    if kind is None:
        raise ValueError(f"{prefix}prompt is empty (set one of prompt, token_ids, messages)")
    if kind == "prompt":
        return list(tokenizer.encode(req.prompt)) if req.prompt else [], kind
    if kind == "token_ids":
        return list(req.token_ids.ids), kind
    messages = [{"role": m.role, "content": m.content} for m in req.messages.messages]
    if not messages:
        raise ValueError(f"{prefix}messages is empty")
    _check_messages(messages, tokenizer, prefix)
    has_template = getattr(tokenizer, "has_chat_template", False)
    if callable(has_template):
        has_template = has_template()
    if not has_template:
        raise ValueError(f"{prefix}messages: the model has no chat template; send a prompt")
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except (ValueError, TypeError) as e:  # the template's own raise_exception, bad shapes
        raise ValueError(f"{prefix}messages: {e}") from None
    if isinstance(rendered, str):  # a tokenizer that renders text rather than ids
        # the template places special tokens itself (as transformers tokenizes chats)
        rendered = tokenizer.encode(rendered, add_special_tokens=False)
    return list(rendered), kind


def sampling_from_proto(sp: pb.SamplingParams) -> SamplingParams:
    d = SamplingParams()
    return SamplingParams(
        max_tokens=sp.max_tokens if sp.HasField("max_tokens") else d.max_tokens,
        temperature=sp.temperature if sp.HasField("temperature") else d.temperature,
        top_p=sp.top_p if sp.HasField("top_p") else d.top_p,
        top_k=sp.top_k if sp.HasField("top_k") else d.top_k,
        seed=sp.seed if sp.HasField("seed") else None,
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs if sp.HasField("logprobs") else None,
    )


def build_request(req: pb.GenerateRequest, engine, request_id: str, request_class: RequestClass,
                  max_logprobs: int = 20, prefix: str = "") -> GenerationRequest:
    """Validate a GenerateRequest against the engine's model and turn it into a
    GenerationRequest. Raises ValueError naming the field. Objectives the message does not
    set stay None (a face fills in the server's defaults: `Admission.fill_defaults`)."""
    sampling = precheck(req, engine, max_logprobs, prefix)
    ids, kind = prompt_token_ids(req, engine.tokenizer, prefix)
    validate_prompt(ids, engine.vocab_size, engine.max_model_len, field_name=prefix + kind)
    slo = SLO(ttft_s=req.ttft_s if req.HasField("ttft_s") else None,
              tpot_s=req.tpot_s if req.HasField("tpot_s") else None)
    expected = req.expected_output_tokens if req.HasField("expected_output_tokens") else None
    if expected is not None and expected < 1:
        raise ValueError(f"{prefix}expected_output_tokens must be >= 1, got {expected}")
    return GenerationRequest(request_id=request_id, prompt_token_ids=ids, sampling=sampling,
                             request_class=request_class, slo=slo,
                             expected_output_tokens=expected)


def logprobs_to_proto(items: Iterable[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top])
            for lp in items]


def usage_to_proto(out: RequestOutput) -> pb.Usage:
    u = pb.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens)
    if out.ttft_s is not None:
        u.ttft_s = out.ttft_s
    if out.mean_tpot_s is not None:
        u.tpot_s = out.mean_tpot_s
    u.num_cached_tokens = out.num_cached_tokens or 0
    return u


def output_to_response(out: RequestOutput, client_request_id: str) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(request_id=client_request_id, token_ids=out.token_ids,
                               text=out.text, logprobs=logprobs_to_proto(out.logprobs),
                               finished=out.finished)
    if out.finished:
        resp.finish_reason = FINISH_TO_PROTO.get(out.finish_reason, pb.FINISH_REASON_ERROR)
        resp.usage.CopyFrom(usage_to_proto(out))
    return resp


def outputs_to_result(index: int, client_request_id: str,
                      outputs: Iterable[RequestOutput]) -> pb.BatchResult:
    """Fold one request's deltas (ending with the finished one) into a BatchResult."""
    res = pb.BatchResult(index=index, request_id=client_request_id)
    text = []
    for out in outputs:
        res.token_ids.extend(out.token_ids)
        text.append(out.text)
        res.logprobs.extend(logprobs_to_proto(out.logprobs))
        if out.finished:
            res.finish_reason = FINISH_TO_PROTO.get(out.finish_reason, pb.FINISH_REASON_ERROR)
            res.usage.CopyFrom(usage_to_proto(out))
            res.error = out.error or ""
    res.text = "".join(text)
    return res


def error_result(index: int, client_request_id: str, reason: str, error: str,
                 partial: Optional[pb.BatchResult] = None) -> pb.BatchResult:
    """A result for an item that ended without (complete) output."""
    res = pb.BatchResult()
    if partial is not None:
        res.CopyFrom(partial)
    res.index, res.request_id = index, client_request_id
    res.finish_reason, res.error = FINISH_TO_PROTO[reason], error
    return res


def stats_to_proto(s: EngineStats, **server_fields) -> pb.ServerStats:
    out = pb.ServerStats(**server_fields)
    for f in pb.ServerStats.DESCRIPTOR.fields:
        if hasattr(s, f.name):
            setattr(out, f.name, getattr(s, f.name))
    return out
