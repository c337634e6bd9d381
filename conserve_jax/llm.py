"""`LLM`: the offline Python API, shaped like vLLM's.

    llm = LLM(model="default")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))

Runs an `Engine` in-process (continuous batching and chunked prefill inside).
`kv_cache_tokens=N` sizes the KV cache in tokens (KV-bound experiments); a prompt's
`SamplingParams.expected_output_tokens` is passed on as a length hint. `generate`
may be called from one thread at a time; it blocks until every prompt is answered.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.engine_api import (GenerationRequest, RequestClass, TokenLogprob,
                                     validate_prompt)
from conserve_jax.sampling_params import SamplingParams

Prompt = Union[str, list[int]]


@dataclass
class GenerateOutput:
    """The answer to one prompt."""

    prompt: Optional[str]
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None


class LLM:
    def __init__(self, model: str = "default", tp: int = 1, dtype: str = "float32",
                 max_model_len: int = 2048, max_num_seqs: int = 32,
                 max_prefill_tokens: int = 512, block_size: int = 16,
                 num_blocks: Optional[int] = None, kv_memory_bytes: int = 1 << 30,
                 policy: str = "conserve", seed: int = 0, warmup: bool = False,
                 compilation_cache_dir: Optional[str] = None,
                 kv_cache_tokens: Optional[int] = None, **engine_kw) -> None:
        from conserve_jax.engine import Engine

        cfg = EngineConfig(model=model, tp=tp, dtype=dtype, max_model_len=max_model_len,
                           max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
                           cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                             kv_memory_bytes=kv_memory_bytes),
                           policy=policy, seed=seed, compilation_cache_dir=compilation_cache_dir,
                           kv_cache_tokens=kv_cache_tokens, **engine_kw)
        self.engine = Engine(cfg, warmup=warmup)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 offline: bool = True) -> list[GenerateOutput]:
        """One `GenerateOutput` per prompt, in order. A prompt is a string or a list of token
        ids. Raises ValueError naming the field for bad input before anything runs."""
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
            if isinstance(p, str):
                ids = self.tokenizer.encode(p) if p else []
                text = p
            else:
                ids, text = [int(t) for t in p], None
            field_name = f"prompts[{i}]" if len(prompts) > 1 else "prompt"
            validate_prompt(ids, self.engine.vocab_size, self.engine.max_model_len, field_name)
            sp.validate(self.engine.config.max_logprobs, self.engine.vocab_size)
            cls = RequestClass.OFFLINE if offline else RequestClass.ONLINE
            requests.append(GenerationRequest(f"llm-{next(self._ids)}", ids, sp, cls,
                                              expected_output_tokens=sp.expected_output_tokens))
            outputs.append(GenerateOutput(text, ids, logprobs=[] if sp.logprobs is not None else None))
        streams = [self.engine.submit(r) for r in requests]
        for out, stream in zip(outputs, streams):
            for delta in stream:
                out.token_ids.extend(delta.token_ids)
                out.text += delta.text
                if out.logprobs is not None:
                    out.logprobs.extend(delta.logprobs)
                if delta.finished:
                    out.finish_reason = delta.finish_reason
                    if delta.error:
                        raise RuntimeError(f"request failed: {delta.error}")
        return outputs

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
