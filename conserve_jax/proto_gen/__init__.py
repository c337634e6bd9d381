"""Generated gRPC/protobuf code for proto/conserve/v1/conserve.proto. Do not edit by hand:
run `python scripts/gen_proto.py` (tests/test_proto_fresh.py fails when it is stale)."""
