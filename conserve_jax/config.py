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


def _h(text: str, **kw):
    """A dataclass field whose help text the generated command-line flag shows."""
    return field(metadata={"help": text}, **kw)


@dataclass
class CacheConfig:
    """Paged KV cache geometry. `num_blocks` None means: size from `kv_memory_bytes`."""

    block_size: int = _h("tokens per KV block", default=16)
    num_blocks: Optional[int] = _h("KV blocks on device (default: from --kv-memory-bytes)",
                                   default=None)
    kv_memory_bytes: int = _h("device memory for the KV cache when --num-blocks is not given",
                              default=1 << 30)
    host_pool_bytes: int = _h("host memory for offline KV checkpoints", default=1 << 30)


@dataclass
class ConserveConfig:
    """Every knob of the `conserve` policy (isolation, layer-wise preemption, KV reservation)
    and of the latency model's online correction; the policy gets this one object.
    `safepoint_interval` also sets the runner's layer groups (the runner reads it; the policy
    only decides whether an iteration has safepoints)."""

    isolation: Optional[float] = _h(
        "conserve: online latency within this factor of serving the online work alone; an "
        "iteration with online work carries offline tokens only within F x its online work's "
        "predicted time, and an online arrival preempts offline work unless it would still "
        "start within (F - 1) x its own predicted TTFT. 'off': fill iterations up to the TPOT "
        "objective", default=1.2)
    safepoint_interval: Optional[int] = _h(
        "layers between preemption safepoints in iterations that carry offline work "
        "(iterations with only online work have none); none: no safepoints, an online arrival "
        "waits for the running iteration (LLM's default: nothing arrives while generate "
        "blocks)", default=1)
    offline_kv_reservation: bool = _h(
        "conserve: reserve KV for offline requests by predicted response length and admit "
        "them KV-heavy-first with aging", default=False)
    tpot_margin: float = _h("offline work fills an iteration up to this fraction of the "
                            "tightest online TPOT objective", default=0.9)
    min_online_chunk: int = _h("an online prompt always advances at least this many tokens "
                               "per iteration", default=32)
    resume_abandoned: bool = _h("continue an offline iteration preempted at a safepoint "
                                "from the layer where it stopped, once no online work is "
                                "left (off: discard it and recompute its tokens)",
                                default=True)
    correction_alpha: float = _h("weight of one measured iteration in the latency model's "
                                 "online correction", default=0.05)
    correction_clamp: float = _h("one measurement moves the correction by at most this factor "
                                 "(and at least its inverse)", default=4.0)
    deadline_policy: str = _h(
        "offline work of jobs at risk of missing their deadline: 'isolate' (served first "
        "among offline work; online isolation is never relaxed, a job that cannot make it "
        "expires) or 'borrow' (also rides along online iterations up to --isolation-max x "
        "their online work's predicted time, only while at risk)", default="isolate")
    isolation_max: float = _h(
        "deadline_policy borrow: the isolation factor at-risk offline work may use (>= "
        "--isolation)", default=1.5)

    def __post_init__(self) -> None:
        self.isolation = parse_isolation(self.isolation)
        if self.deadline_policy not in ("isolate", "borrow"):
            raise ValueError(f"deadline_policy must be 'isolate' or 'borrow', got "
                             f"{self.deadline_policy!r}")
        if not (self.isolation_max >= 1.0 and self.isolation_max != float("inf")):
            raise ValueError(f"isolation_max must be a number >= 1, got {self.isolation_max!r}")
        if self.deadline_policy == "borrow" and self.isolation is not None \
                and self.isolation_max < self.isolation:
            raise ValueError(f"isolation_max ({self.isolation_max}) must be >= isolation "
                             f"({self.isolation})")
        if self.safepoint_interval is not None and self.safepoint_interval < 1:
            raise ValueError(f"safepoint_interval must be >= 1, got {self.safepoint_interval}")


