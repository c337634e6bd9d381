"""Regenerate the committed Python code for proto/conserve/v1/conserve.proto.

    python scripts/gen_proto.py            # writes conserve_jax/proto_gen/conserve/v1/
    python scripts/gen_proto.py --out DIR  # writes DIR/conserve/v1/ (used by the staleness test)

Runs grpcio-tools' protoc in-process. The generated `*_pb2_grpc.py` imports
`conserve.v1.conserve_pb2`; that import is rewritten to the package path
`conserve_jax.proto_gen.conserve.v1` so the code imports from the installed package, with
no import-path set-up.
tests/test_proto_fresh.py fails when the committed files differ from a fresh run.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "conserve/v1/conserve.proto"
DEFAULT_OUT = ROOT / "conserve_jax" / "proto_gen"
PACKAGE = "conserve_jax.proto_gen"
GENERATED = ("conserve_pb2.py", "conserve_pb2.pyi", "conserve_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the generated modules (and empty __init__.py files) under out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir = pathlib.Path(out_dir)
    pkg_dir = out_dir / "conserve" / "v1"
    pkg_dir.mkdir(parents=True, exist_ok=True)
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    argv = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / PROTO_FILE)]
    if protoc.main(argv) != 0:
        raise RuntimeError("protoc failed on " + PROTO_FILE)
    grpc_file = pkg_dir / "conserve_pb2_grpc.py"
    text = grpc_file.read_text()
    text = text.replace("from conserve.v1 import conserve_pb2",
                        f"from {PACKAGE}.conserve.v1 import conserve_pb2")
    grpc_file.write_text(text)
    for d in (out_dir, out_dir / "conserve", pkg_dir):
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
    return [pkg_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
