"""A scheduler-level simulation without a model: the real `Scheduler`, `KVManager` and
policy, a fake runner whose "sampled" token at position p of request r is a fixed function
of (r, p) (so any schedule, eviction or recomputation must reproduce it), and a driver that
finishes each request at its true length. Used by the KV planning tests."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from conserve_jax.engine_args import engine_config
from conserve_jax.engine_api import SLO, GenerationRequest, RequestClass, RequestStream
from conserve_jax.kv.kv_manager import KVManager
from conserve_jax.runtime.step_plan import SampledToken, StepResult
from conserve_jax.sampling_params import SamplingParams
from conserve_jax.scheduling.policies import make_policy
from conserve_jax.scheduling.scheduler import Scheduler
from conserve_jax.request import Sequence


def token_at(rid: str, pos: int) -> int:
    return 5 + zlib.crc32(f"{rid}:{pos}".encode()) % 1000


@dataclass
class Sim:
    sched: Scheduler
    true_len: dict = field(default_factory=dict)
    done: dict = field(default_factory=dict)  # rid -> token_ids at finish
    steps: int = 0
    clock: float = 0.0

    @classmethod
    def build(cls, policy: str = "ecoserve", num_blocks: int = 65, max_num_seqs: int = 64,
              max_model_len: int = 1024, **kw) -> "Sim":
        cfg = engine_config(policy=policy, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           max_prefill_tokens=128, max_prefill_seqs=2, **kw)
        kv = KVManager(num_blocks, 16)
        return cls(Scheduler(cfg, kv, make_policy(cfg, lambda: None)))

    @property
    def policy(self):
        return self.sched.policy

    def submit(self, rid: str, prompt: list, true_len: int, max_tokens: int, hint=None,
               online: bool = True) -> Sequence:
        req = GenerationRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens,
                                                                  temperature=0.0),
                                RequestClass.ONLINE if online else RequestClass.OFFLINE,
                                SLO(), expected_output_tokens=hint)
        self.clock += 1e-3
        seq = Sequence(req, RequestStream(rid), 0, token_ids=list(prompt),
                       prompt_len=len(prompt), arrival=self.clock)
        self.true_len[rid] = min(true_len, max_tokens)
        self.sched.add(seq)
        self.policy.on_arrival(seq)
        return seq

    def step(self, check=None):
        """One iteration; `check(sim, step)` runs between schedule and commit."""
        step = self.sched.schedule()
        if check is not None:
            check(self, step)
        ordered = [e for e in step.entries if e.decode] + [e for e in step.entries if not e.decode]
        toks = [SampledToken(token_at(e.seq.request_id, len(e.seq.token_ids)), 0.0, [])
                for e in ordered if e.samples]
        out = self.sched.commit(step, StepResult(toks, 0))
        self.steps += 1
        for seq, _ in out:
            if seq.num_generated >= self.true_len[seq.request_id]:
                seq.finish_reason = "stop"
                self.sched.remove(seq)
                self.policy.on_finished(seq)
                self.done[seq.request_id] = list(seq.token_ids)
        return step

    def expected(self, seq_prompt: list, rid: str) -> list:
        ids = list(seq_prompt)
        for _ in range(self.true_len[rid]):
            ids.append(token_at(rid, len(ids)))
        return ids