@dataclass
class EngineConfig:
    """Everything an engine needs besides the weights. Built by `engine_args` from flags
    (serve, generate, profile, benchmarks) or keyword arguments (`LLM(**kw)`)."""

    model: str = _h("default, a Hugging Face directory, a .gguf file, or random:<preset>",
                    default="default")
    tp: int = _h("tensor-parallel devices (multi-process: every process's devices; the "
                 "default 1 means all of them)", default=1)
    dtype: str = _h("weights, activations and KV dtype; auto: bfloat16 on GPU/TPU, float32 "
                    "on CPU (float32 is fastest on CPU)", default="float32")
    weight_dtype: Optional[str] = _h(
        "dtype of the stored matmul weights, if lower than --dtype (e.g. bfloat16): matmul "
        "inputs are rounded to it, products accumulate in float32, everything else (norms, "
        "attention, KV) stays in --dtype; bfloat16 runs 2-3x faster matmuls at 8+ rows on "
        "CPUs with AMX/AVX512-BF16, and halves weight memory (none: same as --dtype)",
        default=None)
    max_model_len: int = _h("context length (prompt + output)", default=2048)
    max_num_seqs: int = _h("sequences running at once", default=32)
    max_prefill_tokens: int = _h("prefill tokens per iteration (chunk budget)", default=512)
    # packing several prompts makes every prefill row score the context of every packed
    # sequence, so 1 is fastest on CPU
    max_prefill_seqs: int = _h("prompts chunked into one iteration", default=1)
    cache: CacheConfig = field(default_factory=CacheConfig)
    layers_per_call: Optional[int] = _h(
        "layers per jitted call in iterations without safepoints (default: a third of the "
        "model, rounded up, so three calls: measured here as fast as one whole-model call "
        "or a few percent faster, and a third quicker to compile; 1: a call per layer, "
        "slower)", default=None)
    attention_chunk: int = _h(
        "KV blocks attention reads per loop trip: every row reads its sequence's context "
        "from the paged cache chunk by chunk, only as far as the longest context of the "
        "iteration (a trip count that is data, not a compiled shape), so the gathered K/V "
        "stay in cache; what whole chunks leave over is read a quarter chunk a trip (0: "
        "the whole block table per trip)", default=16)
    max_logprobs: int = _h("largest logprobs a request may ask for", default=20)
    compilation_cache_dir: Optional[str] = _h("persistent XLA cache (default: "
                                              "~/.cache/conserve-jax/xla)", default=None)
    policy: str = _h("scheduling policy", default="conserve")
    seed: int = _h("seed for requests that give none", default=0)
    default_ttft_s: float = _h("TTFT objective of online requests that give none (s)",
                               default=2.0)
    default_tpot_s: float = _h("TPOT objective of online requests that give none (s)",
                               default=0.2)
    latency_model_path: Optional[str] = _h("latency model from `conserve-jax profile` "
                                           "(default: profile at start, cached)", default=None)
    sarathi_token_budget: int = _h("tokens per iteration of the sarathi baseline", default=256)
    warmup: bool = _h("compile every executable (each token bucket x layer-group size, the "
                      "sampler, the KV transfers) at start, so that serving never compiles on "
                      "users' time; a second start takes seconds (persistent compilation "
                      "cache). --no-warmup: compile on first use (tests)", default=True)
    enable_prefix_caching: bool = _h(
        "reuse the KV of full blocks whose token prefix another request computed (a shared "
        "instruction, an earlier chat turn): a prompt prefills only its uncached part; "
        "requests share only with requests of the same cache salt (the server's tenant)",
        default=True)
    prefix_group_hold_s: float = _h(
        "prefix caching: an offline request whose prompt shares a not yet cached prefix with "
        "an offline request computing it waits for it, at most this long (s)", default=10.0)
    kv_cache_tokens: Optional[int] = _h(
        "KV cache size in tokens, rounded up to whole blocks (overrides --num-blocks and "
        "--kv-memory-bytes; for KV-bound experiments)", default=None)
    conserve: ConserveConfig = field(default_factory=ConserveConfig)
    # one model over several processes (hosts): runtime/distributed.py
    coordinator_address: Optional[str] = _h(
        "multi-process run: host:port of the jax.distributed coordinator, which process 0 "
        "starts (every process passes the same address)", default=None)
    num_processes: int = _h(
        "processes (one per host) serving one model over one device mesh: process 0 runs "
        "the scheduler and the faces, the others run its step plans on their shards",
        default=1)
    process_id: int = _h("this process's index in a multi-process run (0: the leader)",
                         default=0)
    pp: int = _h(
        "pipeline stages, one per process (num_processes must equal it): each process holds "
        "a contiguous range of the layers and their KV, tensor parallel over its own devices "
        "only (--tp: devices per stage, default all of this process's); hidden rows go from "
        "stage to stage over TCP (runtime/pipeline_*.py). 1: tensor parallelism over every "
        "process's devices", default=1)
    cpu_devices: Optional[int] = _h(
        "CPU devices of this process (jax_num_cpu_devices, set before JAX starts; none: "
        "JAX's default)", default=None)
    process_timeout_s: int = _h(
        "multi-process: a process silent this long (no heartbeat to the coordinator) is "
        "dead and every process exits with an error; start-up waits for the others "
        "10x as long", default=30)
    step_timeout_s: Optional[float] = _h(
        "multi-process, process 0: an engine step that waits longer than this on the other "
        "processes (a collective, a plan send; compile time not counted) means one hangs: "
        "the engine stops, health turns NOT_SERVING, streams end with an error and `serve` "
        "exits with code 3, before the heartbeat timeout would abort the process; an idle "
        "process 0 checks the others every half of this; at most half of "
        "--process-timeout-s (none: a third of it)", default=None)

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}), got "
                             f"{self.process_id}")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError("num_processes > 1 needs coordinator_address (host:port)")
        self._check_pipeline()
        if self.cpu_devices is not None and self.cpu_devices < 1:
            raise ValueError(f"cpu_devices must be >= 1, got {self.cpu_devices}")
        if self.process_timeout_s < 1:
            raise ValueError(f"process_timeout_s must be >= 1, got {self.process_timeout_s}")
        if self.step_timeout_s is not None and not (
                0 < self.step_timeout_s <= self.process_timeout_s / 2):
            raise ValueError(
                f"step_timeout_s must be > 0 and at most half of process_timeout_s "
                f"({self.process_timeout_s} s: JAX's heartbeat timeout, which aborts the "
                f"process), got {self.step_timeout_s}")
        if self.attention_chunk < 0:
            raise ValueError(f"attention_chunk must be >= 0, got {self.attention_chunk}")
        if self.prefix_group_hold_s < 0:
            raise ValueError(f"prefix_group_hold_s must be >= 0, got {self.prefix_group_hold_s}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {self.kv_cache_tokens}")

    def _check_pipeline(self) -> None:
        """What a pipeline run (`pp` > 1) cannot do yet is refused here, on every process."""
        if self.pp < 1:
            raise ValueError(f"pp must be >= 1, got {self.pp}")
        if self.pp == 1:
            return
        if self.num_processes != self.pp:
            raise ValueError(f"pp={self.pp} runs one pipeline stage per process: "
                             f"num_processes must equal pp, got num_processes="
                             f"{self.num_processes}")

    @property
    def step_bound_s(self) -> float:
        """The step watchdog's bound (`step_timeout_s`, default a third of
        `process_timeout_s`: a hung peer's heartbeats were seen missing after 0.8 of it)."""
        return self.step_timeout_s if self.step_timeout_s is not None \
            else self.process_timeout_s / 3

    @property
    def kv_cache_blocks(self) -> Optional[int]:
        """Blocks the KV cache should have, the scratch block included (None: the cache
        config decides)."""
        if self.kv_cache_tokens is None:
            return self.cache.num_blocks
        return -(-self.kv_cache_tokens // self.cache.block_size) + 1

    def kv_content(self) -> dict:
        """What the values in a KV block depend on besides its tokens: the prefix cache's
        key root (`Engine._cache_root`) and a saved checkpoint's layout
        (`OfflineSuspension.layout`) both start from this, so that neither can miss a field
        the other has (weights, their seed and dtype, the compute dtype, the block size)."""
        return {"model": self.model,
                "weights_seed": self.seed if self.model.startswith("random:") else None,
                "dtype": self.dtype, "weight_dtype": self.weight_dtype,
                "block_size": self.cache.block_size}


def parse_isolation(value) -> Optional[float]:
    """`isolation` from a flag or keyword: a number >= 1, or None / "off" (fill-to-objective).
    Raises ValueError naming the field for anything else."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"isolation must be a number >= 1 or 'off', got {value!r}") from None
    if not f >= 1.0 or f == float("inf"):
        raise ValueError(f"isolation must be a number >= 1 or 'off', got {value!r}")
    return f
