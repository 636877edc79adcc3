"""The policy MLLM on the real tritonserver: sampling, per-request errors, adapter hot reload.

Triton runs services/policy/model_repository as shipped; the adapters reach it the production way:
files in the adapter store, events on the real broker's compacted `adapters` topic.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from services.adapters.events import announce_version, move_alias
from services.adapters.store import AdapterStore
from services.common.kafka_io import ProtoProducer
from services.devstack.broker import BrokerProcess
from services.devstack.triton import TritonServer
from tests.policy.conftest import PublishAdapter

REPOSITORY = Path(__file__).resolve().parents[2] / "services" / "policy" / "model_repository"
MODEL = "spr_policy"

pytestmark = pytest.mark.integration


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _inputs(
    image_bytes: bytes, *, n: int = 2, adapter: str = "", greedy: bool = True
) -> list[grpcclient.InferInput]:
    def tensor(name: str, dtype: str, value: np.ndarray) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        return t

    return [
        tensor("IMAGE", "UINT8", np.frombuffer(image_bytes, dtype=np.uint8)[None]),
        tensor("INSTRUCTION", "BYTES", np.array([[b"Describe the region."]], dtype=np.object_)),
        tensor("NUM_SAMPLES", "INT32", np.array([[n]], dtype=np.int32)),
        tensor("MAX_NEW_TOKENS", "INT32", np.array([[10]], dtype=np.int32)),
        tensor("GREEDY", "BOOL", np.array([[greedy]], dtype=np.bool_)),
        tensor("ADAPTER", "BYTES", np.array([[adapter.encode()]], dtype=np.object_)),
    ]


def _infer(
    client: grpcclient.InferenceServerClient, image_bytes: bytes, **kwargs: object
) -> tuple[list[str], str]:
    result = client.infer(MODEL, _inputs(image_bytes, **kwargs))  # type: ignore[arg-type]
    texts = [t.decode() for t in result.as_numpy("TEXT")[0]]
    return texts, result.as_numpy("ADAPTER_VERSION")[0][0].decode()


@pytest.fixture
def policy_server(
    triton_server: Callable[..., TritonServer],
    kafka_broker: BrokerProcess,
    adapter_store: AdapterStore,
    tiny_policy_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> TritonServer:
    api_version = kafka_broker.settings().api_version
    monkeypatch.setenv("SPR_POLICY_MODEL_PATH", str(tiny_policy_path))
    monkeypatch.setenv("SPR_POLICY_BASE_MODEL_ID", str(tiny_policy_path))
    monkeypatch.setenv("SPR_POLICY_ADAPTER_STORE", str(adapter_store.root))
    monkeypatch.setenv("SPR_POLICY_KAFKA_BOOTSTRAP", kafka_broker.bootstrap_servers)
    monkeypatch.setenv("SPR_POLICY_KAFKA_API_VERSION", ".".join(map(str, api_version)) if api_version else "")
    return triton_server(REPOSITORY, models=[MODEL], fresh=True)


def test_samples_n_texts_and_reports_errors_per_request(
    policy_server: TritonServer, scene_image: Image.Image
) -> None:
    client = grpcclient.InferenceServerClient(policy_server.grpc_url)
    texts, version = _infer(client, _png(scene_image), n=3, greedy=False)
    assert len(texts) == 3 and version == ""
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT: IMAGE is not a decodable image"):
        _infer(client, b"not an image at all")
    with pytest.raises(InferenceServerException, match="ADAPTER_NOT_FOUND"):
        _infer(client, _png(scene_image), adapter="spr-v1-00000000")
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT: NUM_SAMPLES"):
        _infer(client, _png(scene_image), n=1000)
    assert _infer(client, _png(scene_image), n=1)[1] == ""  # still serving after the errors


def test_published_adapter_is_hot_loaded_without_failed_requests(
    policy_server: TritonServer,
    kafka_broker: BrokerProcess,
    publish_adapter: PublishAdapter,
    scene_image: Image.Image,
) -> None:
    client = grpcclient.InferenceServerClient(policy_server.grpc_url)
    image = _png(scene_image)
    base_text = _infer(client, image)[0][0]
    manifest = publish_adapter(7)
    with ProtoProducer(kafka_broker.settings()) as producer:
        announce_version(producer, manifest)
        move_alias(producer, "latest", manifest.version, reason="test publication")
    published_at = time.monotonic()
    seen: list[str] = []
    while time.monotonic() - published_at < 60:
        texts, version = _infer(client, image, adapter="latest")  # any failure fails the test
        seen.append(version)
        if version == manifest.version:
            break
    assert seen[-1] == manifest.version, f"latest never switched: {seen[-5:]}"
    assert set(seen) <= {"", manifest.version}  # "latest" unset reads as the base until the switch
    assert texts[0] != base_text
    pinned_text, pinned_version = _infer(client, image, adapter=manifest.version)
    assert (pinned_text[0], pinned_version) == (texts[0], manifest.version)
