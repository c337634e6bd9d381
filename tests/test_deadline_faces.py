"""Completion windows at the serving faces (issue 27, items 2 and 3) on an in-process server
over the mock engine: SubmitBatch / POST /v1/batches return an estimate once the server has
harvest history; a batch that cannot fit its window is refused (gRPC RESOURCE_EXHAUSTED,
HTTP 429 resource_unavailable, naming the field and the estimate); --accept-infeasible takes
it to expire instead. The infeasible batches here need over 20x their window and the
feasible ones a small fraction of it at the mock engine's rate (checked), so the verdicts do
not depend on its speed."""
from __future__ import annotations

import argparse
import json

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conserve_jax.client import Client
from conserve_jax.engine.mock_engine import MockEngine
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_jax.proto_gen.conserve.v1 import conserve_pb2_grpc as pb_grpc
from conserve_server.config import DeadlineOptions, add_server_args, server_config_from_args
from tests.conftest_server import start_server, wait_until
from tests.metrics_helpers import metric
from tests.openai_helpers import MODEL, raw, start_http_server

FAST = DeadlineOptions(harvest_window_s=5.0, harvest_min_history_s=0.3)
# (the window slides over backlogged time: the warm-up's rate is kept after it finishes)


def _deadline(seconds_from_now: float) -> Timestamp:
    import time
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return ts


def _req(i, max_tokens, hint=None):
    r = pb.GenerateRequest(prompt=f"item {i}", request_id=f"r{i}",
                           sampling=pb.SamplingParams(max_tokens=max_tokens))
    if hint is not None:
        r.expected_output_tokens = hint
    return r


def _warm(target):
    """Give the server harvest history: a backlog of offline work, until it reports a rate."""
    with Client(target) as c:
        c.submit_batch([{"prompt": f"warm {i}", "max_tokens": 400} for i in range(4)])
        assert wait_until(lambda: c.stats()["harvest_rate"] > 0, timeout=20)


def test_grpc_estimate_and_refusal(tmp_path):
    s = start_server(tmp_path, MockEngine(token_delay_s=0.005), batch_in_flight=2,
                     deadlines=FAST)
    try:
        stub = pb_grpc.CoServeStub(grpc.insecure_channel(s.target))
        # no history yet: accepted, no estimate
        resp = stub.SubmitBatch(pb.SubmitBatchRequest(requests=[_req(0, 4)], deadline=_deadline(600)))
        assert not resp.HasField("estimated_completion_at")
        _warm(s.target)
        rate = Client(s.target).stats()["harvest_rate"]
        resp = stub.SubmitBatch(pb.SubmitBatchRequest(requests=[_req(0, 4, hint=4)],
                                                      deadline=_deadline(600)))
        assert resp.HasField("estimated_completion_at")
        b = stub.GetBatch(pb.GetBatchRequest(batch_id=resp.batch_id))
        assert b.estimated_completion_at_submit == resp.estimated_completion_at
        assert b.deadline.seconds > resp.estimated_completion_at.seconds
        # 400 items x 1000 hinted tokens: far more than fits in 2 s at this rate
        big = [_req(i, 1000, hint=1000) for i in range(400)]
        assert 400 * 1000 / rate > 20 * 2, rate
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitBatch(pb.SubmitBatchRequest(requests=big, deadline=_deadline(2)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        msg = e.value.details()
        assert msg.startswith("deadline (completion window):") and "estimated completion" in msg
        stats = Client(s.target).stats()
        assert stats["deadline_refused"] == 1
        # no batch was stored for it
        assert all(b.total != 400 for b in stub.ListBatches(pb.ListBatchesRequest()).batches)
    finally:
        s.stop()


def test_accept_infeasible_expires_instead(tmp_path):
    eng = MockEngine(token_delay_s=0.005)
    s = start_server(tmp_path, eng, batch_in_flight=2,
                     deadlines=DeadlineOptions(accept_infeasible=True, harvest_window_s=5.0,
                                               harvest_min_history_s=0.3))
    try:
        _warm(s.target)
        stub = pb_grpc.CoServeStub(grpc.insecure_channel(s.target))
        big = [_req(i, 1000, hint=1000) for i in range(40)]
        resp = stub.SubmitBatch(pb.SubmitBatchRequest(requests=big, deadline=_deadline(1)))
        assert resp.HasField("estimated_completion_at")  # accepted, with an honest estimate
        with Client(s.target) as c:
            assert wait_until(lambda: c.get_batch(resp.batch_id).done == 40, timeout=20)
            info = c.get_batch(resp.batch_id)
            assert info.state == "expired" and info.error == "batch deadline exceeded"
            results = list(c.batch_results(resp.batch_id, timeout=10))
            assert sorted(r.index for r in results) == list(range(40))  # one record per item
            assert wait_until(lambda: c.stats()["deadline_missed"] == 1, timeout=5)
            text = s.app.metrics.exposition().decode()
            assert metric(text, "conserve_deadline_batches_total",
                          '{class="batch",outcome="missed"}') == 1.0
            assert metric(text, "conserve_deadline_slack_at_finish_seconds_bucket",
                          '{le="0.0"}') == 1.0  # missed
            metric(text, "conserve_harvest_rate")  # present
            assert metric(text, "conserve_deadline_borrowed_seconds_total") == 0.0
    finally:
        s.stop()


def test_http_429_resource_unavailable(tmp_path):
    s = start_http_server(tmp_path, engine=MockEngine(token_delay_s=0.005), batch_in_flight=2,
                          deadlines=FAST)
    try:
        _warm(s.target)

        def upload(lines):
            import io

            import openai
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.app.http_port}/v1", api_key="x",
                              max_retries=0)
            data = "".join(json.dumps(ln) + "\n" for ln in lines).encode()
            return c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id

        def line(i, max_tokens):
            return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"model": MODEL, "prompt": f"p{i}", "max_tokens": max_tokens}}
        # 400 items of up to 1000 tokens (the length predictor expects >= 128 each before it
        # has seen any, 400 after the warm-up): far more than fits in 2 s
        big = upload([line(i, 1000) for i in range(400)])
        status, body, _ = raw(s, "POST", "/v1/batches", json.dumps(
            {"input_file_id": big, "endpoint": "/v1/completions", "completion_window": "2s"}).encode(),
            token=None)
        err = json.loads(body)["error"]
        assert status == 429, body
        assert err["code"] == "resource_unavailable" and err["param"] == "completion_window"
        assert err["message"].startswith("completion_window:") and "estimated completion" in err["message"]
        small = upload([line(0, 4)])
        status, body, _ = raw(s, "POST", "/v1/batches", json.dumps(
            {"input_file_id": small, "endpoint": "/v1/completions", "completion_window": "24h"}).encode(),
            token=None)
        b = json.loads(body)
        assert status == 200, body
        assert b["estimated_completion_at_submit"] is not None
        assert b["created_at"] <= b["estimated_completion_at_submit"] <= b["expires_at"]
    finally:
        s.stop()


