"""`LLM`: the offline Python API, shaped like vLLM's.

    llm = LLM(model="default")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    outs = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=32))

Runs an `Engine` in-process (continuous batching and chunked prefill inside). `generate`
and `chat` may be called from one thread at a time; they block until every prompt is
answered. Iterations run without layer safepoints unless `safepoint_interval` is given:
nothing can arrive while `generate` blocks, so there is nothing to stop for (a safepoint
after every layer costs ~25% at batch 1 on CPU). `kv_cache_tokens=N` sizes the KV cache
in tokens (KV-bound experiments); a prompt's `SamplingParams.expected_output_tokens` is
passed on as a length hint.

One model over several processes (hosts): every process runs the same script with
`coordinator_address=, num_processes=, process_id=`; on process 0 `LLM` is an engine as
above, on every other process the constructor follows process 0's step plans and, when
process 0 closes its `LLM`, ends the process (`SystemExit(0)`): code after it runs on
process 0 only.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from conserve_jax.engine_args import engine_config
from conserve_jax.entrypoints.progress import RequestsBar
from conserve_jax.engine_api import (GenerationRequest, RequestClass, TokenLogprob,
                                     validate_prompt)
from conserve_jax.sampling_params import SamplingParams

Prompt = Union[str, list[int]]
Message = dict  # {"role": str, "content": str}
Conversation = list[Message]


@dataclass
class CompletionOutput:
    """One sampled answer, vLLM's `CompletionOutput` shape (`out.outputs[0].text`)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[TokenLogprob]]
    finish_reason: Optional[str]


@dataclass
class GenerateOutput:
    """The answer to one prompt. Its fields are the one answer's; `outputs` gives the same
    answer the vLLM way (`out.outputs[0].text`)."""

    prompt: Optional[str]
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    # prompt tokens whose KV came from the prefix cache (vLLM's num_cached_tokens)
    num_cached_tokens: int = 0

    @property
    def outputs(self) -> list[CompletionOutput]:
        """vLLM's `RequestOutput.outputs`: this answer as the one `CompletionOutput`."""
        cumulative = (sum(lp.logprob for lp in self.logprobs)
                      if self.logprobs is not None else None)
        return [CompletionOutput(0, self.text, self.token_ids, cumulative, self.logprobs,
                                 self.finish_reason)]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LLM:
    """`LLM(model=..., **engine_kwargs)`: every engine knob of `EngineConfig` (and its
    cache and policy groups) by its flat name, e.g. `max_num_seqs=8, block_size=16,
    num_blocks=256, policy="fcfs"`; an unknown name raises TypeError."""

    def __init__(self, model: str = "default", **engine_kwargs) -> None:
        from conserve_jax.engine.engine import Engine
        from conserve_jax.runtime.follower import follow_if_follower

        engine_kwargs.setdefault("safepoint_interval", None)
        config = engine_config(model=model, **engine_kwargs)
        if follow_if_follower(config) is not None:  # a follower: process 0 has closed
            raise SystemExit(0)
        self.engine = Engine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 offline: bool = True, use_tqdm: bool = True) -> list[GenerateOutput]:
        """One `GenerateOutput` per prompt, in order. A prompt is a string or a list of token
        ids. Raises ValueError naming the field for bad input before anything runs.
        `use_tqdm` (vLLM's default, on): a progress bar on stderr with the prompts done and
        the input/output tokens per second."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for "
                             f"{len(prompts)} prompts")
        requests, outputs = [], []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params)):
            field_name = f"prompts[{i}]" if len(prompts) > 1 else "prompt"
            if isinstance(p, str):
                ids = self.tokenizer.encode(p) if p else []
                text = p
            elif isinstance(p, (list, tuple)) and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in p):
                ids, text = list(p), None
            else:
                hint = "; for chat messages use LLM.chat" if isinstance(p, dict) or (
                    isinstance(p, (list, tuple)) and p and isinstance(p[0], dict)) else ""
                raise ValueError(f"{field_name} must be a string or a list of token ids, "
                                 f"got {type(p).__name__}{hint}")
            validate_prompt(ids, self.engine.vocab_size, self.engine.max_model_len, field_name)
            sp.validate(self.engine.config.max_logprobs, self.engine.vocab_size)
            cls = RequestClass.OFFLINE if offline else RequestClass.ONLINE
            requests.append(GenerationRequest(f"llm-{next(self._ids)}", ids, sp, cls,
                                              expected_output_tokens=sp.expected_output_tokens))
            outputs.append(GenerateOutput(text, ids, logprobs=[] if sp.logprobs is not None else None))
        streams = [self.engine.submit(r) for r in requests]
        with RequestsBar(len(streams), enabled=use_tqdm) as bar:
            for out, stream in zip(outputs, streams):
                for delta in stream:
                    out.token_ids.extend(delta.token_ids)
                    out.text += delta.text
                    if out.logprobs is not None:
                        out.logprobs.extend(delta.logprobs)
                    if delta.finished:
                        out.finish_reason = delta.finish_reason
                        out.num_cached_tokens = delta.num_cached_tokens or 0
                        if delta.error:
                            raise RuntimeError(f"request failed: {delta.error}")
                bar.done(len(out.prompt_token_ids), len(out.token_ids))
        return outputs

    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             offline: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: Optional[dict] = None,
             use_tqdm: bool = True) -> list[GenerateOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them,
        as vLLM's `LLM.chat`: each is rendered with the model's chat template (as
        transformers' `apply_chat_template` would), tokenized without adding special tokens
        again (the template places them), and generated like `generate`. One
        `GenerateOutput` per conversation, in order; its `prompt` is the rendered text.
        Raises ValueError naming the conversation for bad input before anything runs."""
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages) if isinstance(messages, (list, tuple)) else None
        if not conversations:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        tok = self.tokenizer
        if not getattr(tok, "has_chat_template", False):
            raise ValueError("messages: the model has no chat template; use LLM.generate with text")
        rendered: list[str] = []
        for i, conv in enumerate(conversations):
            name = f"messages[{i}]" if len(conversations) > 1 else "messages"
            if not isinstance(conv, (list, tuple)) or not conv or not all(isinstance(m, dict) for m in conv):
                raise ValueError(f"{name} must be a non-empty list of {{'role', 'content'}} dicts")
            try:
                rendered.append(tok.apply_chat_template(list(conv), add_generation_prompt=add_generation_prompt,
                                                        **(chat_template_kwargs or {})))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        ids = [tok.encode(text, add_special_tokens=False) for text in rendered]
        outputs = self.generate(ids, sampling_params, offline=offline, use_tqdm=use_tqdm)
        for out, text in zip(outputs, rendered):
            out.prompt = text
        return outputs

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
