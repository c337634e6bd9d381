"""ModelRunner: executes one iteration as embed -> grouped layer calls -> head -> sampler,
over a paged KV cache held as one donated device array pair per layer (`caches`, read and
replaced by runtime/kv_transfer.py).

Contract: constructed once by the engine; `execute` is called only from the engine's
step-loop thread, which owns the caches. Without a safepoint (online work, never abandoned)
an iteration runs `layers_per_call` layers per jitted call (default:
`default_layers_per_call`, three calls, with no safepoint between them). With a safepoint
it runs `ConserveConfig.safepoint_interval` layers per call (read here, once: the only
route the interval takes) and calls the safepoint between calls, after the device finished
them; the iteration may be abandoned there: the KV it wrote lies beyond every sequence's
committed length and is overwritten later, so dropping it is harmless. An abandoned iteration can also be continued from the
layer where it stopped: `take_suspended` hands out its state (the hidden rows after the
last finished layer) and `resume` runs the remaining layers, provided the caller kept the
iteration's sequences and their blocks untouched meanwhile (their KV for the finished
layers is already in those blocks), or cut them loose with `detach_decodes`. Every group of
one size shares one compiled executable per shape bucket; `warmup` compiles every (group
size, bucket) up front.

Multi-process (runtime/distributed.py): the mesh spans every process's devices and every
process runs the same jitted calls in the same order. On the leader (process 0) `channel`
is set: `execute` and `resume` send their padded batch arrays, and every safepoint its
decision, to the followers before the layers run; a follower's loop (runtime/follower.py)
feeds them to `execute_batch` and `resume`, and `close` tells it to stop.

Pipeline stage (`EngineConfig.pp` > 1, runtime/pipeline_stage.py): the runner is built over
the stage's layers only, its mesh over this process's own devices, with no plan channel;
the stage drives it through `embed_batch` (first stage) or `enter` (later stages: hidden
rows from the previous one), `forward` and `sample_device` (last stage).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from conserve_jax.config import EngineConfig, ModelConfig
from conserve_jax.models.llama import (AttentionMeta, embed_tokens, final_logits, layer_params,
                                       project, rope_inv_freq, rope_tables, run_layers)
from conserve_jax.runtime import sharding as shd
from conserve_jax.runtime.batch_arrays import BatchArrays, build_batch
from conserve_jax.runtime.buckets import BucketSet
from conserve_jax.runtime.kv_transfer import transfer_sizes
from conserve_jax.runtime.map_budget import ExecutablePlan, planned_executables
from conserve_jax.runtime.plan_channel import PlanChannel
from conserve_jax.runtime.sampler import sample, sampler_mode
from conserve_jax.runtime.step_plan import SampledToken, StepPlan, StepResult
from conserve_jax.runtime.step_watchdog import FirstCalls

log = logging.getLogger(__name__)

# per-layer params stored in `weight_dtype` (the rest, norms and biases, in `dtype`)
MATMUL_WEIGHTS = ("qkv", "o", "gate_up", "down")

# A safepoint callback gets the number of layers done and returns True to abandon.
Safepoint = Callable[[int], bool]


@dataclasses.dataclass
class SuspendedIteration:
    """An iteration abandoned at a safepoint, resumable from layer `layers_done` by
    `ModelRunner.resume`. Holds device arrays (the hidden rows, RoPE tables): owned by the
    step-loop thread; drop it to discard the iteration."""

    plan: StepPlan
    batch: BatchArrays
    hidden: Any  # [T, hidden] after layer `layers_done`
    rope: tuple  # (cos, sin)
    layers_done: int
    num_top: int = 0  # top logprobs the sampler returns (0: none)
    iteration: int = 0  # which `execute` started it (names it to followers)


def kv_bytes_per_block(cfg: ModelConfig, kv_heads: int, block_size: int, dtype) -> int:
    return 2 * cfg.num_layers * kv_heads * block_size * cfg.head_dim * jnp.dtype(dtype).itemsize


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, params: dict, engine_cfg: EngineConfig,
                 layers_per_call: Optional[int] = None) -> None:
        self.cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.dtype = jnp.dtype(engine_cfg.dtype)
        # matmul weights may be stored lower than the activations (see models.llama.project)
        self.weight_dtype = jnp.dtype(engine_cfg.weight_dtype or engine_cfg.dtype)
        self.block_size = engine_cfg.cache.block_size
        # a pipeline stage's mesh is its own process's devices (runtime/pipeline_stage.py)
        self.mesh = (shd.local_mesh if engine_cfg.pp > 1 else shd.make_mesh)(engine_cfg.tp)
        # the o/down reduction; `project` leaves it to the compiler's all-reduce
        self._row_parallel = shd.row_parallel_for(self.mesh, project) or project
        kv_repeat = shd.kv_repeat_for(engine_cfg.tp, model_cfg.num_kv_heads, model_cfg.num_heads)
        self.kv_heads = model_cfg.num_kv_heads * kv_repeat
        self.num_blocks = engine_cfg.kv_cache_blocks or max(
            2, engine_cfg.cache.kv_memory_bytes
            // kv_bytes_per_block(model_cfg, self.kv_heads, self.block_size, self.dtype))
        self.buckets = engine_buckets(engine_cfg)
        self.max_blocks_per_seq = self.buckets.max_blocks_per_seq
        n = model_cfg.num_layers
        self.layers_per_call, self.fast_groups, self.safepoint_every, self.safepoint_groups = \
            layer_groups(n, engine_cfg, layers_per_call)
        # every jitted call, keyed (function, shape bucket): a first call may compile, so
        # the leader's step watchdog does not count it (runtime/step_watchdog.py)
        self.first_calls = FirstCalls()
        self._place_weights(params, kv_repeat)
        self._build_functions()
        self.caches = self._new_caches()
        self._suspended: Optional[SuspendedIteration] = None
        self._iteration = 0
        self._ping = None  # (jitted all-reduce, its argument), built at the first `ping`
        self._rope = None  # jitted RoPE tables, built at the first `enter` (later stages)
        # leader of a multi-process run: followers get every plan and safepoint decision
        self.channel: Optional[PlanChannel] = None
        if engine_cfg.num_processes > 1 and engine_cfg.pp == 1 and engine_cfg.process_id == 0:
            self.channel = PlanChannel.connect(leader=True,
                                               timeout_s=engine_cfg.process_timeout_s)

    # ---- set-up -------------------------------------------------------------------------
    def _put(self, x, sharding=None):
        if self.mesh is None:
            return jnp.asarray(x)
        return shd.put(x, sharding or shd.replicated(self.mesh))

    def _place_weights(self, params: dict, kv_repeat: int) -> None:
        dt, wdt = self.dtype, self.weight_dtype
        layers = [layer_params(lp, self.cfg, np.float32, kv_repeat) for lp in params["layers"]]
        self._layer_sh = shd.layer_shardings(self.mesh, layers[0]) if self.mesh else None
        self.layers = []
        for lp in layers:
            placed = {}
            for k, a in lp.items():
                a = a.astype(wdt if k in MATMUL_WEIGHTS else dt)
                placed[k] = jnp.asarray(a) if self.mesh is None else shd.put(
                    a, self._layer_sh[k])
            self.layers.append(placed)
        # the embedding table doubles as the LM head when tied: stored as a matmul weight
        self.embed = self._put(np.asarray(params["embed"], np.float32).astype(wdt))
        self.final_norm = self._put(np.asarray(params["final_norm"], np.float32).astype(dt))
        self.tied = "lm_head" not in params
        self.head = self.embed if self.tied else self._put(
            np.asarray(params["lm_head"], np.float32).astype(wdt))
        self.inv_freq = self._put(rope_inv_freq(self.cfg))

    def _new_caches(self) -> list[tuple[jax.Array, jax.Array]]:
        shape = (self.kv_heads, self.num_blocks, self.block_size, self.cfg.head_dim)
        sh = shd.cache_sharding(self.mesh) if self.mesh else None
        make = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sh)
        return [(make(), make()) for _ in range(self.cfg.num_layers)]

    def _make_group_fn(self, size: int):
        """jit of `size` consecutive layers; caches donated (updated in place)."""
        cfg, chunk = self.cfg, self.buckets.attention_chunk
        row_parallel = self._row_parallel

        def group_fn(layers, x, cos, sin, caches, meta):
            return run_layers(layers, x, cos, sin, caches, meta, cfg=cfg,
                              attention_chunk=chunk, row_parallel=row_parallel)

        kw = {}
        if self.mesh is not None:
            rep, csh = shd.replicated(self.mesh), shd.cache_sharding(self.mesh)
            caches = [(csh, csh)] * size
            kw = dict(in_shardings=([self._layer_sh] * size, rep, rep, rep, caches, rep),
                      out_shardings=(rep, caches))
        return jax.jit(group_fn, donate_argnums=(4,), **kw)

    def _build_functions(self) -> None:
        # one executable per (group size, shape bucket)
        self._groups = {size: self._make_group_fn(size)
                        for size in sorted(set(self.fast_groups + self.safepoint_groups))}
        self._embed = jax.jit(functools.partial(embed_tokens, dtype=self.dtype))
        eps, tied = self.cfg.rms_norm_eps, self.tied

        self._select = jax.jit(lambda hidden, rows: hidden[rows])

        def head_fn(final_norm, head, hidden, temperature, top_k, top_p, seed, counter,
                    *, mode, num_top):
            logits = final_logits(final_norm, head, hidden, eps, tied)
            return sample(logits, temperature, top_k, top_p, seed, counter, mode=mode,
                          num_top=num_top)

        self._head = jax.jit(head_fn, static_argnames=("mode", "num_top"))

    # ---- execution ----------------------------------------------------------------------
    def compiled_count(self) -> int:
        """Executables compiled so far (tests assert it stays fixed after warm-up)."""
        fns = list(self._groups.values()) + [self._embed, self._select, self._head]
        fns += [self._rope] if self._rope is not None else []
        return sum(f._cache_size() for f in fns)

    def execute(self, plan: StepPlan, safepoint: Optional[Safepoint] = None) -> Optional[StepResult]:
        """Run one iteration. `safepoint(layers_done)` is called after every
        `safepoint_every` layers (the configured interval) and the iteration is abandoned
        (returns None) if it returns True;
        `take_suspended` then returns its state until the next abandoned iteration.
        With `safepoint=None` there are no safepoints."""
        b = build_batch(plan, self.buckets, self.block_size)
        num_top = self._num_top(plan)
        self._iteration += 1
        if self.channel is not None:
            self.channel.send_execute(b, num_top, safepoint is not None, self._iteration)
        return self.execute_batch(b, num_top, safepoint, self._iteration, plan)

    def execute_batch(self, b: BatchArrays, num_top: int, safepoint: Optional[Safepoint],
                      iteration: int, plan: Optional[StepPlan] = None) -> Optional[StepResult]:
        """`execute` on built batch arrays (a follower's entry; `plan` None: the sampled
        tokens are computed, as every process must, but not read back)."""
        return self._run(self.embed_batch(b, num_top, iteration, plan), safepoint)

    def embed_batch(self, b: BatchArrays, num_top: int, iteration: int,
                    plan: Optional[StepPlan] = None) -> SuspendedIteration:
        """The iteration before its first layer: the batch's tokens embedded, RoPE tables
        computed (`forward` runs its layers; a pipeline's first stage calls both)."""
        x, cos, sin = self.first_calls.call(("embed", len(b.token_ids)), self._embed,
                                            self.embed, b.token_ids, b.positions, self.inv_freq)
        return SuspendedIteration(plan, b, x, (cos, sin), 0, num_top, iteration)

    def enter(self, b: BatchArrays, hidden, num_top: int, iteration: int) -> SuspendedIteration:
        """The iteration at this runner's first layer, from the hidden rows [T, hidden] (a
        host array) a previous pipeline stage computed (runtime/pipeline_stage.py)."""
        if self._rope is None:
            self._rope = jax.jit(rope_tables)
        cos, sin = self.first_calls.call(("rope", len(b.positions)), self._rope, b.positions,
                                         self.inv_freq)
        return SuspendedIteration(None, b, self._put(hidden), (cos, sin), 0, num_top, iteration)

    def _num_top(self, plan: StepPlan) -> int:
        want = any(s.num_logprobs for s in plan.sampled_specs())
        return self.engine_cfg.max_logprobs if want else 0

    def resume(self, it: SuspendedIteration,
               safepoint: Optional[Safepoint] = None) -> Optional[StepResult]:
        """Continue an abandoned iteration (from `take_suspended`) at the layer where it
        stopped; the result is the one `execute` would have returned for its plan, provided
        the plan's sequences and block tables were left untouched in between. Safepoints as
        in `execute`; it may be abandoned again."""
        if self.channel is not None:
            self.channel.send_resume(it.batch, it.num_top, safepoint is not None, it.iteration)
        return self._run(it, safepoint)

    def ping(self) -> None:
        """Multi-process: one tiny all-reduce over every device of the mesh, the leader's
        message to the followers first (they join it); returns once it is done. An idle
        leader's check that every process still answers (runtime/step_watchdog.py)."""
        if self.channel is not None:
            self.channel.send_ping()
        self._all_reduce()

    def _all_reduce(self) -> None:
        if self._ping is None and self.mesh is None:  # one device: nothing to reduce over
            self._ping = (jax.jit(jnp.sum), jnp.zeros(1, jnp.float32))
        elif self._ping is None:
            arg = shd.put(np.zeros(self.mesh.size, np.float32),
                          jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
                              shd.AXIS)))
            self._ping = (jax.jit(jnp.sum, out_shardings=shd.replicated(self.mesh)), arg)
        fn, arg = self._ping
        self.first_calls.call(("ping",), fn, arg).block_until_ready()

    def close(self) -> None:
        """Leader: tell the followers the run is over (the engine's shutdown calls it)."""
        if self.channel is not None:
            self.channel.send_stop()
            self.channel = None

    @staticmethod
    def detach_decodes(it: SuspendedIteration, indices) -> SuspendedIteration:
        """`it` with the decode items at `indices` (positions in `it.plan.decodes`) cut
        loose: when resumed, their rows write KV to the scratch block instead of their
        sequences' blocks and their sampled tokens are to be ignored, so those sequences
        may run on (and their blocks change) meanwhile. The rows are still computed."""
        rows = np.asarray(list(indices), np.int64)  # decode item j is row j
        b = it.batch
        blocks, offsets = b.slot_blocks.copy(), b.slot_offsets.copy()
        blocks[rows], offsets[rows] = 0, 0
        return dataclasses.replace(it, batch=dataclasses.replace(b, slot_blocks=blocks,
                                                                 slot_offsets=offsets))

    def take_suspended(self) -> Optional[SuspendedIteration]:
        """The state of the last iteration abandoned at a safepoint (once; then None)."""
        it, self._suspended = self._suspended, None
        return it

    def _run(self, it: SuspendedIteration, safepoint: Optional[Safepoint]):
        self._suspended = None
        hidden = self.forward(it, safepoint)
        if hidden is None:
            return None
        return self._sample(it.plan, it.batch, hidden, it.num_top)

    def _meta(self, b: BatchArrays) -> AttentionMeta:
        """The batch's attention metadata on device: put once per iteration, not converted
        from numpy by every layer call (~0.1 ms per call here)."""
        return self._put_meta(AttentionMeta(b.slot_blocks, b.slot_offsets, b.positions,
                                            b.dec_tables, b.dec_lens, b.pre_tables,
                                            b.pre_start, b.pre_seq))

    def _put_meta(self, meta: AttentionMeta) -> AttentionMeta:
        if self.mesh is None:
            return jax.device_put(meta)
        rep = shd.replicated(self.mesh)
        return jax.tree_util.tree_map(lambda a: shd.put(a, rep), meta)

    def forward(self, it: SuspendedIteration, safepoint: Optional[Safepoint]):
        """Layers `it.layers_done`.. of the iteration: the hidden rows after the last
        layer, or None (state kept for `take_suspended`) if a safepoint abandons it."""
        x, (cos, sin), meta = it.hidden, it.rope, self._meta(it.batch)
        n = self.cfg.num_layers
        done = it.layers_done
        # a resumed iteration keeps the interval's groups (compiled; `done` is a multiple)
        groups = self.fast_groups if safepoint is None and done == 0 else \
            group_sizes(n - done, self.safepoint_every)
        for size in groups:
            if size not in self._groups:  # safepoints with no interval configured: one group
                self._groups[size] = self._make_group_fn(size)
            x, new = self.first_calls.call(
                ("layers", size, x.shape[0]), self._groups[size],
                self.layers[done: done + size], x, cos, sin, self.caches[done: done + size], meta)
            self.caches[done: done + size] = new
            done += size
            if safepoint is not None and done < n:
                x.block_until_ready()  # the safepoint is real only once the device got here
                abandon = safepoint(done)
                if self.channel is not None:  # followers stop (or go on) with the leader
                    self.channel.send_decision(done, abandon)
                if abandon:
                    self._suspended = dataclasses.replace(it, hidden=x, layers_done=done)
                    return None
        return x

    def _sample(self, plan: Optional[StepPlan], b: BatchArrays, hidden,
                num_top: int) -> StepResult:
        if not b.num_sampled:
            hidden.block_until_ready()
            return StepResult([], self.cfg.num_layers)
        out = self.sample_device(b, hidden, num_top)
        if plan is None:  # a follower: nothing to read back
            jax.block_until_ready(out[0])
            return StepResult([], self.cfg.num_layers)
        return step_result(plan, [np.asarray(a) for a in out], self.cfg.num_layers)

    def sample_device(self, b: BatchArrays, hidden, num_top: int) -> tuple:
        """Final norm, head and sampler on the batch's sampled rows of `hidden` (device
        arrays: tokens, chosen logprobs, top ids, top logprobs; padded to the row bucket)."""
        r, S = b.sampling, len(b.sample_rows)
        rows = self.first_calls.call(("select", hidden.shape[0], S), self._select, hidden,
                                     b.sample_rows)
        mode = sampler_mode(r, b.num_sampled)
        return self.first_calls.call(
            ("head", S, mode, num_top), self._head, self.final_norm, self.head, rows,
            r.temperature, r.top_k, r.top_p, r.seed, r.counter, mode=mode, num_top=num_top)

    # ---- warm-up ------------------------------------------------------------------------
    def warmup(self, shapes: Optional[list[int]] = None,
               progress: Optional[Callable[[int, int, int], None]] = None) -> float:
        """Compile every group size's executable for every token bucket (or `shapes`), the
        row select for each of those buckets and the sampler head for each row count they
        sample and every sampler variant. `progress(T, done, total)` follows each token bucket.
        Returns seconds."""
        t0 = time.perf_counter()
        b = self.buckets
        shapes = shapes if shapes is not None else b.layer_shapes()
        mb = b.max_blocks_per_seq
        for i, T in enumerate(shapes, 1):
            z = lambda *s: np.zeros(s, np.int32)
            dc = b.decode_rows(T)
            meta = self._put_meta(AttentionMeta(z(T), z(T), z(T), z(dc, mb), z(dc),
                                                z(b.max_prefill_seqs, mb), z(b.max_prefill_seqs),
                                                np.full(T, -1, np.int32)))
            x, cos, sin = self.first_calls.call(("embed", T), self._embed, self.embed, z(T),
                                                z(T), self.inv_freq)
            for size, fn in self._groups.items():
                _, new = self.first_calls.call(("layers", size, T), fn, self.layers[:size], x,
                                               cos, sin, self.caches[:size], meta)
                self.caches[:size] = new
            if progress is not None:
                progress(T, i, len(shapes))
        jax.block_until_ready(self.caches)
        for T, S in b.select_shapes():
            if T in shapes:
                self.first_calls.call(("select", T, S), self._select,
                                      jnp.zeros((T, self.cfg.hidden_size), self.dtype),
                                      np.zeros(S, np.int32))
        head_rows = sorted({b.sample_rows(T) for T in shapes})
        for S in head_rows:
            f32, i32 = np.zeros(S, np.float32), np.zeros(S, np.int32)
            hidden = jnp.zeros((S, self.cfg.hidden_size), self.dtype)
            for mode in ("greedy", "sample", "filter"):
                for num_top in (0, self.engine_cfg.max_logprobs):
                    self.first_calls.call(
                        ("head", S, mode, num_top), self._head, self.final_norm, self.head,
                        hidden, f32, i32, np.ones(S, np.float32), np.zeros(S, np.uint32), i32,
                        mode=mode, num_top=num_top)[0].block_until_ready()
        if self.engine_cfg.num_processes > 1 and self.engine_cfg.pp == 1:  # `ping`'s
            self._all_reduce()
        dt = time.perf_counter() - t0
        log.info("warm-up compiled %d token buckets x %d layer-group sizes and the sampler "
                 "in %.1f s", len(shapes), len(self._groups), dt)
        return dt


