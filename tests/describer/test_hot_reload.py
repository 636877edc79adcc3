"""Issue 3's acceptance test: while a client sends DescribeRegion continuously, a new adapter is
published; no request fails, every response names the adapter version that produced it, and after
the switch the outputs equal those of the new adapter loaded directly with PEFT (greedy decoding).

Everything is real: the broker, the compacted `adapters` topic, the adapter store, tritonserver
with services/policy/model_repository, the Describer over loopback gRPC, and PEFT as the reference.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image

from services.adapters.events import announce_version, move_alias
from services.adapters.store import AdapterStore
from services.common.grpc_server import GrpcServer, build_server, make_channel
from services.common.kafka_io import ProtoProducer
from services.describer.logic import Describer
from services.describer.servicer import register_with
from services.devstack.broker import BrokerProcess
from services.devstack.triton import TritonServer
from services.modelzoo.loading import load_policy
from services.policy.runner import chat_prompt
from spr.v1 import adapters_pb2, common_pb2, describer_pb2, describer_pb2_grpc
from tests.describer.conftest import POLICY_REPO, scene_png
from tests.describer.test_logic import REGION, make_settings
from tests.policy.conftest import make_lora_adapter

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 10


@pytest.fixture
def stack(
    triton_server: Callable[..., TritonServer],
    kafka_broker: BrokerProcess,
    tiny_qwen25: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[GrpcServer, Describer, AdapterStore]]:
    store = AdapterStore(tmp_path / "store")
    api = kafka_broker.settings().api_version
    monkeypatch.setenv("SPR_POLICY_MODEL_PATH", str(tiny_qwen25))
    monkeypatch.setenv("SPR_POLICY_BASE_MODEL_ID", str(tiny_qwen25))
    monkeypatch.setenv("SPR_POLICY_ADAPTER_STORE", str(store.root))
    monkeypatch.setenv("SPR_POLICY_KAFKA_BOOTSTRAP", kafka_broker.bootstrap_servers)
    monkeypatch.setenv("SPR_POLICY_KAFKA_API_VERSION", ".".join(map(str, api)) if api else "")
    triton = triton_server(POLICY_REPO, models=["spr_policy"], fresh=True)
    settings = make_settings(
        triton_url=triton.grpc_url,
        processor_config=tiny_qwen25 / "processor_config.json",
        policy_model_id=str(tiny_qwen25),
        sampling={"max_new_tokens": MAX_NEW_TOKENS},
        max_workers=4,
    )
    describer = Describer(settings)
    server = build_server(settings, register_with(describer))
    server.start()
    yield server, describer, store
    server.stop(grace=0)
    describer.close()
    triton.stop()


def _request() -> describer_pb2.DescribeRegionRequest:
    return describer_pb2.DescribeRegionRequest(
        image_bytes=scene_png(),
        region=REGION,
        region_id="hot-reload",
        prompt_mode=describer_pb2.PROMPT_MODE_CROP,
        sampling=common_pb2.SamplingParams(num_samples=2, greedy=True, max_new_tokens=MAX_NEW_TOKENS),
        adapter="latest",
    )


def _direct_peft_text(base: Path, adapter_dir: Path, describer: Describer) -> str:
    """What PEFT itself generates for the exact image and instruction the describer sent to Triton."""
    prepared = describer.prepare(_request())
    image = Image.open(io.BytesIO(prepared.policy_request.image)).convert("RGB")
    model, processor = load_policy(base)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    prompt = chat_prompt(processor, prepared.instruction)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
    return text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()


def test_publication_during_continuous_requests(
    stack: tuple[GrpcServer, Describer, AdapterStore],
    kafka_broker: BrokerProcess,
    tiny_qwen25: Path,
    tmp_path: Path,
) -> None:
    server, describer, store = stack
    # (request start, response receipt, adapter version, text)
    responses: list[tuple[float, float, str, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        with make_channel(f"127.0.0.1:{server.port}") as channel:
            stub = describer_pb2_grpc.DescriberStub(channel)
            while not stop.is_set():
                try:
                    started = time.monotonic()
                    for r in stub.DescribeRegion(_request(), timeout=60):
                        version, text = r.lineage.adapter_version, r.candidate.text
                        responses.append((started, time.monotonic(), version, text))
                except BaseException as exc:  # any failed request fails the test
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    manifest = store.publish(
        make_lora_adapter(tiny_qwen25, tmp_path / "lora", seed=5),
        adapters_pb2.AdapterManifest(base_model_id=str(tiny_qwen25)),
        round_index=1,
    )
    time.sleep(1.0)  # let the clients run on the base first
    with ProtoProducer(kafka_broker.settings()) as producer:
        announce_version(producer, manifest)
        published = time.monotonic()
        move_alias(producer, "latest", manifest.version, reason="test")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(v == manifest.version for _, _, v, _ in responses):
        time.sleep(0.05)
    time.sleep(1.0)  # and keep going on the new adapter for a while
    stop.set()
    for t in threads:
        t.join(60)

    assert errors == []
    versions = [v for _, _, v, _ in responses]
    assert set(versions) == {"", manifest.version}, set(versions)
    first_new_answer = min(received for _, received, v, _ in responses if v == manifest.version)
    assert first_new_answer - published < 10.0
    # Once a new-version answer has arrived the server has switched, so every request sent after it
    # is served by the new version. (Neither start times nor receipt times alone order requests: a
    # request sent before the switch may be resolved after it, and a base answer may stream late.)
    after = [(v, text) for started, _, v, text in responses if started > first_new_answer]
    assert after, "requests went on after the switch"
    assert all(v == manifest.version for v, _ in after), "no request falls back once switched"
    expected = _direct_peft_text(tiny_qwen25, store.path_of(manifest.version), describer)
    assert {text for _, text in after} == {expected}
    assert {text for _, _, v, text in responses if v == ""} != {expected}
