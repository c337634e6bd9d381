"""Build OpenAI response objects (chat.completion, text_completion and their stream chunks,
logprobs, usage) from engine outputs or stored batch results.

`Answer` is the neutral form: text, token ids, logprobs, finish reason and token counts of
one request, filled from `RequestOutput` deltas (`Answer.add`) or from a stored
`pb.BatchResult` (`Answer.from_result`). Pure functions; any thread. The tokenizer is
used only to spell logprob tokens.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Union

from conserve_jax.engine_api import RequestOutput, TokenLogprob
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.openai_api.schemas import CHAT

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
           pb.FINISH_REASON_CANCELLED: "cancelled", pb.FINISH_REASON_ERROR: "error"}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex


@dataclass
class Answer:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason
            self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
            self.error = out.error or ""
            self.cached_tokens = out.num_cached_tokens or 0

    @classmethod
    def from_result(cls, r: pb.BatchResult) -> "Answer":
        lps = [TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
               for lp in r.logprobs]
        return cls(r.text, list(r.token_ids), lps, _FINISH.get(r.finish_reason),
                   r.usage.prompt_tokens, r.usage.completion_tokens, r.error,
                   r.usage.num_cached_tokens)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts the prompt
    tokens served from the prefix cache (as OpenAI and vLLM report them)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _spell(tokenizer, token_id: int) -> str:
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    except Exception:  # an id the tokenizer cannot spell: still report the logprob
        return f"<{token_id}>"


def chat_logprobs(tokenizer, items: list[TokenLogprob], top_n: int) -> Optional[dict]:
    def entry(tid: int, lp: float) -> dict:
        s = _spell(tokenizer, tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    content = []
    for it in items:
        e = entry(it.token_id, it.logprob)
        e["top_logprobs"] = [entry(t, lp) for t, lp in it.top[:top_n]]
        content.append(e)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, items: list[TokenLogprob], offset: int = 0) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for it in items:
        s = _spell(tokenizer, it.token_id)
        tokens.append(s)
        lps.append(it.logprob)
        tops.append({_spell(tokenizer, t): lp for t, lp in it.top} if it.top else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class Meta:
    """What every object of one response shares."""

    kind: str
    id: str
    model: str
    service_tier: str
    logprobs: bool = False
    top_logprobs: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


def _logprobs(meta: Meta, tokenizer, items: list[TokenLogprob], offset: int = 0):
    if not meta.logprobs:
        return None
    if meta.kind == CHAT:
        return chat_logprobs(tokenizer, items, meta.top_logprobs)
    return completion_logprobs(tokenizer, items, offset)


def _choice(meta: Meta, tokenizer, ans: Answer, index: int) -> dict:
    finish = ans.finish_reason if ans.finish_reason in ("stop", "length") else "stop"
    lps = _logprobs(meta, tokenizer, ans.logprobs)
    if meta.kind == CHAT:
        return {"index": index, "message": {"role": "assistant", "content": ans.text,
                                            "refusal": None},
                "logprobs": lps, "finish_reason": finish}
    return {"index": index, "text": ans.text, "logprobs": lps, "finish_reason": finish}


def full_response(meta: Meta, tokenizer, answers: Union[Answer, list[Answer]]) -> dict:
    """The non-streaming response body: one choice per answer (`n`), indexed in order;
    usage counts the prompt once (the answers share it; cached tokens are the first
    answer's) and every answer's completion tokens."""
    if isinstance(answers, Answer):
        answers = [answers]
    first = answers[0]
    return {"id": meta.id, "object": "chat.completion" if meta.kind == CHAT else "text_completion",
            "created": meta.created, "model": meta.model,
            "choices": [_choice(meta, tokenizer, a, i) for i, a in enumerate(answers)],
            "usage": usage(first.prompt_tokens, sum(a.completion_tokens for a in answers),
                           first.cached_tokens),
            "service_tier": meta.service_tier, "system_fingerprint": None}


def chunk(meta: Meta, tokenizer, text: str, items: list[TokenLogprob],
          finish_reason: Optional[str] = None, first: bool = False, offset: int = 0,
          index: int = 0) -> dict:
    """One stream chunk with one choice, `index` (text delta, its logprobs, maybe the
    finish reason); `first`: that choice's first chunk (chat: it carries the role)."""
    if meta.kind == CHAT:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": _logprobs(meta, tokenizer, items),
                  "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text, "logprobs": _logprobs(meta, tokenizer, items, offset),
                  "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model,
            "choices": [choice], "service_tier": meta.service_tier, "system_fingerprint": None,
            "usage": None}


def usage_chunk(meta: Meta, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> dict:
    """The last chunk when `stream_options.include_usage` is set: no choices, the usage."""
    obj = "chat.completion.chunk" if meta.kind == CHAT else "text_completion"
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model,
            "choices": [], "service_tier": meta.service_tier, "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}
