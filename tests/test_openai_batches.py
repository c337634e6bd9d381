"""The OpenAI Batch API over the durable batch store, with the official `openai` client:
file upload/get/content, batch create/get/list/cancel, output and error files in OpenAI's
result format, completion_window -> deadline (expiry), tenants, bad input files, and
batches surviving a server restart on the same data directory."""
import io
import json

import openai
import pytest

from conserve_jax.engine.mock_engine import MockEngine, MockTokenizer
from tests.conftest_server import echo_text, wait_until
from tests.openai_helpers import MODEL, TOKEN_A, TOKEN_B, client, start_http_server


def jsonl(lines) -> io.BytesIO:
    f = io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())
    f.name = "input.jsonl"
    return f


def chat_line(i, content, max_tokens=6, **body):
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}],
                     "max_tokens": max_tokens, **body}}


def completion_line(i, prompt, max_tokens=5, **body):
    return {"custom_id": f"c-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **body}}


def lines_of(c, file_id):
    return [json.loads(ln) for ln in c.files.content(file_id).text.splitlines()]


def wait_status(c, batch_id, statuses, timeout=20):
    box = {}

    def done():
        box["b"] = c.batches.retrieve(batch_id)
        return box["b"].status in statuses
    assert wait_until(done, timeout=timeout, interval=0.05), box.get("b")
    return box["b"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_http_server(tmp_path_factory.mktemp("data"), auth_tokens=[TOKEN_A, TOKEN_B])
    yield s
    s.stop()


def test_chat_batch_end_to_end(srv):
    c = client(srv)
    f = c.files.create(file=jsonl([chat_line(i, f"q{i}") for i in range(5)]), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0 and f.filename == "input.jsonl"
    assert c.files.retrieve(f.id).id == f.id
    assert c.files.content(f.id).text.count("\n") == 5
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                         completion_window="24h", metadata={"job": "nightly"})
    assert b.status == "in_progress" and b.endpoint == "/v1/chat/completions"
    assert b.input_file_id == f.id and b.metadata == {"job": "nightly"}
    assert b.expires_at - b.created_at in range(24 * 3600 - 2, 24 * 3600 + 2)
    b = wait_status(c, b.id, {"completed"})
    assert b.request_counts.total == 5 and b.request_counts.completed == 5
    assert b.request_counts.failed == 0 and b.error_file_id is None
    out = lines_of(c, b.output_file_id)
    tok = MockTokenizer()
    assert [ln["custom_id"] for ln in out] == [f"req-{i}" for i in range(5)]
    for i, ln in enumerate(out):
        assert ln["error"] is None and ln["response"]["status_code"] == 200
        body = ln["response"]["body"]
        prompt = tok.decode(tok.apply_chat_template([{"role": "user", "content": f"q{i}"}]))
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["choices"][0]["message"]["content"] == echo_text(prompt, 6)
        assert body["usage"]["completion_tokens"] == 6
    assert c.files.retrieve(b.output_file_id).purpose == "batch_output"
    assert b.id in [x.id for x in c.batches.list(limit=100).data]


def test_completions_batch_with_logprobs(srv):
    c = client(srv)
    f = c.files.create(file=jsonl([completion_line(0, "abc", logprobs=1),
                                   completion_line(1, [10, 11, 12], 3)]), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1h")
    b = wait_status(c, b.id, {"completed"})
    out = {ln["custom_id"]: ln["response"]["body"] for ln in lines_of(c, b.output_file_id)}
    assert out["c-0"]["choices"][0]["text"] == "abcab"
    assert out["c-0"]["choices"][0]["logprobs"]["tokens"] == list("abcab")
    assert out["c-1"]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                                   "prompt_tokens_details": {"cached_tokens": 0}}


def test_cancel_batch(tmp_path):
    eng = MockEngine(token_delay_s=0.01)
    s = start_http_server(tmp_path, engine=eng, batch_in_flight=2)
    try:
        c = client(s)
        f = c.files.create(file=jsonl([completion_line(i, "x", 400) for i in range(6)]), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        assert wait_until(lambda: eng.stats().offline_running > 0)
        b = c.batches.cancel(b.id)
        assert b.status in ("cancelling", "cancelled")
        b = wait_status(c, b.id, {"cancelled"})
        assert b.request_counts.failed == 6 and b.output_file_id is None
        errs = lines_of(c, b.error_file_id)
        assert sorted(ln["custom_id"] for ln in errs) == [f"c-{i}" for i in range(6)]
        assert all(ln["response"] is None and ln["error"]["code"] == "batch_cancelled" for ln in errs)
        assert wait_until(lambda: eng.stats().kv_blocks_offline == 0)
    finally:
        s.stop()


def test_completion_window_expiry(tmp_path):
    eng = MockEngine(token_delay_s=0.01)
    s = start_http_server(tmp_path, engine=eng, batch_in_flight=1)
    try:
        c = client(s)
        f = c.files.create(file=jsonl([completion_line(0, "quick", 2)] +
                                      [completion_line(i, "slow", 1000) for i in range(1, 4)]),
                           purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1s")
        assert b.expires_at - b.created_at <= 2
        b = wait_status(c, b.id, {"expired"})
        assert b.request_counts.completed == 1 and b.request_counts.failed == 3
        assert [ln["custom_id"] for ln in lines_of(c, b.output_file_id)] == ["c-0"]
        errs = lines_of(c, b.error_file_id)
        assert {ln["error"]["code"] for ln in errs} == {"batch_expired"} and len(errs) == 3
    finally:
        s.stop()


def test_batch_errors_and_tenants(srv):
    c, other = client(srv), client(srv, TOKEN_B)
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=jsonl([{"custom_id": "a", "method": "GET", "url": "/v1/completions",
                                    "body": {}}]), purpose="batch")
    assert e.value.param == "file" and "line 1" in e.value.message
    bad_json = io.BytesIO((json.dumps(chat_line(0, "a")) + "\nnot json\n").encode())
    bad_json.name = "x.jsonl"
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=bad_json, purpose="batch")
    assert "line 2" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=jsonl([chat_line(0, "a")]), purpose="fine-tune")
    assert e.value.param == "purpose"
    f = c.files.create(file=jsonl([chat_line(0, "a"), chat_line(1, "b", max_tokens=0)]), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:  # line 2's body is invalid
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert "line 2" in e.value.message and "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # lines are chat, endpoint is completions
        c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert e.value.param == "input_file_id"
    good = c.files.create(file=jsonl([chat_line(0, "a")]), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions",
                         completion_window="forever")
    assert e.value.param == "completion_window"
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=good.id, endpoint="/v1/embeddings", completion_window="24h")
    assert e.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                         completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_0000")
    # another tenant sees neither the file nor the batch
    b = c.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(good.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    assert b.id not in [x.id for x in other.batches.list().data]
    b = wait_status(c, b.id, {"completed"})
    with pytest.raises(openai.NotFoundError):
        other.files.content(b.output_file_id)


def test_list_pagination(srv):
    c = client(srv, TOKEN_B)
    f = c.files.create(file=jsonl([completion_line(0, "p", 1)]), purpose="batch")
    ids = [c.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                            completion_window="24h").id for _ in range(3)]
    page = c.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    rest = c.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in rest.data][:1] == [ids[0]]
    assert [b.id for b in c.batches.list(limit=2)][:3] == ids[::-1]  # the client pages with after=


