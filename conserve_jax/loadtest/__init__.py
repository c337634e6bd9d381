"""Command-line load tester for a conserve-jax server.

One job per module:

- `trace`     reads an Azure LLM inference trace CSV; window, rate scale, token scale, clamp.
- `arrivals`  synthetic workloads: gamma arrival process (vLLM's `--burstiness`) and lengths.
- `prompts`   deterministic synthetic prompt token ids.
- `adapter`   `ClientAdapter`: the few `conserve_jax.entrypoints.client.Client` calls used, normalised.
- `runner`    drives the online load with threads on schedule; records time stamps.
- `offline`   submits, polls and measures the offline batches next to the online load.
- `metrics`   TTFT / TPOT / ITL / E2E statistics, SLO attainment, goodput.
- `report`    text table, JSON document, PNG plots.
- `fake`      an in-process fake client that emulates TTFT and ITL (tests, dry runs).
- `cli`       `conserve-jax loadtest`: `add_arguments(parser)` and `run(args)`.

Every workload is a list of `RequestSpec` (arrival time, prompt length, output length).
"""
from conserve_jax.loadtest.trace import RequestSpec

__all__ = ["RequestSpec"]
