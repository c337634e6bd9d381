"""`n` > 1 on /v1/chat/completions and /v1/completions: choices indexed 0..n-1, usage with
the prompt once and every choice's tokens, streaming and not, 400 naming `n`; and how
`Fanout` submits the samples (sample 0 first, the others after its first delta, so they
hit its cached prompt; seeds seed + i). MockEngine echoes the prompt, so every choice's
text is known in advance."""
import asyncio
import io
import json

import openai
import pytest

from conserve_jax.engine_api import GenerationRequest, RequestOutput, RequestStream
from conserve_jax.sampling_params import SamplingParams
from conserve_server.config import ServiceOptions
from conserve_server.openai_api.samples import Fanout, sample_requests
from tests.conftest_server import echo_text
from tests.openai_helpers import MODEL, client, start_http_server
from tests.test_openai_http import MSGS, chat_prompt


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_http_server(tmp_path_factory.mktemp("data"))
    yield s
    s.stop()


def test_chat_n_non_streaming(srv):
    before = srv.engine.stats().prefix_cache_hits_online
    r = client(srv).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=7, n=3,
                                            temperature=0.8, seed=5)
    prompt = chat_prompt(MSGS)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == echo_text(prompt, 7) for c in r.choices)
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.prompt_tokens == len(prompt.encode())  # once, not per choice
    assert r.usage.completion_tokens == 21
    assert r.usage.total_tokens == r.usage.prompt_tokens + 21
    # samples 1 and 2 went in after sample 0's prefill: they found its prompt cached
    full = (len(prompt.encode()) - 1) // srv.engine.block_size * srv.engine.block_size
    assert srv.engine.stats().prefix_cache_hits_online - before >= 2 * full > 0


def test_completions_n_streaming_with_usage(srv):
    chunks = list(client(srv).completions.create(
        model=MODEL, prompt="abcdef", max_tokens=5, n=2, stream=True,
        stream_options={"include_usage": True}))
    texts, finish = {0: "", 1: ""}, {}
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1 and ch.usage is None
        c = ch.choices[0]
        texts[c.index] += c.text
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert texts == {0: "abcde", 1: "abcde"} and finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 6
    assert chunks[-1].usage.completion_tokens == 10
    assert len({ch.id for ch in chunks}) == 1


def test_chat_n_streaming_roles_per_choice(srv):
    chunks = list(client(srv).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4,
                                                      n=2, stream=True))
    by_index: dict = {0: [], 1: []}
    for ch in chunks:
        by_index[ch.choices[0].index].append(ch.choices[0])
    for parts in by_index.values():
        assert parts[0].delta.role == "assistant"
        assert "".join(p.delta.content or "" for p in parts) == echo_text(chat_prompt(MSGS), 4)
        assert parts[-1].finish_reason == "length"


def test_n_non_streaming_completions_and_greedy(srv):
    r = client(srv).completions.create(model=MODEL, prompt="xyz", max_tokens=3, n=4,
                                       temperature=0)  # greedy: allowed, choices identical
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert {c.text for c in r.choices} == {"xyz"} and r.usage.completion_tokens == 12


@pytest.mark.parametrize("n", [0, -1, 17, "2", 1.5])
def test_bad_n_is_400_naming_it(srv, n):
    with pytest.raises(openai.BadRequestError) as e:
        client(srv).completions.create(model=MODEL, prompt="ab", extra_body={"n": n})
    assert e.value.param == "n" and "n must be an integer in [1, 16]" in e.value.message


def test_n_counts_against_the_online_queue(tmp_path):
    s = start_http_server(tmp_path, options=ServiceOptions(max_online_queue=2))
    try:
        with pytest.raises(openai.RateLimitError):
            client(s).completions.create(model=MODEL, prompt="ab", max_tokens=2, n=3)
        assert s.app.admission.online_in_flight == 0  # nothing kept
        r = client(s).completions.create(model=MODEL, prompt="ab", max_tokens=2, n=2)
        assert len(r.choices) == 2 and s.app.admission.online_in_flight == 0
    finally:
        s.stop()


# ---- Fanout on a hand-driven engine ------------------------------------------------------

