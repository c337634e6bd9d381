"""conserve_server: the conserve-jax server process (installed from `server/` under this
import name). `main` (the `serve` command), `config` (every server setting with its one
default; the `serve` flags are generated from it), `app` (wiring and ordered shutdown),
`admission` (the one gate both faces share: online and flex limits, tenant shares, default
objectives), the faces `grpc_api/` (CoServe RPCs) and `openai_api/` (OpenAI-compatible
HTTP), `batch/` (the durable batch-job system both faces use), `convert` (proto <-> engine
types, the batch store's item format too), `auth`, `metrics` (/metrics, GetServerStats),
`pem`."""
