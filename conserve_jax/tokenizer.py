"""Tokenizer, chat templates and streaming detokenization.

Contract:
- `Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library transformers' fast tokenizers use,
  so text <-> ids matches transformers exactly) plus what the engine needs around it: the BOS id
  and whether `encode` prepends it, the set of EOS ids that stop generation, and the chat template.
- `encode(text)` never lets the backend's post-processor add special tokens; BOS is prepended by
  this class when `add_bos and add_special_tokens`, so BOS handling is the same for every source.
- `apply_chat_template` renders like transformers' `apply_chat_template(..., tokenize=False)`:
  sandboxed jinja2 with trim_blocks/lstrip_blocks, `raise_exception`, a non-HTML-escaping `tojson`,
  `strftime_now`, and the special token strings (bos_token, eos_token, ...) as variables.
- `IncrementalDetokenizer` turns a stream of generated ids into text deltas; it never emits a
  partial UTF-8 character, and the concatenated deltas plus `finish()` equal `decode(all_ids)`.

A `Tokenizer` is not mutated after construction (the compiled chat template is cached lazily,
which is benign under races), so it can be shared between threads; an `IncrementalDetokenizer`
holds one request's state and belongs to that request.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from typing import Iterable, Optional, Sequence

import tokenizers

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _token_content(value) -> Optional[str]:
    """A tokenizer_config special token entry is a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids for one model. See the module docstring for the contract."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: Optional[int] = None,
        eos_token_ids: Iterable[int] = (),
        add_bos: bool = False,
        chat_template: Optional[str] = None,
        special_tokens: Optional[dict] = None,
    ) -> None:
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: Optional[int] = None if bos_token_id is None else int(bos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos: bool = bool(add_bos) and self.bos_token_id is not None
        self.chat_template: Optional[str] = chat_template or None
        self._compiled_template = None
        self._special_strings: Optional[tuple[str, ...]] = None
        # Strings the chat template sees as variables (bos_token, eos_token, ...).
        tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        if "bos_token" not in tokens and self.bos_token_id is not None:
            tokens["bos_token"] = self.id_to_token(self.bos_token_id)
        if "eos_token" not in tokens and self.eos_token_ids:
            tokens["eos_token"] = self.id_to_token(self.eos_token_ids[0])
        self.special_tokens: dict = tokens

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_file(
        cls,
        path: str,
        tokenizer_config: Optional[dict] = None,
        *,
        bos_token_id: Optional[int] = None,
        eos_token_ids: Optional[Sequence[int]] = None,
        chat_template: Optional[str] = None,
    ) -> "Tokenizer":
        """Load a `tokenizer.json`; `tokenizer_config` is the parsed `tokenizer_config.json` (or None).

        bos/eos ids given explicitly (e.g. from the model config) win over the tokenizer config's
        token strings. `add_bos` comes from `add_bos_token` when the config says, else from whether
        the tokenizer.json post-processor prepends BOS. `chat_template` overrides the config's.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        backend = tokenizers.Tokenizer.from_file(path)
        cfg = dict(tokenizer_config or {})
        special = {k: _token_content(cfg.get(k)) for k in _SPECIAL_TOKEN_KEYS if _token_content(cfg.get(k))}

        if bos_token_id is None and "bos_token" in special:
            bos_token_id = backend.token_to_id(special["bos_token"])
        if eos_token_ids is None:
            eos_id = backend.token_to_id(special["eos_token"]) if "eos_token" in special else None
            eos_token_ids = () if eos_id is None else (eos_id,)

        if isinstance(cfg.get("add_bos_token"), bool):
            add_bos = cfg["add_bos_token"]
        else:
            add_bos = cls._post_processor_adds(backend, bos_token_id)

        template = chat_template if chat_template is not None else cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        # Padding/truncation settings in a tokenizer.json would change single encodes.
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids, add_bos=add_bos,
                   chat_template=template, special_tokens=special)

    @staticmethod
    def _post_processor_adds(backend: tokenizers.Tokenizer, bos_token_id: Optional[int]) -> bool:
        if bos_token_id is None:
            return False
        with_special = backend.encode("a", add_special_tokens=True).ids
        without = backend.encode("a", add_special_tokens=False).ids
        return len(with_special) > len(without) and with_special[0] == bos_token_id

    # ----------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special token strings in the text map to their ids."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._backend.id_to_token(int(i))

    def token_to_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (do not mutate)."""
        return self._backend

    @property
    def special_token_strings(self) -> tuple[str, ...]:
        """Strings that `encode` turns into control tokens (the backend's special added
        tokens and the configured bos/eos/... tokens). The server refuses user chat content
        that contains one, so a user cannot fake a turn of another role."""
        if self._special_strings is None:
            found = {t.content for t in self._backend.get_added_tokens_decoder().values()
                     if t.special}
            found |= {v for v in self.special_tokens.values() if isinstance(v, str)}
            self._special_strings = tuple(sorted(s for s in found if s))
        return self._special_strings

    # ----------------------------------------------------------------- chat
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) into a prompt string.

        Raises ValueError when there is no template or a message is malformed; a template's own
        `raise_exception(...)` surfaces as ValueError too.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        clean = []
        for n, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise ValueError(f"message {n} is not a dict: {msg!r}")
            if not isinstance(msg.get("role"), str) or not msg["role"]:
                raise ValueError(f"message {n} has no 'role' string")
            if not isinstance(msg.get("content"), str):
                raise ValueError(f"message {n} has no 'content' string")
            clean.append(dict(msg))
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        import jinja2

        variables = dict(self.special_tokens)
        variables.update(extra)
        try:
            return self._compiled_template.render(
                messages=clean, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e


class IncrementalDetokenizer:
    """Per-request streaming detokenizer: push(new_ids) -> text delta; never emits a partial UTF-8 char (hold back while the decoded text ends with U+FFFD), works with byte-level BPE; finish() -> remaining text.

    It decodes a short window of recent ids (from `prefix_offset`) both without and with the new
    ids and emits the difference, so each step costs O(window), not O(sequence). When
    `prompt_ids` is given, the last few prompt ids seed the window so that the first generated
    token is decoded in context (matters for sentencepiece-style leading spaces); the deltas then
    equal `decode(prompt + generated)[len(decode(prompt)):]` rather than `decode(generated)`.
    """

    _CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 prompt_ids: Optional[Sequence[int]] = None) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = [int(i) for i in (prompt_ids or ())][-self._CONTEXT:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.num_tokens = 0

    def _pending(self) -> tuple[str, str]:
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset:], self._skip)
        return prefix, full

    def push(self, new_ids: Iterable[int]) -> str:
        """Append generated ids; return the newly completed text (possibly "")."""
        added = [int(i) for i in new_ids]
        if not added:
            return ""
        self._ids.extend(added)
        self.num_tokens += len(added)
        prefix, full = self._pending()
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT_CHAR):
            delta = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def finish(self) -> str:
        """Flush whatever is held back (an incomplete character decodes as U+FFFD)."""
        prefix, full = self._pending()
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix):]
