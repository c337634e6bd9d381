"""The cold-start benchmark on the tiny model: a fresh server (warm-up on, fresh HOME and
compilation cache) answers every request of a short steady load, and the JSON reports
TTFT per window and the memory mappings."""
import json

from conserve_jax.bench import cold_start


def test_cold_start_tiny(tmp_path):
    out = tmp_path / "cold.json"
    rc = cold_start.main(["--duration-s", "8", "--window-s", "4", "--rate", "2",
                          "--longest-prompt", "120", "--max-token-id", "200",
                          "--json", str(out), "--", "--model", "random:tiny",
                          "--max-model-len", "256", "--max-num-seqs", "4",
                          "--max-prefill-tokens", "64"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["failed"] == 0 and d["requests"] > 0
    assert [w["window"] for w in d["per_minute"]] == [1, 2]
    assert sum(w["requests"] for w in d["per_minute"]) == d["requests"]
    assert d["maps_when_listening"] > 0 and d["start_to_listening_s"] > 0
