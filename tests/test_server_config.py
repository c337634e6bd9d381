"""One configuration path for the server: `serve` flags generated from the settings
dataclasses (one default each), one `Admission` for both faces (online counter and tenant
share shared, flex limit of its own), and the default SLO filled in at the face."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import grpc
import openai
import pytest

from conserve_jax.client import Client, make_request
from conserve_jax.config import EngineConfig
from conserve_jax.engine.mock_engine import MockEngine
from conserve_jax.engine_api import SLO, RequestClass
from conserve_jax.engine_args import dataclass_fields, field_default, flag_name, is_flag
from conserve_server import convert
from conserve_server import main as server_main
from conserve_server.admission import Admission
from conserve_server.config import ServerConfig, ServiceOptions, resolve, server_config_from_args
from tests.conftest_server import REPO, start_server, wait_until
from tests.metrics_helpers import metric
from tests.openai_helpers import MODEL, client, start_http_server

# every flag `serve` had before its flags were generated, with its default then (except
# --http-port: HTTP is on by default since issue 29, as vLLM users expect)
OLD_FLAGS = {"--host": "127.0.0.1", "--port": 50051, "--data-dir": "conserve-data",
             "--auth-token-file": None, "--tls-cert": None, "--tls-key": None,
             "--max-online-queue": 256, "--max-batch-size": 10000, "--batch-in-flight": None,
             "--max-message-mb": 16, "--retention-days": 7.0, "--drain-timeout": 10.0,
             "--http-port": 8000, "--metrics-port": None, "--served-model-name": None,
             "--offline-kv-max-mb": 4096, "--mock-token-delay": 0.0,
             "--mock-fail-after-steps": None}
PLAIN = {"auth_tokens", "tls_cert", "tls_key", "max_logprobs", "default_slo"}


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    server_main.add_arguments(p)
    return p


# ---- flags from fields -------------------------------------------------------------------
def test_every_setting_is_a_flag_with_the_fields_default_and_help():
    actions = _serve_parser()._option_string_actions
    plain = set()
    for cls in (ServerConfig, server_main.ServeFiles, server_main.MockOptions):
        for path, f, _ in dataclass_fields(cls):
            if not is_flag(f):
                plain.add(path[-1])
                continue
            action = actions[flag_name(path[-1])]
            assert action.dest == path[-1]
            assert action.default == field_default(f), path
            assert f.metadata["help"] in action.help
    assert plain == PLAIN  # the token list, PEM bytes and values the engine's flags own


def test_old_flags_keep_their_names_and_defaults():
    actions = _serve_parser()._option_string_actions
    for flag, default in OLD_FLAGS.items():
        assert actions[flag].default == default, flag


def test_serve_help_lists_the_generated_flags():
    out = subprocess.run([sys.executable, "-m", "conserve_jax.entrypoints.cli", "serve", "--help"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for path, f, _ in dataclass_fields(ServerConfig):
        if is_flag(f):
            assert flag_name(path[-1]) in text
    assert "seconds to let running work finish on SIGTERM (default 10.0)" in text


def test_no_flags_give_the_dataclass_defaults():
    assert server_config_from_args(_serve_parser().parse_args([])) == ServerConfig()


def test_flags_round_trip_in_their_units():
    args = _serve_parser().parse_args([
        "--drain-timeout", "3", "--offline-kv-max-mb", "0", "--max-message-mb", "2",
        "--retention-days", "0.5", "--max-online-queue", "7", "--max-flex-in-flight", "3",
        "--batch-in-flight", "5", "--http-port", "none", "--port", "0",
        "--max-online-per-tenant", "2", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    cfg = server_config_from_args(args, tls_cert=b"CERT")
    assert cfg.drain_timeout == 3.0 and cfg.offline_kv_max_bytes == 0
    assert cfg.retention_s == 43200.0 and cfg.batch_in_flight == 5 and cfg.http_port is None
    assert cfg.port == 0 and cfg.tls_cert == b"CERT" and cfg.tls_key is None  # paths are not PEM
    o = cfg.options
    assert o.max_message_bytes == 2 << 20 and o.max_online_queue == 7
    assert o.max_flex_in_flight == 3 and o.max_online_per_tenant == 2
    assert args.tls_cert == "c.pem"  # the file flag, read by main


def test_settled_defaults_and_their_one_resolution():
    cfg = ServerConfig()
    assert cfg.drain_timeout == 10.0 and cfg.offline_kv_max_bytes == 4096 << 20
    assert cfg.batch_in_flight is None and cfg.options.default_slo is None
    eng = EngineConfig(model="mock", max_num_seqs=5, default_ttft_s=3.0, default_tpot_s=0.3)
    r = resolve(cfg, eng)
    assert r.batch_in_flight == 10 and r.served_model_name == "mock"
    assert r.options.default_slo == SLO(3.0, 0.3)
    given = dataclasses.replace(cfg, batch_in_flight=3, served_model_name="m",
                                options=ServiceOptions(default_slo=SLO(1.0, None)))
    r = resolve(given, eng)
    assert r.batch_in_flight == 3 and r.served_model_name == "m"
    assert r.options.default_slo == SLO(1.0, None)


def test_cli_batch_in_flight_defaults_to_twice_max_num_seqs(tmp_path, monkeypatch):
    seen = {}

    class App:  # stands in for ServerApp: records what main hands it, then stops at once
        def __init__(self, engine, config, store=None, engine_config=None):
            seen["config"] = resolve(config, engine_config)
            self.engine, self.store = engine, store
            raise RuntimeError("stop here")
    monkeypatch.setattr("conserve_server.app.ServerApp", App)
    args = _serve_parser().parse_args(["--model", "mock", "--max-num-seqs", "3",
                                       "--data-dir", str(tmp_path), "--default-ttft-s", "4"])
    with pytest.raises(RuntimeError, match="stop here"):
        server_main.run(args)
    cfg = seen["config"]
    assert cfg.batch_in_flight == 6 and cfg.served_model_name == "mock"
    assert cfg.options.default_slo == SLO(4.0, EngineConfig().default_tpot_s)


# ---- one admission -----------------------------------------------------------------------
def test_admission_counts_online_tenants_and_flex_apart():
    a = Admission(ServiceOptions(max_online_queue=4, max_flex_in_flight=1), tenants=2)
    assert a.online_per_tenant == 2
    assert a.admit(RequestClass.ONLINE, "t1") is None and a.admit(RequestClass.ONLINE, "t1") is None
    assert "tenant" in a.admit(RequestClass.ONLINE, "t1")
    assert a.admit(RequestClass.OFFLINE, "t1") is None  # flex: not an online slot
    assert "flex queue is full" in a.admit(RequestClass.OFFLINE, "t2")
    assert a.admit(RequestClass.ONLINE, "t2") is None and a.admit(RequestClass.ONLINE, None) is None
    assert "online queue is full" in a.admit(RequestClass.ONLINE, "t2")
    assert (a.online_in_flight, a.online_in_flight_of("t1"), a.flex_in_flight) == (4, 2, 1)
    a.release(RequestClass.ONLINE, "t1")
    a.release(RequestClass.OFFLINE, "t1")
    assert (a.online_in_flight, a.online_in_flight_of("t1"), a.flex_in_flight) == (3, 1, 0)
    assert Admission(ServiceOptions(max_online_queue=4), tenants=1).online_per_tenant == 4
    assert Admission(ServiceOptions(max_online_per_tenant=3), tenants=5).online_per_tenant == 3


def _grpc_code(fn):
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_faces_share_one_online_counter(tmp_path):
    eng = MockEngine(token_delay_s=0.02)
    s = start_http_server(tmp_path, engine=eng, options=ServiceOptions(max_online_queue=1))
    try:
        c = client(s)
        with Client(s.target) as g:
            held = g.generate("slow", max_tokens=500)  # gRPC holds the one online slot
            next(held)
            assert s.app.admission.online_in_flight == 1
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert "online queue is full" in e.value.message
            held.cancel()
            assert wait_until(lambda: s.app.admission.online_in_flight == 0)
            stream = c.completions.create(model=MODEL, prompt="slow", max_tokens=500, stream=True)
            next(iter(stream))  # now HTTP holds it
            code, msg = _grpc_code(lambda: list(g.generate("y", max_tokens=2)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "online queue is full" in msg
            assert g.stats()["online_in_flight"] == 1 and g.stats()["online_queue_limit"] == 1
            stream.close()
            assert wait_until(lambda: s.app.admission.online_in_flight == 0)
            assert list(g.generate("z", max_tokens=1))[-1].finished
    finally:
        s.stop()


def test_flex_has_its_own_limit(tmp_path):
    eng = MockEngine(token_delay_s=0.02)
    s = start_http_server(tmp_path, engine=eng,
                          options=ServiceOptions(max_online_queue=1, max_flex_in_flight=1))
    try:
        c = client(s)
        flex = c.completions.create(model=MODEL, prompt="slow", max_tokens=500, stream=True,
                                    extra_body={"service_tier": "flex"})
        next(iter(flex))
        assert s.app.admission.flex_in_flight == 1 and s.app.admission.online_in_flight == 0
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="f", max_tokens=2,
                                 extra_body={"service_tier": "flex"})
        assert "flex queue is full (1 requests)" in e.value.message
        # the online slot is untouched by flex work
        assert c.completions.create(model=MODEL, prompt="on", max_tokens=2).choices[0].text == "on"
        flex.close()
        assert wait_until(lambda: s.app.admission.flex_in_flight == 0)
        r = c.completions.create(model=MODEL, prompt="f", max_tokens=2,
                                 extra_body={"service_tier": "flex"})
        assert r.service_tier == "flex"
    finally:
        s.stop()


# ---- the default SLO ---------------------------------------------------------------------
def test_build_request_leaves_missing_objectives_unset():
    eng = MockEngine()
    try:
        req = convert.build_request(make_request("ab", ttft=1.5), eng, "r", RequestClass.ONLINE)
        assert req.slo == SLO(1.5, None)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("via", ["options", "engine_config"])
def test_default_slo_is_filled_in_at_both_faces(tmp_path, via):
    eng = MockEngine()
    submitted = []
    inner = eng.submit

    def record(request, **kw):
        submitted.append(request)
        return inner(request, **kw)
    eng.submit = record
    if via == "options":
        s = start_http_server(tmp_path, engine=eng,
                              options=ServiceOptions(default_slo=SLO(7.0, 0.7)))
    else:  # the engine's --default-ttft-s / --default-tpot-s
        s = start_http_server(tmp_path, engine=eng,
                              engine_config=EngineConfig(default_ttft_s=7.0, default_tpot_s=0.7))
    try:
        with Client(s.target) as g:
            list(g.generate("grpc", max_tokens=2))
            list(g.generate("grpc", max_tokens=2, ttft=1.0))
        c = client(s)
        c.completions.create(model=MODEL, prompt="http", max_tokens=2)
        c.completions.create(model=MODEL, prompt="http", max_tokens=2, extra_body={"tpot_s": 0.5})
        c.completions.create(model=MODEL, prompt="flex", max_tokens=2,
                             extra_body={"service_tier": "flex"})
        assert [r.slo for r in submitted] == [SLO(7.0, 0.7), SLO(1.0, 0.7), SLO(7.0, 0.7),
                                              SLO(7.0, 0.5), SLO(7.0, 0.7)]
        # metrics judge what the request carries: both online faces' requests were judged
        text = s.app.metrics.exposition().decode()
        assert metric(text, "conserve_slo_requests_total",
                      '{class="online",met="true",objective="ttft"}') == 4.0
    finally:
        s.stop()
