"""Streaming detokenization on `tokenizers`' `DecodeStream` (what vLLM uses): the same
contract as `conserve_jax.tokenizer.IncrementalDetokenizer` — `push(new_ids)` returns the
newly completed text, never a partial UTF-8 character; `finish()` flushes what is held back
(an incomplete character as U+FFFD); with `prompt_ids` the first generated token is decoded
in the context of the prompt's last ids — but each token costs one step of Rust code instead
of two Python-level decodes of a window.

`make_detokenizer` picks it for a `Tokenizer` backed by a `tokenizers.Tokenizer` and falls
back to `IncrementalDetokenizer` for anything else (e.g. the mock engine's tokenizer). On
broken byte sequences DecodeStream can raise ("Invalid prefix encountered"); the request
then continues on `IncrementalDetokenizer` from the text already emitted. Token by token on
valid text the deltas equal `IncrementalDetokenizer`'s; on broken bytes the count of U+FFFD
may differ. The engine's output thread builds its detokenizers with `make_detokenizer`
(`OutputProcessor.new_state`).
One instance per request; used by one thread at a time (the output thread).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from conserve_jax.tokenizer import IncrementalDetokenizer

_CONTEXT = 5  # prompt ids that seed the stream, as IncrementalDetokenizer's window


class StreamDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True,
                 prompt_ids: Optional[Sequence[int]] = None) -> None:
        from tokenizers.decoders import DecodeStream

        self._tok = tokenizer
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        context = [int(i) for i in (prompt_ids or ())][-_CONTEXT:]
        self._stream = DecodeStream(ids=context or None, skip_special_tokens=skip_special_tokens)
        self._emitted = context  # the last ids whose text is out (context for `finish`)
        self._held: list[int] = []  # ids pushed since the last emitted chunk
        self._fallback: Optional[IncrementalDetokenizer] = None  # after DecodeStream failed
        self.num_tokens = 0

    def push(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; return the newly completed text (possibly "")."""
        ids = [int(i) for i in new_ids]
        self.num_tokens += len(ids)
        if self._fallback is not None:
            return self._fallback.push(ids)
        out = []
        for k, i in enumerate(ids):
            self._held.append(i)
            try:
                chunk = self._stream.step(self._backend, i)
            except Exception:  # DecodeStream's "Invalid prefix encountered" on broken bytes
                return "".join(out) + self._fall_back(ids[k + 1:])
            if chunk is not None:
                out.append(chunk)
                self._emitted = (self._emitted + self._held)[-_CONTEXT:]
                self._held = []
        return "".join(out)

    def _fall_back(self, rest: list[int]) -> str:
        """Continue this request with the window algorithm, from the emitted context."""
        self._fallback = IncrementalDetokenizer(self._tok, self._skip, self._emitted)
        held, self._held = self._held, []
        return self._fallback.push(held + rest)

    def finish(self) -> str:
        """Flush whatever is held back (an incomplete character decodes as U+FFFD)."""
        if self._fallback is not None:
            return self._fallback.finish()
        if not self._held:
            return ""
        prefix = self._tok.decode(self._emitted, self._skip)
        full = self._tok.decode(self._emitted + self._held, self._skip)
        self._emitted, self._held = (self._emitted + self._held)[-_CONTEXT:], []
        return full[len(prefix):]


def make_detokenizer(tokenizer, skip_special_tokens: bool = True,
                     prompt_ids: Optional[Sequence[int]] = None):
    """A `StreamDetokenizer` when `tokenizer` has a `tokenizers` backend and the installed
    `tokenizers` has `DecodeStream`; an `IncrementalDetokenizer` otherwise."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        try:
            from tokenizers.decoders import DecodeStream  # noqa: F401 (tokenizers >= 0.21)
        except ImportError:
            pass
        else:
            return StreamDetokenizer(tokenizer, skip_special_tokens, prompt_ids)
    return IncrementalDetokenizer(tokenizer, skip_special_tokens, prompt_ids)
