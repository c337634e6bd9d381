"""Turn sampled tokens into `RequestOutput` deltas: detokenize incrementally, apply stop
conditions (EOS, stop token ids, stop strings, max_tokens, context length).

Split by thread. `token_finish_reason` is asked by the engine's step-loop thread, which
must know at once when a token ends a request (EOS, stop token id, max_tokens, context).
Everything textual — detokenizing, stop strings, building deltas — runs on the output
thread (`OutputDelivery`), one `OutputState` per request, touched by that thread only.
Text that could be the start of a stop string is held back until it is known not to be
one, so a stop string never leaks into the streamed text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from conserve_jax.engine_api import GenerationRequest, RequestOutput, TokenLogprob
from conserve_jax.runtime.step_plan import SampledToken
from conserve_jax.detokenizer import make_detokenizer


@dataclass
class OutputState:
    detok: object  # conserve_jax.detokenizer.make_detokenizer's: push(ids) / finish()
    text: str = ""  # all text decoded so far (stop string excluded once found)
    sent_chars: int = 0
    stop_found: bool = False
    num_generated: int = 0  # tokens delivered to this request's stream (or pending)
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos = set(tokenizer.eos_token_ids)

    # ---- step-loop thread -----------------------------------------------------------------
    def token_finish_reason(self, request: GenerationRequest, token: int, num_generated: int,
                            num_tokens: int) -> Optional[str]:
        """The finish reason a just-sampled token gives by itself (no text needed):
        "stop" for EOS or a stop token id, "length" for max_tokens or the context."""
        sp = request.sampling
        if (token in self.eos and not sp.ignore_eos) or token in sp.stop_token_ids:
            return "stop"
        if num_generated >= sp.max_tokens or num_tokens >= self.max_model_len:
            return "length"
        return None

    # ---- output thread --------------------------------------------------------------------
    def new_state(self) -> OutputState:
        return OutputState(make_detokenizer(self.tokenizer))

    def on_token(self, request: GenerationRequest, st: OutputState, tok: SampledToken) -> bool:
        """Record a sampled token; True when a stop string has now appeared."""
        sp = request.sampling
        st.num_generated += 1
        st.pending_ids.append(tok.token)
        if sp.logprobs is not None:
            st.pending_logprobs.append(TokenLogprob(tok.token, tok.logprob, tok.top))
        is_eos = tok.token in self.eos and not sp.ignore_eos
        if not is_eos and tok.token not in sp.stop_token_ids:
            st.text += st.detok.push([tok.token])
            if sp.stop:
                return self._cut_at_stop(st, sp.stop)
        return False

    @staticmethod
    def _cut_at_stop(st: OutputState, stops) -> bool:
        window = st.text[max(0, st.sent_chars - max(len(s) for s in stops)):]
        base = len(st.text) - len(window)
        hits = [base + window.find(s) for s in stops if s in window]
        if hits:
            st.text = st.text[: min(hits)]
            st.stop_found = True
        return bool(hits)

    def delta(self, request: GenerationRequest, prompt_len: int, st: OutputState,
              finished: bool) -> RequestOutput:
        """The output since the previous delta. While running, holds back text that might
        begin a stop string."""
        if finished and not st.stop_found:
            st.text += st.detok.finish()
        end = len(st.text)
        stops = request.sampling.stop
        if not finished and stops:
            end = max(st.sent_chars, end - (max(len(s) for s in stops) - 1))
        out = RequestOutput(request.request_id, st.pending_ids, st.text[st.sent_chars:end],
                            st.pending_logprobs, prompt_tokens=prompt_len,
                            completion_tokens=st.num_generated)
        st.sent_chars = end
        st.pending_ids, st.pending_logprobs = [], []
        return out
