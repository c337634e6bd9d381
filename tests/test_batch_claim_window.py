"""Pull by idle capacity: on a shared store the runner claims only while its engine's
offline queue is short; alone on sqlite it fills its in-flight bound as before."""
from __future__ import annotations

from types import SimpleNamespace

from conserve_jax.engine_api import EngineStats
from conserve_server.batch.runner import BatchRunner


def _runner(shared, waiting, max_in_flight=8):
    store = SimpleNamespace(shared=shared)
    engine = SimpleNamespace(stats=lambda: EngineStats(offline_waiting=waiting))
    return BatchRunner(store, engine, max_in_flight)


def test_shared_store_claims_only_with_idle_capacity():
    assert _runner(True, 0)._claim_window() == 4  # at most half the window queued at once
    assert _runner(True, 3)._claim_window() == 1
    assert _runner(True, 4)._claim_window() == 0  # busy: leave the items to idle replicas
    assert _runner(True, 50)._claim_window() == 0


def test_alone_on_its_store_the_in_flight_bound_rules():
    assert _runner(False, 50)._claim_window() == 8
