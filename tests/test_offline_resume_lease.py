"""Offline KV saved at a restart is reused only if the item's new claim directly follows
the one it was saved under (no other replica ran the item in between)."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server.batch.base import ClaimedItem
from conserve_server.batch.offline_resume import OfflineResume


def _resume(tmp_path, leases):
    r = OfflineResume.__new__(OfflineResume)  # only the lease bookkeeping is under test
    r.leases_path = str(tmp_path / "offline-kv-leases.json")
    r.store = SimpleNamespace(shared=True)
    (tmp_path / "offline-kv-leases.json").write_text(json.dumps(leases))
    return r


def _item(epoch):
    return ClaimedItem("batch_x", 3, pb.GenerateRequest(), [1], epoch)


def test_saved_state_is_used_only_when_the_lease_continues(tmp_path, caplog):
    r = _resume(tmp_path, {"batch_x-3": 4})
    assert r._lease_continues("batch_x-3", _item(5))  # our release, our next claim
    with caplog.at_level(logging.WARNING):
        assert not r._lease_continues("batch_x-3", _item(7))  # someone claimed it in between
    assert "another replica ran it meanwhile" in caplog.text
    assert r._lease_continues("batch_y-1", _item(9))  # saved before epochs were recorded
    r.store = SimpleNamespace(shared=False)  # sqlite: one process, the lease always continues
    assert r._lease_continues("batch_x-3", _item(7))