def test_batches_survive_restart(tmp_path):
    eng = MockEngine(token_delay_s=0.01)
    s = start_http_server(tmp_path, engine=eng, batch_in_flight=1)
    c = client(s)
    f = c.files.create(file=jsonl([completion_line(i, "r", 30) for i in range(3)]), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                         metadata={"k": "v"})
    s.stop()  # mid-batch: unfinished items are released and run again after the restart
    s = start_http_server(tmp_path)
    try:
        c = client(s)
        assert c.files.retrieve(f.id).bytes == f.bytes
        b = wait_status(c, b.id, {"completed"})
        assert b.metadata == {"k": "v"} and b.request_counts.completed == 3
        assert [ln["response"]["body"]["choices"][0]["text"] for ln in lines_of(c, b.output_file_id)] \
            == [echo_text("r", 30)] * 3
    finally:
        s.stop()


def test_idempotency_key(srv):
    c = client(srv)
    f1 = c.files.create(file=jsonl([completion_line(0, "i", 2)]), purpose="batch")
    f2 = c.files.create(file=jsonl([completion_line(0, "j", 2)]), purpose="batch")
    kw = dict(endpoint="/v1/completions", completion_window="24h", extra_headers={"Idempotency-Key": "k-1"})
    a = c.batches.create(input_file_id=f1.id, **kw)
    assert c.batches.create(input_file_id=f1.id, **kw).id == a.id  # a retry: the same batch
    with pytest.raises(openai.ConflictError) as e:  # the same key for different work
        c.batches.create(input_file_id=f2.id, **kw)
    assert e.value.status_code == 409 and "k-1" in e.value.message


def test_tenant_item_quota_is_429(tmp_path):
    from conserve_server.config import ServiceOptions

    s = start_http_server(tmp_path, options=ServiceOptions(max_tenant_items=3))
    try:
        c = client(s)
        f = c.files.create(file=jsonl([completion_line(i, "q", 2) for i in range(5)]), purpose="batch")
        with pytest.raises(openai.RateLimitError) as e:
            c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        assert e.value.code == "batch_quota_exceeded"
    finally:
        s.stop()
