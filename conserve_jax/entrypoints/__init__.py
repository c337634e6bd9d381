"""The faces a user calls in-process or from a shell: the `conserve-jax` command line
(`cli` and its commands `demo`, `generate`, `profile`), the offline Python API `LLM`
(shaped like vLLM's) and the gRPC `Client`. The gRPC/HTTP server is `conserve_server`."""
