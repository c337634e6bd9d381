"""CPU time per token of streaming detokenization, `IncrementalDetokenizer` vs
`StreamDetokenizer` (tokenizers' DecodeStream). The benchmark is
conserve_jax/bench/detokenizer_speed.py; this file only runs its `main`.

    python scripts/bench_detokenizer.py [--tokens 20000] [--rounds 5]
"""
from conserve_jax.bench.detokenizer_speed import main

if __name__ == "__main__":
    main()
