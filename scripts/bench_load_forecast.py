"""How well the last H seconds of online load forecast the next L seconds, on the Azure
trace alone (no engine): the assumption behind the deadline estimates (issue 27).

The analysis is conserve_jax/bench/load_forecast.py (its module doc says what is
measured); this file only runs its `main`.

    python scripts/bench_load_forecast.py --json out/load_forecast.json
"""
from conserve_jax.bench.load_forecast import main

if __name__ == "__main__":
    main()
