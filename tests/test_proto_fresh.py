"""The committed generated code matches a fresh `scripts/gen_proto.py` run of the proto."""
from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_fresh(tmp_path):
    gen = _gen_module()
    committed = ROOT / "conserve_jax" / "proto_gen" / "conserve" / "v1"
    for fresh in gen.generate(tmp_path):
        old = committed / fresh.name
        assert old.exists(), f"{old} is missing: run python scripts/gen_proto.py"
        assert old.read_bytes() == fresh.read_bytes(), \
            f"{old} is stale: run python scripts/gen_proto.py"


def test_generated_code_imports():
    from conserve_jax.proto_gen.conserve.v1 import conserve_pb2, conserve_pb2_grpc

    assert conserve_pb2.DESCRIPTOR.package == "conserve.v1"
    assert conserve_pb2.DESCRIPTOR.name == "conserve/v1/conserve.proto"
    assert hasattr(conserve_pb2_grpc, "CoServeStub")
