"""Multi-LoRA residency on one replica: exact PEFT outputs, LRU with pinned aliases, unknown adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image

from services.adapters.store import AdapterStore
from services.modelzoo.loading import load_policy
from services.policy.adapters import AdapterNotFound
from services.policy.runner import GenerationRequest, PolicyRunner, Sampling
from tests.policy.conftest import PublishAdapter

GREEDY = Sampling(num_samples=2, max_new_tokens=10, greedy=True)


def _request(image: Image.Image, adapter: str) -> GenerationRequest:
    return GenerationRequest(
        image=image, instruction="Describe the region.", sampling=GREEDY, adapter=adapter
    )


def _direct_peft_text(
    base_path: Path, adapter_dir: Path | None, image: Image.Image, runner: PolicyRunner
) -> str:
    """The reference: PEFT's own PeftModel.from_pretrained + generate, no SPR code in the loop."""
    model, processor = load_policy(base_path)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    inputs = processor(
        text=[runner.build_prompt("Describe the region.")], images=[image], return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY.max_new_tokens)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
    return text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()


def test_outputs_equal_direct_peft_for_base_and_each_adapter(
    tiny_policy_path: Path,
    adapter_store: AdapterStore,
    publish_adapter: PublishAdapter,
    scene_image: Image.Image,
) -> None:
    first, second = publish_adapter(1), publish_adapter(2)
    runner = PolicyRunner(
        str(tiny_policy_path), adapter_store=adapter_store, base_model_id=str(tiny_policy_path)
    )
    runner.adapters.set_alias("latest", first.version)
    results = runner.generate(
        [_request(scene_image, ""), _request(scene_image, "latest"), _request(scene_image, second.version)]
    )
    assert [r.adapter_version for r in results] == ["", first.version, second.version]
    assert all(len(r.texts) == 2 and r.texts[0] == r.texts[1] for r in results)
    expected = [
        _direct_peft_text(tiny_policy_path, None, scene_image, runner),
        _direct_peft_text(tiny_policy_path, adapter_store.path_of(first.version), scene_image, runner),
        _direct_peft_text(tiny_policy_path, adapter_store.path_of(second.version), scene_image, runner),
    ]
    assert [r.texts[0] for r in results] == expected
    assert len(set(expected)) == 3, "random adapters must change the greedy output"


def test_lru_keeps_aliased_versions_and_reloads_evicted_ones(
    tiny_policy_path: Path,
    adapter_store: AdapterStore,
    publish_adapter: PublishAdapter,
    scene_image: Image.Image,
) -> None:
    a, b, c = publish_adapter(1), publish_adapter(2), publish_adapter(3)
    runner = PolicyRunner(
        str(tiny_policy_path),
        adapter_store=adapter_store,
        base_model_id=str(tiny_policy_path),
        max_resident_adapters=2,
    )
    registry = runner.adapters
    registry.set_alias("stable", a.version)
    registry.load(b.version)
    registry.load(c.version)
    assert list(registry.resident) == [a.version, c.version]  # b was least recent and not aliased
    assert set(runner.adapters.model.peft_config) == {a.version, c.version}  # memory freed in PEFT too
    (result,) = runner.generate([_request(scene_image, b.version)])  # pinned, not resident: loaded on demand
    assert result.adapter_version == b.version
    assert b.version in registry.resident and registry.resident[b.version].requests_served == 1


def test_unknown_adapter_and_wrong_base_are_refused(
    tiny_policy_path: Path, adapter_store: AdapterStore, publish_adapter: PublishAdapter
) -> None:
    manifest = publish_adapter(1)
    runner = PolicyRunner(str(tiny_policy_path), adapter_store=adapter_store, base_model_id="some-other-base")
    with pytest.raises(AdapterNotFound, match="not found"):
        runner.adapters.resolve("spr-v1-00000000")
    with pytest.raises(AdapterNotFound, match="trained on"):
        runner.adapters.resolve(manifest.version)
    with pytest.raises(AdapterNotFound, match="no adapter store"):
        PolicyRunner(str(tiny_policy_path)).adapters.resolve("spr-v1-00000000")
    assert PolicyRunner(str(tiny_policy_path)).adapters.resolve("latest") == ""  # unset alias = base
