"""The benchmarks: what the entry points in `scripts/` run and what their tests check, installed
with the package so that no script or test edits the import path.

Benchmarks (each has `build_parser`, `parse_args` and `main`; scripts/<name>.py calls `main`):
  coserve                 every co-serving policy on one online + offline workload
                          (scripts/bench_coserve.py)
  ecoserve                fcfs, sarathi and ecoserve on a KV-bound online workload
                          (scripts/bench_ecoserve.py)
  engine_speed            the engine's decode/prefill speed beside peers (scripts/bench_engine.py)
  prefix                  the prefix cache on and off: shared-instruction offline batch, chat,
                          co-serving, no sharing (scripts/bench_prefix.py)
  step_profile            where one decode iteration's time goes (scripts/profile_engine.py)
  latency_model_accuracy  the latency model's prediction error (scripts/bench_latency_model.py)
Their helpers:
  coserve_workload, coserve_report, coserve_accounting, coserve_pareto, coserve_probes
                          the co-serving benchmark's workload, statistics and report, run
                          accounting, variants and Pareto sweep, one-off measurements
  ecoserve_workload       the EcoServe benchmark's workload and metrics
  prefix_cases, prefix_runs, prefix_engines
                          the prefix-caching benchmark's cases (prompts per repeat, side
                          order, ratios), timed runs of one side, engine configs and builder
  prefix_workload, prefix_report
                          its workloads, hit-rate optimum, summaries; targets and tables
  peers                   transformers / llama.cpp peers and the matvec roofline, each in a
                          process of its own (torch is never imported in the engine's)
  script_io               engine flags checked when parsed, result JSON written (also used by
                          scripts/soak.py, bench_http_vs_grpc.py, bench_offline_restart.py)
Importing this package imports nothing; each module imports what it needs.
"""
