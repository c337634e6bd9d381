"""The OpenAI-compatible HTTP front, called with the official `openai` client on loopback:
models, chat and completions (streaming and not), sampling parameters, service_tier flex,
errors in OpenAI's shape (400 naming the parameter, 401, 404, 429, 500), tenants, and the
Prometheus metrics that GetServerStats shares. MockEngine echoes the prompt, so every
expected output is known in advance."""
import http.client
import json
import threading

import openai
import pytest

from conserve_jax.client import Client
from conserve_jax.engine_api import RequestClass
from conserve_jax.engine.mock_engine import MockEngine, MockTokenizer
from conserve_server.config import ServiceOptions
from tests.conftest_server import echo_text, start_server, wait_until
from tests.metrics_helpers import metric
from tests.openai_helpers import MODEL, TOKEN_A, TOKEN_B, client, raw, start_http_server

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def chat_prompt(messages) -> str:
    return MockTokenizer().decode(MockTokenizer().apply_chat_template(messages))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_http_server(tmp_path_factory.mktemp("data"), auth_tokens=[TOKEN_A, TOKEN_B])
    yield s
    s.stop()


def test_models(srv):
    c = client(srv)
    models = c.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-nonexistent")


def test_chat_non_streaming(srv):
    c = client(srv)
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=9,
                                  temperature=0.7, top_p=0.9, seed=3)
    prompt = chat_prompt(MSGS)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == echo_text(prompt, 9)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == 9
    assert r.usage.total_tokens == r.usage.prompt_tokens + 9
    assert r.service_tier == "default"
    # max_tokens (the older name) works too; a stop string ends generation with "stop"
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, stop=["there"])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 40


def test_chat_streaming_with_usage(srv):
    c = client(srv)
    chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == echo_text(chat_prompt(MSGS), 12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1
    # without include_usage no usage chunk
    chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4, stream=True))
    assert all(ch.choices and ch.usage is None for ch in chunks)


