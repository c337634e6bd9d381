"""The gRPC face: the CoServe servicer, its method handlers (status mapping) and the
stream/health/reflection limits. Proto <-> engine conversions, shared with the batch system,
are `conserve_server.convert`."""
