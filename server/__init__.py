"""The conserve-jax gRPC server: `main` (entry point), `app` (wiring and shutdown),
`servicer` (CoServe RPCs), `batch_store` (sqlite durability), `batch_runner` (feeds batch
items to the engine), `convert` (proto <-> engine types), `auth` (bearer tokens)."""
