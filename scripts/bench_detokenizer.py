"""CPU time per token of streaming detokenization, today's `IncrementalDetokenizer` (two
Python-level window decodes per token) vs `StreamDetokenizer` (tokenizers' DecodeStream),
on the default model's tokenizer (or a trained byte-level BPE when the GGUF is absent).
Interleaved rounds, medians; prints one table. Thread CPU time (`time.thread_time`), so
other processes on the machine do not count.

    python scripts/bench_detokenizer.py [--tokens 20000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conserve_jax.detokenizer import StreamDetokenizer  # noqa: E402
from conserve_jax.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402

TEXT = ("The sky is blue because of Rayleigh scattering. héllo wörld, naïve café; "
        "日本語のテキスト 🙂👍🏽 — def f(x): return x ** 2\n")


def _tokenizer() -> tuple[str, Tokenizer]:
    try:
        import gguf

        from conserve_jax.models.gguf_loader import tokenizer_from_gguf
        from conserve_jax.models.loader import default_model_path

        return "default (GGUF)", tokenizer_from_gguf(gguf.GGUFReader(default_model_path()))
    except (ImportError, FileNotFoundError, OSError):
        from tests.hf_fixtures import write_tokenizer

        d = tempfile.mkdtemp()
        write_tokenizer(d)
        return "trained byte-level BPE", Tokenizer.from_file(os.path.join(d, "tokenizer.json"))


def _cpu_per_token(cls, tok, ids, requests: int) -> float:
    per = len(ids) // requests
    t0 = time.thread_time()
    for r in range(requests):
        d = cls(tok)
        for i in ids[r * per:(r + 1) * per]:
            d.push([i])
        d.finish()
    return (time.thread_time() - t0) / (per * requests)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=20, help="detokenizers the tokens spread over")
    a = p.parse_args()
    name, tok = _tokenizer()
    ids = tok.backend.encode(TEXT, add_special_tokens=False).ids
    ids = (ids * (a.tokens // len(ids) + 1))[:a.tokens]
    res: dict[str, list[float]] = {"incremental": [], "decode_stream": []}
    for _ in range(a.rounds):
        res["incremental"].append(_cpu_per_token(IncrementalDetokenizer, tok, ids, a.requests))
        res["decode_stream"].append(_cpu_per_token(StreamDetokenizer, tok, ids, a.requests))
    old, new = statistics.median(res["incremental"]), statistics.median(res["decode_stream"])
    print(f"tokenizer: {name}; {a.tokens} tokens x {a.rounds} interleaved rounds; medians")
    print(f"{'detokenizer':<28}{'CPU us/token':>14}")
    print(f"{'IncrementalDetokenizer':<28}{old * 1e6:>14.2f}")
    print(f"{'StreamDetokenizer':<28}{new * 1e6:>14.2f}")
    print(f"stream / incremental: {new / old:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
