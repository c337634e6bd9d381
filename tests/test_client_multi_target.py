"""`Client` over several replicas: gRPC round_robin spreads calls over both, a stopped
replica is skipped (health-checked), targets parse as documented, bad ones name the field."""
from __future__ import annotations

import pytest

from conserve_jax.client import Client
from conserve_jax.entrypoints.targets import channel_target
from tests.conftest_server import start_server, wait_until


def _text(stream):
    return "".join(c.text for c in stream)


def test_round_robin_over_two_replicas_and_skip_a_dead_one(tmp_path):
    a = start_server(tmp_path / "a")
    b = start_server(tmp_path / "b")
    try:
        with Client([a.target, b.target]) as c:
            for i in range(12):
                assert _text(c.generate(f"p{i:02d}", max_tokens=3)) == f"p{i:02d}"
            served = [s.engine.stats().online_tokens_total for s in (a, b)]
            assert all(n > 0 for n in served), f"both replicas serve: {served}"
            b.stop()
            # the dead replica is skipped once the channel sees it go (health / connection)
            assert wait_until(lambda: _text(c.generate("x", max_tokens=1)) == "x", 10)
            before = a.engine.stats().online_tokens_total
            for i in range(6):
                assert _text(c.generate(f"q{i}", max_tokens=2, timeout=10)) == f"q{i}"
            assert a.engine.stats().online_tokens_total >= before + 12
    finally:
        a.stop()
        b.stop()


def test_comma_string_target_works_like_a_list(tmp_path):
    a = start_server(tmp_path / "a")
    b = start_server(tmp_path / "b")
    try:
        from conserve_jax.loadtest.cli import _default_factory  # loadtest --target a,b
        c = _default_factory(f"{a.target},{b.target}", None, None)
        try:
            for i in range(8):
                assert _text(c.generate(f"z{i}", max_tokens=2)) == f"z{i}"
        finally:
            c.close()
        assert all(s.engine.stats().online_tokens_total > 0 for s in (a, b))
    finally:
        a.stop()
        b.stop()


def test_target_parsing():
    assert channel_target("127.0.0.1:5") == ("127.0.0.1:5", [])
    t, opts = channel_target(["127.0.0.1:1", "localhost:2"])
    assert t == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert '"round_robin"' in dict(opts)["grpc.service_config"]
    assert '"conserve.v1.CoServe"' in dict(opts)["grpc.service_config"]
    assert channel_target("[::1]:1,[::1]:2")[0] == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///localhost:7")[0] == "dns:///localhost:7"
    with pytest.raises(ValueError, match="HOST:PORT"):
        channel_target("127.0.0.1:1,nohost")
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        channel_target("127.0.0.1:1,[::1]:2")
    with pytest.raises(ValueError, match="at least one"):
        channel_target([])
