"""Issue 6's acceptance test: pairs on the broker -> `python -m trainer once` -> the adapter it publishes
is hot-loaded by a serving replica on the real tritonserver, which answers exactly as the same adapter
loaded directly with PEFT (greedy). Plus the PEFT folder layout vLLM's `--lora-modules` expects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import tritonclient.grpc as grpcclient
from peft import PeftModel
from safetensors import safe_open

from services.adapters.store import AdapterStore
from services.describer.families import get_family
from services.devstack.broker import BrokerProcess
from services.devstack.triton import TritonServer
from services.modelzoo.loading import load_policy
from services.policy.runner import chat_prompt
from tests.policy.test_triton_policy import MODEL, REPOSITORY, _infer, _png
from tests.trainer.conftest import make_pairs
from tests.trainer.interop import assert_vllm_loads
from tests.trainer.test_integration import config, produce_pairs, run_ok
from trainer.dataset import policy_frame

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def peft_greedy(base: Path, adapter_dir: Path, image: object, instruction: str) -> str:
    """The reference: the adapter loaded with PEFT on the production loader, greedy, 10 tokens."""
    base_model, processor = load_policy(base)
    model: Any = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    inputs = processor(text=[chat_prompt(processor, instruction)], images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=10)
    text: str = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
    return text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()


def assert_vllm_layout(folder: Path, base: Path) -> None:
    """vLLM's LoRA loader accepts the folder (tests/trainer/interop.py), and training changed the policy."""
    assert_vllm_loads(folder, json.loads((base / "config.json").read_text()))
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as tensors:
        names = [n for n in tensors.keys() if n.endswith("lora_B.weight")]  # noqa: SIM118 (not a dict)
        trained = [tensors.get_tensor(n).abs().max().item() for n in names]
    assert max(trained) > 0  # LoRA B starts at zero: non-zero means training changed the policy


def test_trained_adapter_is_served_exactly_as_peft_loads_it(
    broker_factory: Callable[..., BrokerProcess],
    triton_server: Callable[..., TritonServer],
    tiny_policy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = broker_factory()
    cfg = config(broker, tiny_policy, tmp_path, learning_rate=5e-2, lora_r=8, lora_alpha=32)
    pairs = make_pairs(tmp_path / "img", 4)
    produce_pairs(broker.settings(), pairs)
    api = broker.settings().api_version
    monkeypatch.setenv("SPR_POLICY_MODEL_PATH", str(tiny_policy))
    monkeypatch.setenv("SPR_POLICY_BASE_MODEL_ID", str(tiny_policy))
    monkeypatch.setenv("SPR_POLICY_ADAPTER_STORE", cfg.store)
    monkeypatch.setenv("SPR_POLICY_KAFKA_BOOTSTRAP", broker.bootstrap_servers)
    monkeypatch.setenv("SPR_POLICY_KAFKA_API_VERSION", ".".join(map(str, api)) if api else "")
    server = triton_server(REPOSITORY, models=[MODEL], fresh=True)

    run_ok(cfg)

    (manifest,) = AdapterStore(cfg.store).list_versions()
    adapter_dir = AdapterStore(cfg.store).path_of(manifest.version)
    assert_vllm_layout(adapter_dir, tiny_policy)
    frame = policy_frame(pairs[0], get_family(cfg.model_family))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    deadline, version, texts = time.monotonic() + 60, "", [""]
    while version != manifest.version and time.monotonic() < deadline:
        texts, version = _infer(client, _png(frame), n=1, adapter="latest")
        time.sleep(0.2)
    assert version == manifest.version
    # _infer sends the fixed instruction "Describe the region."; the reference uses the same.
    assert texts[0] == peft_greedy(tiny_policy, adapter_dir, frame, "Describe the region.")
