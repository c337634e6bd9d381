"""Public import path of the gRPC client: `from conserve_jax.client import Client`.

The client lives in `conserve_jax.entrypoints.client`; this module keeps the documented
import working."""
from conserve_jax.entrypoints.client import (AsyncClient, BatchInfo, BatchResult, Chunk,
                                             Client, GenerateStream, Usage, make_request)

__all__ = ["AsyncClient", "BatchInfo", "BatchResult", "Chunk", "Client", "GenerateStream",
           "Usage", "make_request"]
