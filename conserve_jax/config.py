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
    safepoint_interval: int = 4  # layers between preemption safepoints
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
    # KV cache size in tokens (rounded up to whole blocks, plus the scratch block); when set
    # it decides the number of blocks, overriding cache.num_blocks and kv_memory_bytes
    kv_cache_tokens: Optional[int] = None
    # `conserve`: reserve KV for offline requests by predicted response length and admit
    # them KV-heavy-first with aging (scheduling/kv_planner.py)
    offline_kv_reservation: bool = False

    def __post_init__(self) -> None:
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {self.kv_cache_tokens}")

    @property
    def kv_cache_blocks(self) -> Optional[int]:
        """Blocks the KV cache should have (None: the cache config decides)."""
        if self.kv_cache_tokens is None:
            return self.cache.num_blocks
        return -(-self.kv_cache_tokens // self.cache.block_size) + 1