def test_accept_infeasible_flag():
    p = argparse.ArgumentParser()
    add_server_args(p)
    cfg = server_config_from_args(p.parse_args(["--accept-infeasible", "--at-risk-margin", "0.5"]))
    assert cfg.deadlines.accept_infeasible and cfg.deadlines.at_risk_margin == 0.5
    assert not server_config_from_args(p.parse_args([])).deadlines.accept_infeasible


def test_flex_request_gets_429_after_its_wait_bound(tmp_path):
    """One engine slot, taken by a long batch item (~10 s): a flex request cannot start
    within its 0.3 s bound and is refused; once the slot is free, one starts and is served."""
    eng = MockEngine(token_delay_s=0.01, max_num_seqs=1)
    s = start_http_server(tmp_path, engine=eng, batch_in_flight=1,
                          deadlines=DeadlineOptions(flex_max_wait_s=0.3))
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "service_tier": "flex"}
        with Client(s.target) as c:
            bid = c.submit_batch([{"prompt": "hog", "max_tokens": 1000}])
            assert wait_until(lambda: eng.stats().offline_running == 1, timeout=5)
            for stream in (False, True):
                status, raw_body, _ = raw(s, "POST", "/v1/completions",
                                          json.dumps({**body, "stream": stream}).encode(), token=None)
                err = json.loads(raw_body)["error"]
                assert status == 429, raw_body
                assert err["code"] == "resource_unavailable" and err["param"] == "service_tier"
                assert "flex_max_wait_s" in err["message"]
            assert wait_until(lambda: eng.stats().offline_waiting == 0, timeout=5)  # cancelled
            c.cancel_batch(bid)
            assert wait_until(lambda: eng.stats().offline_running == 0, timeout=5)
            status, raw_body, _ = raw(s, "POST", "/v1/completions", json.dumps(body).encode(),
                                      token=None)
            assert status == 200 and json.loads(raw_body)["choices"][0]["text"] == "hel"
            st = c.stats()
        snap = s.app.deadlines.snapshot()
        assert snap.missed.get("flex") == 2 and snap.met.get("flex") == 1
        assert st["deadline_missed"] >= 2
    finally:
        s.stop()
