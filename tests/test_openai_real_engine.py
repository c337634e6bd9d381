"""The HTTP front over the real JAX engine (tiny random model): completions and chat equal
the engine's own greedy output, streaming or not, online or flex; a chat batch runs to
completion; /metrics reports it. Plus the CLI wiring (--http-port, --metrics-port, TLS)."""
import io
import json
import signal
import ssl
import subprocess
import sys
import urllib.request

import openai
import pytest

from conserve_jax.config import CacheConfig, EngineConfig
from conserve_jax.engine.engine import Engine
from conserve_jax.engine_api import GenerationRequest
from conserve_jax.sampling_params import SamplingParams
from tests.conftest_server import REPO, start_server, wait_until
from tests.metrics_helpers import metric
from tests.test_server_auth_tls import _self_signed_cert

MODEL = "random:tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    eng = Engine(EngineConfig(warmup=False, model=MODEL, policy="conserve", max_model_len=256, max_num_seqs=4,
                              max_prefill_tokens=64, cache=CacheConfig(num_blocks=128)))
    srv = start_server(tmp_path_factory.mktemp("data"), engine=eng, http_port=0, served_model_name=MODEL)
    yield srv
    srv.stop()


def _greedy(engine, ids, n, rid):
    out = engine.submit(GenerationRequest(rid, ids, SamplingParams(max_tokens=n, temperature=0.0,
                                                                   ignore_eos=True)))
    return "".join(d.text for d in out)


def test_completions_and_chat_match_engine(server):
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.app.http_port}/v1", api_key="-",
                      max_retries=0, timeout=120)
    ids = [5, 17, 99, 123, 7, 300]
    ref = _greedy(server.engine, ids, 8, "ref-c")
    extra = {"ignore_eos": True}
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body=extra)
    assert r.choices[0].text == ref and r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 6
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=ids, max_tokens=8, temperature=0, stream=True, extra_body=extra))
    assert streamed == ref
    flex = c.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                extra_body={**extra, "service_tier": "flex"})
    assert flex.choices[0].text == ref and flex.service_tier == "flex"

    msgs = [{"role": "user", "content": "hello"}]
    tok = server.engine.tokenizer
    chat_ids = tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    ref = _greedy(server.engine, chat_ids, 6, "ref-chat")
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                  extra_body=extra)
    assert r.choices[0].message.content == ref and r.usage.prompt_tokens == len(chat_ids)

    f = io.BytesIO("".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": msgs, "max_tokens": 6, "temperature": 0,
                 "ignore_eos": True}}) + "\n" for i in range(2)).encode())
    f.name = "in.jsonl"
    b = c.batches.create(input_file_id=c.files.create(file=f, purpose="batch").id,
                         endpoint="/v1/chat/completions", completion_window="1h")
    assert wait_until(lambda: c.batches.retrieve(b.id).status == "completed", timeout=120)
    out = [json.loads(ln) for ln in c.files.content(c.batches.retrieve(b.id).output_file_id).text.splitlines()]
    assert [o["response"]["body"]["choices"][0]["message"]["content"] for o in out] == [ref, ref]

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.app.http_port}/metrics").read().decode()
    assert metric(metrics, "conserve_time_to_first_token_seconds_count", '{class="online"}') >= 1
    assert metric(metrics, "conserve_kv_blocks", '{class="total"}') == \
        server.engine.stats().kv_blocks_total
    # queue time: each request of the faces once (3 online; flex + 2 batch items offline);
    # iteration tokens: every engine iteration's prompt + generated tokens, also those of
    # the reference requests submitted to the engine directly
    for cls, n in (("online", 3), ("offline", 3)):
        lab = f'{{class="{cls}"}}'
        assert metric(metrics, "conserve_request_queue_time_seconds_count", lab) == n
        assert metric(metrics, "conserve_iteration_tokens_total_sum", lab) == \
            metric(metrics, "conserve_prompt_tokens_total", lab) + \
            metric(metrics, "conserve_generation_tokens_total", lab) > 0



def test_n_choices_share_the_prefill(server):
    """n = 3 on the real engine: the samples after the first hit its cached prompt blocks
    (prefix-cache hits grow by 2 x the prompt's full blocks); greedy choices equal the
    engine's own output; seeded choices are sample i = the same request seeded seed + i."""
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.app.http_port}/v1", api_key="-",
                      max_retries=0, timeout=120)
    ids = [(7 * i + 3) % 500 + 1 for i in range(40)]  # 2 full blocks of 16 + 8
    ref = _greedy(server.engine, ids, 5, "ref-n")
    before = server.engine.stats().prefix_cache_hits_online
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, n=3,
                             extra_body={"ignore_eos": True})
    assert [ch.text for ch in r.choices] == [ref] * 3 and [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == 40 and r.usage.completion_tokens == 15
    assert server.engine.stats().prefix_cache_hits_online - before >= 2 * 32
    seeded = dict(model=MODEL, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    two = c.completions.create(prompt=ids, n=2, seed=11, **seeded)
    one = c.completions.create(prompt=ids, seed=12, **seeded)
    assert two.choices[1].text == one.choices[0].text

def _spawn(data_dir, *extra):
    """The CLI server as a subprocess; returns (process, {"http": port, "metrics": port})."""
    cmd = [sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--model", "mock", "--port", "0",
           "--http-port", "0", "--data-dir", str(data_dir), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ports = {}
    for line in proc.stdout:  # "http on H:P", "metrics on H:P", then "listening on H:P"
        name, _, addr = line.strip().partition(" on ")
        ports[name] = int(addr.rsplit(":", 1)[1])
        if name == "listening":
            break
    return proc, ports


def test_cli_http_and_metrics_ports_with_tls(tmp_path):
    cert, key = _self_signed_cert()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "tokens").write_text("secret-token\n")
    proc, ports = _spawn(tmp_path / "data", "--http-port", "free", "--metrics-port", "0",
                         "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
                         "--auth-token-file", str(tmp_path / "tokens"))
    try:
        assert set(ports) == {"http", "metrics", "listening"}, ports
        ctx = ssl.create_default_context(cadata=cert.decode())
        c = openai.OpenAI(base_url=f"https://localhost:{ports['http']}/v1", api_key="secret-token",
                          max_retries=0, timeout=30, http_client=openai.DefaultHttpxClient(verify=ctx))
        assert c.completions.create(model="mock", prompt="tls", max_tokens=3).choices[0].text == "tls"
        with pytest.raises(openai.AuthenticationError):
            c.with_options(api_key="wrong").models.list()
        for port in (ports["http"], ports["metrics"]):
            text = urllib.request.urlopen(f"https://localhost:{port}/metrics", context=ctx).read().decode()
            assert metric(text, "conserve_generation_tokens_total", '{class="online"}') == 3.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
