"""Bearer-token auth, batch isolation between tenants, and TLS."""
from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conserve_jax.client import Client
from conserve_server.auth import Authenticator, read_tokens
from tests.conftest_server import start_server

ALICE, BOB = "alice-secret-token", "bob-secret-token"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("auth"), auth_tokens=[ALICE, BOB])
    yield s
    s.stop()


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_unauthenticated_without_valid_token(srv):
    for token in (None, "wrong-token"):
        with Client(srv.target, token=token) as c:
            calls = [lambda: list(c.generate("a", max_tokens=1)),
                     lambda: c.submit_batch([{"prompt": "a"}]), lambda: c.get_batch("batch_x"),
                     lambda: c.list_batches(), lambda: c.cancel_batch("batch_x"),
                     lambda: list(c.batch_results("batch_x")), lambda: c.stats()]
            for call in calls:
                assert _code(call) == grpc.StatusCode.UNAUTHENTICATED
    # malformed header
    with grpc.insecure_channel(srv.target) as ch:
        from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb, conserve_pb2_grpc as pb_grpc
        stub = pb_grpc.CoServeStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetServerStats(pb.GetServerStatsRequest(), metadata=[("authorization", ALICE)])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(srv):
    with grpc.insecure_channel(srv.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_batch_isolation_between_tenants(srv):
    with Client(srv.target, token=ALICE) as alice, Client(srv.target, token=BOB) as bob:
        assert list(alice.generate("hi", max_tokens=2))[-1].finished
        a_id = alice.submit_batch([{"prompt": "alice", "max_tokens": 3}])
        b_id = bob.submit_batch([{"prompt": "bob", "max_tokens": 3}])
        assert [r.text for r in alice.batch_results(a_id)] == ["ali"]
        assert [b.batch_id for b in alice.list_batches()] == [a_id]
        assert [b.batch_id for b in bob.list_batches()] == [b_id]
        # another tenant's batch looks exactly like one that does not exist
        for call in (lambda: bob.get_batch(a_id), lambda: bob.cancel_batch(a_id),
                     lambda: list(bob.batch_results(a_id)), lambda: bob.delete_batch(a_id)):
            assert _code(call) == grpc.StatusCode.NOT_FOUND
        assert alice.get_batch(a_id).state == "completed"  # bob's cancel did nothing
        # the same idempotency key in two tenants makes two batches
        assert alice.submit_batch([{"prompt": "x"}], idempotency_key="k") != \
            bob.submit_batch([{"prompt": "x"}], idempotency_key="k")


def test_token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\n\n" + ALICE + "\n  " + BOB + "  \n")
    assert read_tokens(str(path)) == [ALICE, BOB]
    auth = Authenticator.from_file(str(path))
    assert auth.tenant([("authorization", f"Bearer {BOB}")]) is not None
    assert auth.tenant([("authorization", f"Bearer {BOB}")]) != auth.tenant([("authorization", f"bearer {ALICE}")])
    assert auth.tenant([("authorization", "Bearer nope")]) is None
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ValueError):
        read_tokens(str(tmp_path / "empty"))


def _self_signed_cert() -> tuple[bytes, bytes]:
    """A self-signed CA-capable certificate for localhost / 127.0.0.1 (with SANs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls(tmp_path):
    pytest.importorskip("cryptography")
    cert, key = _self_signed_cert()
    (tmp_path / "ca.pem").write_bytes(cert)
    s = start_server(tmp_path / "data", tls_cert=cert, tls_key=key, auth_tokens=[ALICE])
    try:
        for target in (f"localhost:{s.port}", f"127.0.0.1:{s.port}"):
            with Client(target, token=ALICE, tls_ca=str(tmp_path / "ca.pem")) as c:
                out = list(c.generate("secure", max_tokens=3, timeout=10))
                assert "".join(x.text for x in out) == "sec"
                bid = c.submit_batch([{"prompt": "tls", "max_tokens": 2}])
                assert [r.text for r in c.batch_results(bid, timeout=10)] == ["tl"]
        with Client(f"localhost:{s.port}", token=ALICE, tls_ca=cert) as c:  # PEM bytes work too
            assert c.stats(timeout=10)["kv_blocks_total"] > 0
        with Client(f"127.0.0.1:{s.port}", token=ALICE) as plain:  # plaintext to a TLS port
            assert _code(lambda: plain.stats(timeout=3)) == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()