def step_result(plan: StepPlan, arrays, num_layers: int) -> StepResult:
    """The sampled rows (host arrays: tokens, chosen logprobs, top ids, top logprobs; at
    least one row per sampled spec of `plan`, in order) as the plan's `StepResult`."""
    tokens, chosen, top_ids, top_lp = arrays
    out = []
    for i, s in enumerate(plan.sampled_specs()):
        n = s.num_logprobs or 0
        top = [(int(top_ids[i, j]), float(top_lp[i, j])) for j in range(n)]
        out.append(SampledToken(int(tokens[i]), float(chosen[i]), top))
    return StepResult(out, num_layers)


def engine_buckets(engine_cfg: EngineConfig) -> BucketSet:
    """The shape buckets of a configuration (pure; the runner's and the start-up check's)."""
    max_blocks = -(-engine_cfg.max_model_len // engine_cfg.cache.block_size)
    return BucketSet.build(engine_cfg.max_num_seqs, engine_cfg.max_prefill_tokens,
                           engine_cfg.max_prefill_seqs, max_blocks, engine_cfg.attention_chunk)


def layer_groups(n: int, engine_cfg: EngineConfig, layers_per_call: Optional[int] = None):
    """(layers per call, groups without safepoints, safepoint interval, groups with
    safepoints) for a model of `n` layers. Iterations without safepoints run
    `layers_per_call` layers per call; with safepoints every k layers, k per call (the
    safepoint sits between calls). A shorter last group takes the remainder. Without a
    configured interval there are no safepoints, hence no groups of their own."""
    per_call = min(n, layers_per_call or engine_cfg.layers_per_call or default_layers_per_call(n))
    fast = group_sizes(n, per_call)
    interval = engine_cfg.conserve.safepoint_interval
    every = n if interval is None else max(1, min(n, interval))
    return per_call, fast, every, (fast if interval is None else group_sizes(n, every))


def planned_executables_for(model_cfg: ModelConfig, engine_cfg: EngineConfig,
                            checkpointing: bool) -> ExecutablePlan:
    """What an engine with this model and configuration compiles (`map_budget`)."""
    _, fast, _, safe = layer_groups(model_cfg.num_layers, engine_cfg)
    buckets = engine_buckets(engine_cfg)
    transfers = len(transfer_sizes(buckets.max_blocks_per_seq)) if checkpointing else 0
    return planned_executables(buckets, fast + safe, transfers)


def default_layers_per_call(num_layers: int) -> int:
    """Layers per call without safepoints by default: a third of the model, rounded up.
    Measured on this CPU (SmolLM2-135M, 30 layers, A/B in one process): three calls of 10
    layers ran batch-1 decode at 0.89-1.00 of one whole-model call's time, 8-32 sequences
    and 512-token prefill at 0.93-1.04 (noise), and compiled a third faster with a quarter
    less memory (groups of 5 and 3 were no better)."""
    return max(1, -(-num_layers // 3))


def group_sizes(num_layers: int, per_call: int) -> list[int]:
    """Layers per call for one pass over `num_layers`: `per_call` each, remainder last."""
    out = [per_call] * (num_layers // per_call)
    if num_layers % per_call:
        out.append(num_layers % per_call)
    return out
