"""On-demand training end to end: Admin `TriggerTraining` over a real gRPC socket -> `trainer.control`
on the real broker -> `python -m trainer run` (a real subprocess, whose own policy would not train:
1000 pairs, no interval) starts a round -> a version in the store whose manifest names the trigger.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from services.adapters.store import AdapterStore
from services.devstack.broker import BrokerProcess
from spr.v1 import adapters_pb2
from tests.admin.conftest import admin_settings, start_admin, stop_admin
from tests.trainer.conftest import make_pairs
from tests.trainer.test_integration import committed, config, kill_when, produce_pairs, trainer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_admin_trigger_starts_a_round_of_the_running_trainer(
    broker_factory: Callable[..., BrokerProcess], tiny_policy: Path, tmp_path: Path
) -> None:
    broker = broker_factory()
    cfg = config(broker, tiny_policy, tmp_path)
    produce_pairs(broker.settings(), make_pairs(tmp_path / "img", 3))
    proc = trainer(cfg, "run", "--trigger_every_pairs", "1000", "--trigger_every_minutes", "0")
    store = AdapterStore(cfg.store)
    admin = start_admin(admin_settings(broker, store, base_model_id=str(tiny_policy)), store)
    try:
        request = adapters_pb2.TriggerTrainingRequest(reason="operator: new scenes labelled")
        response = admin.stub.TriggerTraining(request, timeout=30)
        assert response.accepted and response.trigger_id

        log = kill_when(proc, lambda line: "trainer.rounds: committed offsets" in line)

        assert "round triggered: operator: new scenes labelled" in log
        (manifest,) = store.list_versions()
        assert manifest.trigger.trigger_id == response.trigger_id
        assert manifest.trigger.kind == adapters_pb2.TRIGGER_KIND_ON_DEMAND
        assert manifest.pair_count == 3
        assert committed(broker.settings(), cfg.group_id) == {
            r.partition: r.end_offset for r in manifest.pair_ranges
        }
        listed = admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
        assert listed.aliases["latest"] == manifest.version
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        stop_admin(admin)
