"""What a `deadlines.DeadlineTracker` is built from, read off the engine and the stored
requests: the work units of the engine (`engine_work_cost`), how much faster borrowing can
serve an at-risk job (`borrow_gain_of`, for admission) and a stored request's length
inputs (`length_inputs`, for the length predictor). Pure functions; `server/app.py` calls
the first two once at start, the tracker the third (any thread)."""
from __future__ import annotations

import math
from typing import Optional

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.scheduling.harvest import WorkCost
from conserve_server import convert


def length_inputs(req: pb.GenerateRequest) -> tuple[int, Optional[int]]:
    """(max_tokens, the client's expected_output_tokens or None) of a stored request."""
    hint = req.expected_output_tokens if req.HasField("expected_output_tokens") else None
    return convert.sampling_from_proto(req.sampling).max_tokens, hint


def borrow_gain_of(engine_config) -> float:
    """At most how much faster borrowing serves an at-risk job than the harvest rate: under
    deadline_policy borrow, offline work in an iteration with online work may take up to
    (isolation_max - 1) x the online work's time instead of (isolation - 1) x, so the
    offline share of such iterations grows by at most that ratio (idle iterations are
    unchanged, so the real gain is lower: an upper bound, the side admission must err on).
    1 under isolate or without a conserve policy's isolation; unbounded (inf: admission
    never refuses) when isolation is 1, since then only borrowing puts offline work beside
    online work."""
    knobs = getattr(engine_config, "conserve", None)
    if knobs is None or knobs.deadline_policy != "borrow" or knobs.isolation is None:
        return 1.0
    if knobs.isolation <= 1.0:
        return math.inf
    return max(1.0, (knobs.isolation_max - 1.0) / (knobs.isolation - 1.0))


def engine_work_cost(engine, max_prefill_tokens: int, max_num_seqs: int) -> WorkCost:
    """Work units for `engine`: dedicated-engine seconds from its policy's latency model
    when it has one, else tokens (e.g. the mock engine)."""
    model = getattr(getattr(engine, "policy", None), "model", None)
    if model is None or not hasattr(model, "predict"):
        return WorkCost()
    return WorkCost.from_latency_model(model, max_prefill_tokens, max_num_seqs)
