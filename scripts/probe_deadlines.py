"""Diagnostic: run scripts/bench_deadlines.py (same arguments) while printing, every second,
the engine's offline sequences, as session 34 did to find why a job missed its window.

One line per second: online sequences running or waiting, the engine's offline counters,
then each offline sequence as `<batch>.<item><U rank or ->:<status><computed>/<prompt>
+<generated>p<preemptions>` (U0: urgent, rank 0; status r running, w waiting). Reads the
engine's private state from a sampler thread without locks: a diagnostic, not a benchmark
(its numbers are the benchmark's; the lines only explain them).

    python scripts/probe_deadlines.py --quick --job-items 3,4,10 \
        --submit-order loose,medium,tight --stagger-s 8 > probe.txt
"""
import sys
import threading
import time

from conserve_jax.bench import deadlines as bench
from conserve_jax.engine import engine as engine_mod

_engines: list = []


def _track_engines() -> None:
    init = engine_mod.Engine.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        _engines.append(self)
    engine_mod.Engine.__init__ = tracked


def _row(seq, urgent: dict) -> str:
    rid = seq.request_id
    tag = f"U{urgent[rid]}" if rid in urgent else "-"
    parts = rid.split(":")
    name = f"{parts[1][-3:]}.{parts[2]}" if len(parts) == 4 else rid[-6:]
    return (f"{name}{tag}:{seq.status.value[0]}{seq.num_computed}/{seq.prompt_len}"
            f"+{seq.num_generated}p{seq.num_preemptions}")


def _sample(t0: float) -> None:
    while True:
        time.sleep(1.0)
        if not _engines:
            continue
        eng = _engines[-1]
        try:
            s, urgent = eng.scheduler, dict(eng._urgent)
            rows = [_row(q, urgent) for q in list(s.running) + list(s.waiting_offline)
                    if not q.online]
            online = sum(1 for q in s.running if q.online) + len(s.waiting_online)
            st = eng.stats()
            print(f"[{time.monotonic() - t0:6.1f}] online={online} "
                  f"off_tok={st.offline_tokens_total} off_pre={st.offline_prefill_tokens_total}"
                  f" | " + " ".join(rows), flush=True)
        except Exception as e:  # the state changed under the reader: skip this second
            print(f"sampler: {e!r}", flush=True)


if __name__ == "__main__":
    _track_engines()
    threading.Thread(target=_sample, args=(time.monotonic(),), daemon=True).start()
    bench.main(sys.argv[1:])
