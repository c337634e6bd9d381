"""Turn sampled tokens into `RequestOutput` deltas: detokenize incrementally, apply stop
conditions (EOS, stop token ids, stop strings, max_tokens, context length).

One `OutputState` per request, used only by the engine's step-loop thread. Text that could
be the start of a stop string is held back until it is known not to be one, so a stop string
never leaks into the streamed text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from conserve_jax.engine_api import RequestOutput, TokenLogprob
from conserve_jax.runtime.step_plan import SampledToken
from conserve_jax.scheduling.sequence import Sequence
from conserve_jax.tokenizer import IncrementalDetokenizer


@dataclass
class OutputState:
    detok: IncrementalDetokenizer
    text: str = ""  # all text decoded so far (stop string excluded once found)
    sent_chars: int = 0
    stop_found: bool = False
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos = set(tokenizer.eos_token_ids)

    def new_state(self) -> OutputState:
        return OutputState(IncrementalDetokenizer(self.tokenizer))

    def on_token(self, seq: Sequence, st: OutputState, tok: SampledToken) -> Optional[str]:
        """Record a sampled token; return the finish reason if the request is done."""
        sp = seq.request.sampling
        st.pending_ids.append(tok.token)
        if sp.logprobs is not None:
            st.pending_logprobs.append(TokenLogprob(tok.token, tok.logprob, tok.top))
        is_eos = tok.token in self.eos and not sp.ignore_eos
        if not is_eos and tok.token not in sp.stop_token_ids:
            st.text += st.detok.push([tok.token])
            if sp.stop:
                if self._cut_at_stop(st, sp.stop):
                    return "stop"
        if is_eos or tok.token in sp.stop_token_ids:
            return "stop"
        if seq.num_generated >= sp.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _cut_at_stop(st: OutputState, stops) -> bool:
        window = st.text[max(0, st.sent_chars - max(len(s) for s in stops)):]
        base = len(st.text) - len(window)
        hits = [base + window.find(s) for s in stops if s in window]
        if hits:
            st.text = st.text[: min(hits)]
            st.stop_found = True
        return bool(hits)

    def delta(self, seq: Sequence, st: OutputState, finished: bool) -> RequestOutput:
        """The output since the previous delta. While running, holds back text that might
        begin a stop string."""
        if finished and not st.stop_found:
            st.text += st.detok.finish()
        end = len(st.text)
        stops = seq.request.sampling.stop
        if not finished and stops:
            end = max(st.sent_chars, end - (max(len(s) for s in stops) - 1))
        out = RequestOutput(seq.request_id, st.pending_ids, st.text[st.sent_chars:end],
                            st.pending_logprobs, prompt_tokens=seq.prompt_len,
                            completion_tokens=seq.num_generated)
        st.sent_chars = end
        st.pending_ids, st.pending_logprobs = [], []
        return out