class HandEngine:
    """Records submits; the test puts the deltas."""

    enable_prefix_caching = True

    def __init__(self) -> None:
        self.streams: dict[str, RequestStream] = {}
        self.cancelled: list[str] = []

    def submit(self, req: GenerationRequest) -> RequestStream:
        self.streams[req.request_id] = RequestStream(req.request_id)
        return self.streams[req.request_id]

    def cancel(self, rid: str) -> None:
        self.cancelled.append(rid)


def _collect(fan: Fanout, feed) -> list:
    """Run fan.deltas, calling feed(engine) whenever the generator is waiting."""
    async def go():
        got = []
        gen = fan.deltas(poll_s=0.01)
        while True:
            task = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0.02)
            if not task.done():
                feed()
            try:
                got.append(await task)
            except StopAsyncIteration:
                return got
    return asyncio.run(go())


def test_sample_requests_seeds_and_ids():
    gen = GenerationRequest("r", [1, 2], SamplingParams(seed=10))
    reqs = sample_requests(gen, 3)
    assert [r.request_id for r in reqs] == ["r-0", "r-1", "r-2"]
    assert [r.sampling.seed for r in reqs] == [10, 11, 12]
    assert [r.request_id for r in sample_requests(GenerationRequest("r", [1]), 2)] == ["r-0", "r-1"]
    assert sample_requests(gen, 1) == [gen]


def test_fanout_submits_the_rest_after_the_first_delta():
    eng = HandEngine()
    fan = Fanout(eng, sample_requests(GenerationRequest("r", [1, 2, 3]), 3))
    fan.submit()
    assert list(eng.streams) == ["r-0"]  # the others wait for its prefill
    steps = iter([
        lambda: eng.streams["r-0"].put(RequestOutput("r-0", [7], "a")),
        lambda: [eng.streams[f"r-{i}"].put(RequestOutput(f"r-{i}", [7], "a", finished=True,
                                                         finish_reason="length"))
                 for i in range(3)],
    ])
    got = _collect(fan, lambda: next(steps)())
    assert [i for i, _ in got] == [0, 0, 1, 2] and all(fan.finished)
    assert list(eng.streams) == ["r-0", "r-1", "r-2"]
    fan.cancel()
    assert eng.cancelled == []  # all finished: nothing to cancel


def test_fanout_without_prefix_caching_submits_all_at_once():
    eng = HandEngine()
    eng.enable_prefix_caching = False
    fan = Fanout(eng, sample_requests(GenerationRequest("r", [1]), 2))
    fan.submit()
    assert list(eng.streams) == ["r-0", "r-1"]
    fan.cancel()
    assert eng.cancelled == ["r-0", "r-1"]


def test_fanout_first_sample_failing_drops_the_rest():
    eng = HandEngine()
    fan = Fanout(eng, sample_requests(GenerationRequest("r", [1]), 3))
    fan.submit()
    got = _collect(fan, lambda: eng.streams["r-0"].put(RequestOutput(
        "r-0", finished=True, finish_reason="error", error="boom")))
    assert [(i, o.finish_reason) for i, o in got] == [(0, "error")]
    assert list(eng.streams) == ["r-0"]


def test_fanout_late_submit_failure_ends_that_sample():
    eng = HandEngine()
    real_submit = eng.submit

    def submit(req):
        if req.request_id == "r-1":
            raise RuntimeError("engine stopped")
        return real_submit(req)
    eng.submit = submit
    fan = Fanout(eng, sample_requests(GenerationRequest("r", [1]), 2))
    fan.submit()
    eng.streams["r-0"].put(RequestOutput("r-0", [3], "x", finished=True, finish_reason="stop"))
    got = _collect(fan, lambda: None)
    assert [(i, o.finish_reason) for i, o in got] == [(0, "stop"), (1, "error")]
    assert "engine stopped" in got[1][1].error



def test_batch_api_line_with_n_is_refused(srv):
    c = client(srv)
    f = io.BytesIO((json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                "body": {"model": MODEL, "prompt": "x", "n": 2}}) + "\n").encode())
    f.name = "in.jsonl"
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=c.files.create(file=f, purpose="batch").id,
                         endpoint="/v1/completions", completion_window="1h")
    assert "n must be 1 in the Batch API" in e.value.message
