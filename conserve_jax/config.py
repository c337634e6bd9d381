"""Configuration dataclasses: model architecture, KV cache, engine.

Plain data, no behaviour beyond validation and derived values. Created by the loader
(`ModelConfig`) and by entry points (`EngineConfig`); read by every other module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


@dataclass
class CacheConfig:
    """Paged KV cache geometry. `num_blocks` None means: size from `kv_memory_bytes`."""

    block_size: int = 16
    num_blocks: Optional[int] = None
    kv_memory_bytes: int = 1 << 30
    host_pool_bytes: int = 1 << 30  # host checkpoint pool for offline KV


@dataclass
class EngineConfig:
    """Everything an engine needs besides the weights. Built explicitly by entry points."""

    model: str = "default"
    tp: int = 1
    dtype: str = "float32"
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_prefill_tokens: int = 512  # prefill tokens per iteration (chunk budget)
    # prompts chunked into one iteration: packing several makes every prefill row score the
    # context of every packed sequence, so 1 is fastest on CPU
    max_prefill_seqs: int = 1
    cache: CacheConfig = field(default_factory=CacheConfig)
    # layers between preemption safepoints in iterations that carry offline work (the policy
    # passes it to the runner per iteration; online-only iterations have no safepoints)
    safepoint_interval: int = 1
    max_logprobs: int = 20
    compilation_cache_dir: Optional[str] = None
    policy: str = "conserve"
    seed: int = 0
    # online latency objectives used when a request gives none (seconds)
    default_ttft_s: float = 2.0
    default_tpot_s: float = 0.2
    latency_model_path: Optional[str] = None  # from `conserve-jax profile`; None: profile at start
    sarathi_token_budget: int = 256  # tokens per iteration for the `sarathi` baseline
    warmup: bool = False  # compile every shape bucket before serving
    # `conserve` isolation target F: an iteration with online work may carry offline tokens
    # only while its predicted time stays within F x that of its online work alone (and within
    # the TPOT objective); an online arrival preempts offline work unless it would still start
    # within (F - 1) x its own predicted online-only TTFT. None ("off"): fill to the objective.
    isolation: Optional[float] = 1.2

    def __post_init__(self) -> None:
        self.isolation = parse_isolation(self.isolation)
        if self.safepoint_interval < 1:
            raise ValueError(f"safepoint_interval must be >= 1, got {self.safepoint_interval}")


def parse_isolation(value) -> Optional[float]:
    """`isolation` from a flag or keyword: a number >= 1, or None / "off" (fill-to-objective).
    Raises ValueError naming the field for anything else (also usable as an argparse type)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"isolation must be a number >= 1 or 'off', got {value!r}") from None
    if not f >= 1.0 or f == float("inf"):
        raise ValueError(f"isolation must be a number >= 1 or 'off', got {value!r}")
    return f