def test_sse_wire_format(srv):
    body = json.dumps({"model": MODEL, "prompt": "abc", "max_tokens": 5, "stream": True}).encode()
    status, data, headers = raw(srv, "POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(p["choices"][0]["text"] for p in payloads) == "abcab"
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_stream_and_not_agree(srv):
    c = client(srv)
    r = c.completions.create(model=MODEL, prompt="hello world", max_tokens=15, stop="wor")
    assert r.object == "text_completion"
    assert r.choices[0].text.startswith("hello ") and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 9  # the mock stops once "wor" has been generated
    chunks = list(c.completions.create(model=MODEL, prompt="hello world", max_tokens=15,
                                       stop="wor", stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.prompt_tokens == 11
    # token-id prompts and extra fields: top_k, ignore_eos, objectives
    ids = MockTokenizer().encode("xyz")
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=4,
                             extra_body={"top_k": 5, "ignore_eos": True, "ttft_s": 2.0, "tpot_s": 0.5})
    assert r.choices[0].text == "xyzx" and r.usage.prompt_tokens == 3


def test_logprobs(srv):
    c = client(srv)
    r = c.completions.create(model=MODEL, prompt="abc", max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["a", "b", "c", "a"] and len(lp.token_logprobs) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset == [0, 1, 2, 3]
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3)
    assert r.choices[0].logprobs is None


def test_flex_runs_offline_and_echoes_tier(srv):
    c = client(srv)
    before = dict(srv.engine.submitted)
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, service_tier="flex")
    assert r.service_tier == "flex"
    assert r.choices[0].message.content == echo_text(chat_prompt(MSGS), 5)
    assert srv.engine.submitted[RequestClass.OFFLINE] == before[RequestClass.OFFLINE] + 1
    assert srv.engine.submitted[RequestClass.ONLINE] == before[RequestClass.ONLINE]
    chunks = list(c.completions.create(model=MODEL, prompt="ab", max_tokens=3, stream=True,
                                       extra_body={"service_tier": "flex"}))
    assert {ch.service_tier for ch in chunks} == {"flex"}
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, service_tier="auto")
    assert r.service_tier == "default"
    assert srv.engine.submitted[RequestClass.OFFLINE] == before[RequestClass.OFFLINE] + 2


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"temperature": 3.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10 ** 6}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"service_tier": "priority"}, "service_tier"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"ttft_s": -1}}, "ttft_s"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
])
def test_bad_parameters_are_400_naming_them(srv, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(srv).chat.completions.create(model=MODEL, messages=MSGS, **kwargs)
    assert e.value.status_code == 400 and e.value.param == param
    assert param in e.value.body["message"]
    assert e.value.type == "invalid_request_error"


def test_bad_inputs(srv):
    c = client(srv)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[])
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": 5}])
    assert e.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=[1, 2, 99999])
    assert e.value.param == "prompt" and "vocabulary" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=["a", "b"])
    assert e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x" * 5000)
    assert e.value.param == "prompt" and "context" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="other-model", messages=MSGS)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    status, body, _ = raw(srv, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body, _ = raw(srv, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)


def test_auth_and_tenants(srv):
    with pytest.raises(openai.AuthenticationError) as e:
        client(srv, token="wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    status, body, headers = raw(srv, "POST", "/v1/completions", b"{}", token=None)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert headers.get("www-authenticate") == "Bearer"
    # /metrics needs no token (aggregates only)
    assert raw(srv, "GET", "/metrics", token=None)[0] == 200
    r = client(srv, token=TOKEN_B).completions.create(model=MODEL, prompt="ok", max_tokens=2)
    assert r.choices[0].text == "ok"


def test_server_fault_is_500(srv, monkeypatch):
    def boom(request):
        raise KeyError("simulated engine fault")
    monkeypatch.setattr(srv.engine, "submit", boom)
    with pytest.raises(openai.InternalServerError) as e:
        client(srv).completions.create(model=MODEL, prompt="abc", max_tokens=2)
    assert e.value.status_code == 500 and e.value.type == "server_error"


_metric = metric  # tests/metrics_helpers.py: labels matched whatever else (model_name)


def test_metrics_and_server_stats_share_counters(srv):
    c = client(srv)
    c.completions.create(model=MODEL, prompt="metrics", max_tokens=6,
                         extra_body={"ttft_s": 30.0, "tpot_s": 1e-9})  # met; cannot be met
    c.completions.create(model=MODEL, prompt="offline", max_tokens=4, extra_body={"service_tier": "flex"})
    with Client(srv.target, token=TOKEN_A) as g:
        list(g.generate("grpc side", max_tokens=3))
        assert wait_until(lambda: g.stats()["online_in_flight"] == 0)
        stats = g.stats()
    text = raw(srv, "GET", "/metrics", token=None)[1].decode()
    online = _metric(text, "conserve_generation_tokens_total", '{class="online"}')
    assert online == stats["online_tokens_total"] and online >= 9
    assert _metric(text, "conserve_generation_tokens_total", '{class="offline"}') == stats["offline_tokens_total"]
    assert _metric(text, "conserve_online_queue_limit") == stats["online_queue_limit"]
    assert _metric(text, "conserve_kv_blocks", '{class="total"}') == stats["kv_blocks_total"]
    assert _metric(text, "conserve_time_to_first_token_seconds_count", '{class="online"}') >= 2
    assert _metric(text, "conserve_time_to_first_token_seconds_count", '{class="offline"}') >= 1
    assert _metric(text, "conserve_requests_finished_total", '{class="online",finish_reason="length"}') >= 2
    assert _metric(text, "conserve_slo_requests_total", '{class="online",met="true",objective="ttft"}') >= 1
    assert _metric(text, "conserve_slo_requests_total", '{class="online",met="false",objective="tpot"}') >= 1
    assert _metric(text, "conserve_inter_token_latency_seconds_count", '{class="online"}') >= 5 + 2
    for name in ("conserve_time_per_output_token_seconds_bucket", "conserve_e2e_request_latency_seconds_sum",
                 "conserve_preemptions_total", "conserve_evictions_total", "conserve_restored_tokens_total",
                 "conserve_recomputed_tokens_total", "conserve_requests_waiting", "conserve_host_pool_slots",
                 "conserve_batch_items", "conserve_prompt_tokens_total"):
        assert name in text


def test_online_queue_full_is_429_across_faces(tmp_path):
    eng = MockEngine(token_delay_s=0.02)
    s = start_http_server(tmp_path, engine=eng, options=ServiceOptions(max_online_queue=1))
    try:
        c = client(s)
        stream = c.completions.create(model=MODEL, prompt="slow", max_tokens=500, stream=True)
        next(iter(stream))  # admitted and running: the one online slot is taken
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
        with Client(s.target) as g:  # the gRPC face shares the limit
            assert g.stats()["online_in_flight"] == 1
        # flex requests are offline: not limited by the online queue
        r = c.completions.create(model=MODEL, prompt="f", max_tokens=2, extra_body={"service_tier": "flex"})
        assert r.service_tier == "flex"
        stream.close()  # client disconnect: the engine request is cancelled, the slot freed
        assert wait_until(lambda: eng.stats().online_running == 0 and s.app.admission.online_in_flight == 0)
        assert c.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text == "xx"
        # a non-streaming request whose client goes away is cancelled too
        conn = http.client.HTTPConnection("127.0.0.1", s.app.http_port, timeout=10)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": "gone", "max_tokens": 1000}), {"Content-Type": "application/json"})
        assert wait_until(lambda: eng.stats().online_running == 1)
        conn.close()
        assert wait_until(lambda: eng.stats().online_running == 0 and s.app.admission.online_in_flight == 0)
    finally:
        s.stop()


def test_metrics_port_alone(tmp_path):
    s = start_server(tmp_path, metrics_port=0)
    try:
        with Client(s.target) as g:
            list(g.generate("abc", max_tokens=3))
        status, body, _ = raw(s, "GET", "/metrics", token=None, port=s.app.metrics_port)
        assert status == 200
        assert _metric(body.decode(), "conserve_generation_tokens_total", '{class="online"}') == 3
        assert s.app.http_port is None
    finally:
        s.stop()


def test_concurrent_streams(srv):
    c = client(srv)
    results = {}

    def one(i):
        p = f"p{i}-"
        results[i] = "".join(ch.choices[0].text for ch in c.completions.create(
            model=MODEL, prompt=p, max_tokens=8, stream=True))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: echo_text(f"p{i}-", 8) for i in range(8)}


def test_shutting_down_is_503(srv):
    srv.app.http.admitting = False
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client(srv).completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and "shutting down" in e.value.message
        assert raw(srv, "GET", "/health", token=None)[0] == 503
    finally:
        srv.app.http.admitting = True
    assert raw(srv, "GET", "/health", token=None)[0] == 200


def test_body_size_limit_is_413(tmp_path):
    s = start_http_server(tmp_path, options=ServiceOptions(max_message_mb=4096 / (1 << 20)))
    try:
        big = json.dumps({"model": MODEL, "prompt": "x" * 8000}).encode()
        status, body, _ = raw(s, "POST", "/v1/completions", big)
        assert status == 413 and "exceeds 4096" in json.loads(body)["error"]["message"]
        ok = json.dumps({"model": MODEL, "prompt": "xy", "max_tokens": 2}).encode()
        assert raw(s, "POST", "/v1/completions", ok)[0] == 200
    finally:
        s.stop()


def test_stop_ends_open_streams(tmp_path):
    eng = MockEngine(token_delay_s=0.02)
    s = start_http_server(tmp_path, engine=eng)
    stream = client(s).completions.create(model=MODEL, prompt="long", max_tokens=2000, stream=True)
    it = iter(stream)
    next(it)
    s.stop()  # drain 0.5 s, then open HTTP requests are cancelled with the engine's
    reasons = []
    try:
        reasons = [ch.choices[0].finish_reason for ch in it if ch.choices]
    except Exception:  # the connection closed or the server sent its error event
        pass
    assert "length" not in reasons
    assert eng.stats().online_running == 0 and s.app.admission.online_in_flight == 0


def test_tenant_share_of_the_online_queue(tmp_path):
    eng = MockEngine(token_delay_s=0.02)
    s = start_http_server(tmp_path, engine=eng, auth_tokens=[TOKEN_A, TOKEN_B],
                          options=ServiceOptions(max_online_queue=2))  # 1 each with 2 tenants
    try:
        stream = client(s, TOKEN_A).completions.create(model=MODEL, prompt="a", max_tokens=500,
                                                       stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:
            client(s, TOKEN_A).completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert "tenant" in e.value.message
        r = client(s, TOKEN_B).completions.create(model=MODEL, prompt="b", max_tokens=2)
        assert r.choices[0].text == "bb"
        stream.close()
    finally:
        s.stop()


FUZZ_VALUES = [None, "", "x", -1, 0, 1.5, 10 ** 12, float("nan"), True, [], [1, "a"], {}, {"a": 1}]


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "seed": 1,
                              "stop": ["z"], "logprobs": True, "top_logprobs": 1, "n": 1,
                              "stream": False, "service_tier": "auto", "top_k": 2,
                              "ignore_eos": False, "ttft_s": 1.0, "tpot_s": 1.0,
                              "max_completion_tokens": 3, "stop_token_ids": [5]}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3, "logprobs": 1,
                         "echo": False, "best_of": 1, "presence_penalty": 0}),
    ("/v1/batches", {"input_file_id": "file-x", "endpoint": "/v1/completions",
                     "completion_window": "24h", "metadata": {"a": "b"}}),
])
def test_fuzzed_fields_never_500(srv, path, body):
    """Every field replaced by values of the wrong type or range: an OpenAI-shaped 4xx (or
    success), never a server fault, and a 400 names a parameter or a line."""
    for name in body:
        for value in FUZZ_VALUES:
            bad = {**body, name: value}
            data = json.dumps(bad, allow_nan=True).encode()
            status, raw_body, _ = raw(srv, "POST", path, data)
            assert status < 500, (name, value, raw_body)
            if status >= 400:
                err = json.loads(raw_body)["error"]
                assert err["message"] and err["type"]
    status, _, _ = raw(srv, "POST", path, b"[1, 2]")
    assert status == 400
