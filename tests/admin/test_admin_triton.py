"""The Admin API against a real policy replica: tritonserver running services/policy/model_repository
with the tiny Qwen2.5-VL, following the real broker's ``adapters`` topic. A promotion through the
Admin API reaches the replica by the topic alone, and ``ListAdapters.loaded`` shows what it loaded.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from services.adapters.store import AdapterStore
from services.devstack.broker import BrokerProcess
from services.devstack.triton import TritonServer
from services.modelzoo.tiny import ensure_model
from spr.v1 import adapters_pb2
from tests.admin.conftest import GOOD, AdminHarness, api_version_of
from tests.policy.conftest import make_lora_adapter

REPOSITORY = Path(__file__).resolve().parents[2] / "services" / "policy" / "model_repository"
MODEL = "spr_policy"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _infer(url: str, adapter: str) -> str:
    """One greedy request naming ``adapter``; returns the version that served it."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")

    def tensor(name: str, dtype: str, value: np.ndarray[Any, Any]) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    inputs = [
        tensor("IMAGE", "UINT8", np.frombuffer(buffer.getvalue(), dtype=np.uint8)[None]),
        tensor("INSTRUCTION", "BYTES", np.array([[b"Describe the region."]], dtype=np.object_)),
        tensor("NUM_SAMPLES", "INT32", np.array([[1]], dtype=np.int32)),
        tensor("MAX_NEW_TOKENS", "INT32", np.array([[4]], dtype=np.int32)),
        tensor("GREEDY", "BOOL", np.array([[True]], dtype=np.bool_)),
        tensor("ADAPTER", "BYTES", np.array([[adapter.encode()]], dtype=np.object_)),
    ]
    result = grpcclient.InferenceServerClient(url).infer(MODEL, inputs)
    return str(result.as_numpy("ADAPTER_VERSION")[0][0].decode())


def _wait_for_switch(
    admin: AdminHarness, version: str, alias: str = "latest", timeout_s: float = 90.0
) -> adapters_pb2.LoadedAdapter:
    """Until the replica shows ``version`` loaded and ``alias`` pointing at it. It loads the version
    first and re-points the alias after, so its metrics can show the one a moment before the other."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listing = admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
        found = [a for a in listing.loaded if a.version == version]
        switched = all(r.aliases.get(alias) == version for r in admin.core.replica_status())
        if found and switched:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"{version} never showed as {alias}; replicas: {admin.core.replica_status()}")


def test_list_adapters_shows_what_the_replica_loaded_after_a_promotion(
    triton_server: Callable[..., TritonServer],
    broker: BrokerProcess,
    store: AdapterStore,
    admin_factory: Callable[..., AdminHarness],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = ensure_model("tiny-qwen2.5-vl")
    folder = make_lora_adapter(policy, tmp_path / "lora", seed=7)
    manifest = adapters_pb2.AdapterManifest(base_model_id=str(policy), metrics=GOOD)
    version = store.publish(folder, manifest, round_index=1).version

    monkeypatch.setenv("SPR_POLICY_MODEL_PATH", str(policy))
    monkeypatch.setenv("SPR_POLICY_BASE_MODEL_ID", str(policy))
    monkeypatch.setenv("SPR_POLICY_ADAPTER_STORE", str(store.root))
    monkeypatch.setenv("SPR_POLICY_KAFKA_BOOTSTRAP", broker.bootstrap_servers)
    monkeypatch.setenv("SPR_POLICY_KAFKA_API_VERSION", api_version_of(broker) or "")
    triton = triton_server(REPOSITORY, models=[MODEL], fresh=True)
    admin = admin_factory(replica_metrics_urls=(triton.metrics_url,), base_model_id=str(policy))
    assert not admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30).loaded

    promoted_at = time.monotonic()
    admin.stub.Promote(adapters_pb2.PromoteRequest(version=version, alias="latest"), timeout=30)
    loaded = _wait_for_switch(admin, version)
    print(f"promotion to ListAdapters.loaded: {time.monotonic() - promoted_at:.2f}s")
    assert loaded.load_seconds > 0

    assert _infer(triton.grpc_url, "latest") == version  # the replica switched by the topic alone
    listing = admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
    assert dict(listing.aliases) == {"latest": version}
    assert [(a.version, a.requests_served) for a in listing.loaded] == [(version, 1)]
    (replica,) = admin.core.replica_status()
    assert replica.error == "" and replica.aliases["latest"] == version
