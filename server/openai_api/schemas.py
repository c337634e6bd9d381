"""Validate OpenAI chat/completions request bodies and map them onto conserve.v1 requests.

`parse_body(kind, body)` checks the JSON body field by field (raising `ApiError` 400 that
names the parameter) and returns a `ParsedRequest` holding a `pb.GenerateRequest` (the
same message the gRPC face and the batch store use) plus the HTTP-only options.
`to_generation` then validates it against the engine (tokenizing, chat template, limits)
through `conserve_server.convert.build_request`, so both faces share one validation path.

Supported: `max_tokens`/`max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`,
`logprobs`/`top_logprobs`, `n` (1 to MAX_N choices; samples.py), `stream`, `stream_options.include_usage`,
`service_tier` (auto/default = online, flex = offline) and the extra fields `top_k`,
`ignore_eos`, `stop_token_ids`, `ttft_s`, `tpot_s`. Parameters that would change the output
in ways this engine does not implement (penalties, logit_bias, tools, best_of > 1, echo,
suffix) are refused with 400 rather than silently ignored. Pure functions; any thread.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from conserve_jax.engine_api import GenerationRequest, RequestClass
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server import convert
from conserve_server.openai_api.errors import ApiError, bad_request, invalid_value

CHAT, COMPLETION = "chat", "completion"
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}
TIERS = {None: "default", "auto": "default", "default": "default", "flex": "flex"}
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# most choices one request may ask for: each is an engine request of its own (vLLM sets
# no bound; one is kept so that one body cannot fill the engine's queue by itself)
MAX_N = 16


@dataclass
class ParsedRequest:
    kind: str  # CHAT or COMPLETION
    model: str
    proto: pb.GenerateRequest  # input, sampling, objectives; request_id left to the caller
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False
    service_tier: str = "default"  # "default" (online) or "flex" (offline)
    logprobs: bool = False  # return logprobs
    top_logprobs: int = 0
    n: int = 1  # choices (samples of the one prompt)

    @property
    def request_class(self) -> RequestClass:
        return RequestClass.OFFLINE if self.service_tier == "flex" else RequestClass.ONLINE


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


INT32_MAX, INT64_MAX = 2 ** 31 - 1, 2 ** 63 - 1


def _int(body: dict, name: str, lo: Optional[int] = None, hi: Optional[int] = INT32_MAX) -> Optional[int]:
    """An optional integer field in [lo, hi] (hi defaults to the proto's int32 range)."""
    v = body.get(name)
    if v is None:
        return None
    if lo is None:
        lo = -hi - 1
    if not _is_int(v) or v < lo or v > hi:
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise invalid_value(name, f"{name} must be an integer{rng}, got {v!r}")
    return v


def _num(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> Optional[float]:
    v = body.get(name)
    if v is None:
        return None
    if not _is_num(v) or v > hi or v < lo or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise invalid_value(name, f"{name} must be a number in {left}{lo}, {hi}], got {v!r}")
    return float(v)


def _bool(body: dict, name: str) -> Optional[bool]:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise invalid_value(name, f"{name} must be a boolean, got {v!r}")
    return v


def _message_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid_value(f"messages[{i}].content[{j}]",
                                    "only text content parts ({'type': 'text', 'text': ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid_value(f"messages[{i}].content", "content must be a string or a list of text parts")


def _messages(body: dict) -> pb.ChatMessages:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid_value("messages", "messages must be a non-empty list of messages")
    out = pb.ChatMessages()
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise invalid_value(f"messages[{i}]", "each message must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise invalid_value(f"messages[{i}].role", "role must be a non-empty string")
        content = m.get("content")
        text = "" if content is None and role == "assistant" else _message_content(content, i)
        out.messages.add(role=role, content=text)
    return out


def _prompt(body: dict, req: pb.GenerateRequest) -> None:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a one-element batch of prompts
    if isinstance(p, str):
        req.prompt = p
        if not p:
            raise invalid_value("prompt", "prompt is empty")
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        if not all(0 <= t <= INT32_MAX for t in p):
            raise invalid_value("prompt", "prompt has token ids outside the vocabulary")
        req.token_ids.ids.extend(p)
    elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise invalid_value("prompt", "only one prompt per request is supported; send one "
                                      "request per prompt or use the Batch API")
    else:
        raise invalid_value("prompt", "prompt must be a string or a list of token ids")


def _unsupported(body: dict) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise invalid_value(name, f"{name} is not supported (only 0)")
    for name in ("logit_bias", "tools", "functions", "suffix"):
        if body.get(name):
            raise invalid_value(name, f"{name} is not supported")
    if body.get("best_of") not in (None, 1):
        raise invalid_value("best_of", "best_of must be 1")
    if body.get("echo"):
        raise invalid_value("echo", "echo is not supported")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise invalid_value("response_format", "only response_format {'type': 'text'} is supported")


def parse_body(kind: str, body: Any) -> ParsedRequest:
    """Check a chat (`kind` CHAT) or completions body; raise ApiError 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_value("model", "model is required (a string; see GET /v1/models)")
    n = _int(body, "n", lo=1, hi=MAX_N)
    n = 1 if n is None else n
    _unsupported(body)
    # vLLM's `priority` (an integer; lower runs sooner under vLLM's priority scheduling) is
    # accepted and checked, and does not reorder: this engine orders work by class (online
    # before offline; service_tier flex is offline), see docs/serving.md
    _int(body, "priority")
    req = pb.GenerateRequest()
    if kind == CHAT:
        req.messages.CopyFrom(_messages(body))
    else:
        _prompt(body, req)
    sp = req.sampling
    max_tokens = _int(body, "max_tokens", lo=1)
    if kind == CHAT and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", lo=1)
    if max_tokens is None and kind == COMPLETION:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    if max_tokens is not None:
        sp.max_tokens = max_tokens
    temperature = _num(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        sp.temperature = temperature
    top_p = _num(body, "top_p", 0.0, 1.0, lo_open=True)
    if top_p is not None:
        sp.top_p = top_p
    seed = _int(body, "seed", hi=INT64_MAX)
    if seed is not None:
        sp.seed = seed
    top_k = _int(body, "top_k", lo=-1)
    if top_k is not None:
        sp.top_k = top_k
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise invalid_value("stop", "stop must be a non-empty string or a list of them")
    sp.stop.extend(stop or [])
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t <= INT32_MAX for t in stop_ids):
            raise invalid_value("stop_token_ids", "stop_token_ids must be a list of token ids")
        sp.stop_token_ids.extend(stop_ids)
    sp.ignore_eos = bool(_bool(body, "ignore_eos"))
    logprobs, top = False, 0
    if kind == CHAT:
        logprobs = bool(_bool(body, "logprobs"))
        top = _int(body, "top_logprobs", lo=0, hi=20) or 0
        if body.get("top_logprobs") is not None and not logprobs:
            raise invalid_value("top_logprobs", "top_logprobs needs logprobs: true")
    else:
        n_lp = _int(body, "logprobs", lo=0, hi=20)
        logprobs, top = n_lp is not None, n_lp or 0
    if logprobs:
        sp.logprobs = top
    for name in ("ttft_s", "tpot_s"):
        v = body.get(name)
        if v is not None:
            if not _is_num(v) or v <= 0:
                raise invalid_value(name, f"{name} must be a positive number of seconds, got {v!r}")
            setattr(req, name, float(v))
    stream = bool(_bool(body, "stream"))
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise invalid_value("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(opts, dict):
            raise invalid_value("stream_options", "stream_options must be an object")
        include_usage = bool(_bool(opts, "include_usage"))
    tier = body.get("service_tier")
    if not (tier is None or isinstance(tier, str)) or tier not in TIERS:
        raise invalid_value("service_tier", f"service_tier must be one of auto, default, flex; got {tier!r}")
    return ParsedRequest(kind, model, req, max_tokens is not None, stream, include_usage,
                         TIERS[tier], logprobs, top, n)


_FIELD = re.compile(r"^(?:line \d+: )?(?:body\.)?([a-z_]+)")
_PARAM_NAMES = {"token_ids": "prompt", "requests": "prompt"}


def param_of(message: str, kind: str) -> Optional[str]:
    """The OpenAI parameter a `convert.build_request` error message is about."""
    m = _FIELD.match(message)
    if not m:
        return None
    name = _PARAM_NAMES.get(m.group(1), m.group(1))
    if kind == CHAT and name == "logprobs":
        return "top_logprobs"
    return name


def to_generation(parsed: ParsedRequest, engine, request_id: str, max_logprobs: int = 20,
                  request_class: Optional[RequestClass] = None,
                  prefix: str = "") -> GenerationRequest:
    """Validate against the engine (tokenize, render the chat template, check limits) and
    build the engine request (objectives it does not name stay None: the face fills in
    the defaults). Without max_tokens a chat request may use the rest of the context (as
    vLLM does); `parsed.proto.sampling.max_tokens` is filled in accordingly. Raises
    ApiError 400 naming the parameter."""
    cls = request_class or parsed.request_class
    try:
        req = convert.build_request(parsed.proto, engine, request_id, cls, max_logprobs,
                                    prefix=prefix)
    except ValueError as e:
        msg = str(e).replace("token_ids", "prompt") if parsed.kind == COMPLETION else str(e)
        raise ApiError(400, msg, param_of(msg[len(prefix):], parsed.kind), "invalid_value") from None
    if not parsed.max_tokens_given:
        req.sampling.max_tokens = max(1, engine.max_model_len - len(req.prompt_token_ids))
        parsed.proto.sampling.max_tokens = req.sampling.max_tokens
    return req
