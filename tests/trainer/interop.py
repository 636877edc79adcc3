"""What LLaMA-Factory and vLLM require of our exports, as checks (neither installs here: LLaMA-Factory
pins its own torch/transformers stack, vLLM needs CUDA). Each rule names the code it comes from, as
read in the projects' sources:

LLaMA-Factory (``src/llamafactory/data/parser.py`` ``get_dataset_list`` / ``DatasetAttr``,
``converter.py`` ``SharegptDatasetConverter``, ``mm_plugin.py``):

* ``dataset_info.json`` in ``dataset_dir`` maps the dataset name to an entry; an entry without
  ``hf_hub_url`` / ``ms_hub_url`` / ``script_url`` is loaded from ``file_name`` in that folder, with
  the loader chosen by the file extension (``parquet``);
* ``formatting: sharegpt`` reads ``columns.messages`` (a list of ``{role_tag: ..., content_tag: ...}``);
  turn i must carry the user/observation tag when i is even and the assistant/function tag when odd;
  a ``ranking`` dataset needs an odd number of turns (it ends on the user's turn) and
  ``columns.chosen`` / ``columns.rejected`` as single messages (dicts) with an assistant tag;
  a broken example is skipped with a warning, not reported as an error — hence a strict check here;
* images come from ``columns.images``: a list per row (paths, ``{"bytes", "path"}`` dicts or PIL
  images), and the messages must hold exactly one ``<image>`` placeholder per image.

vLLM (``vllm/lora/peft_helper.py`` ``PEFTHelper``, ``lora/utils.py`` ``parse_fine_tuned_lora_name`` /
``is_regex_target_modules``, ``lora/lora_model.py`` ``LoRAModel.from_local_checkpoint``,
``model_executor/models/qwen2_5_vl.py`` ``hf_to_vllm_mapper`` / ``packed_modules_mapping``):

* ``adapter_config.json`` needs ``r``, ``lora_alpha``, ``target_modules``; ``modules_to_save`` must be
  empty and ``use_dora`` false (both raise); only ``bias: none`` loads on current versions;
* tensor names: ``base_model.model.`` + the HF module path (mapped by the model's
  ``hf_to_vllm_mapper``) + ``.lora_A.weight`` / ``.lora_B.weight``; the module's last name must be
  one vLLM can LoRA-replace (for Qwen2.5-VL's language model: the q/k/v, o, gate/up, down projections,
  packed into ``qkv_proj`` / ``gate_up_proj``), else the load fails with "expected target modules";
* a regex ``target_modules`` must end in an alternation of such names (``is_regex_target_modules``);
* vLLM applies LoRA to the language model only (the vision tower needs an opt-in): every tensor must
  map under ``language_model.model.layers``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from datasets import load_dataset
from PIL import Image
from safetensors import safe_open

# --- LLaMA-Factory -----------------------------------------------------------------------------------


def assert_llama_factory_reads(dataset_dir: Path, name: str) -> list[dict[str, Any]]:
    """Load dataset `name` of `dataset_dir` by LLaMA-Factory's rules; return its rows in its standard
    form (``_prompt``, ``_response`` = [chosen, rejected], ``_images``), failing on any broken row."""
    info = json.loads((dataset_dir / "dataset_info.json").read_text())
    entry = info[name]
    assert not {"hf_hub_url", "ms_hub_url", "script_url"} & set(entry), "must load from a local file"
    assert entry["formatting"] == "sharegpt" and entry["ranking"] is True
    path = dataset_dir / entry["file_name"]
    assert path.suffix == ".parquet" and path.is_file()
    columns, tags = entry["columns"], entry["tags"]
    rows = load_dataset("parquet", data_files=str(path), split="train")
    return [_sharegpt_ranking_row(row, columns, tags) for row in rows]


def _sharegpt_ranking_row(
    row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]
) -> dict[str, Any]:
    role, content = tags["role_tag"], tags["content_tag"]
    odd_roles, even_roles = (tags["user_tag"], "observation"), (tags["assistant_tag"], "function_call")
    messages = row[columns["messages"]]
    if messages and messages[0][role] == tags["system_tag"]:
        messages = messages[1:]
    for index, message in enumerate(messages):
        assert message[role] in (odd_roles, even_roles)[index % 2], f"turn {index} has role {message[role]}"
        assert isinstance(message[content], str)
    assert len(messages) % 2 == 1, "a ranking example ends on the user's turn"
    chosen, rejected = row[columns["chosen"]], row[columns["rejected"]]
    for answer in (chosen, rejected):
        assert isinstance(answer, dict) and answer[role] in even_roles and isinstance(answer[content], str)
    images = row[columns["images"]]
    assert isinstance(images, list) and all(isinstance(image, Image.Image) for image in images)
    placeholders = sum(message[content].count("<image>") for message in messages)
    assert placeholders == len(images), f"{placeholders} <image> placeholders for {len(images)} images"
    return {
        "_prompt": [{"role": m[role], "content": m[content]} for m in messages],
        "_response": [{"role": a[role], "content": a[content]} for a in (chosen, rejected)],
        "_images": images,
    }


# --- vLLM --------------------------------------------------------------------------------------------

#: Qwen2.5-VL's language-model linear layers vLLM can LoRA-replace, after unpacking qkv / gate_up.
VLLM_QWEN2_5_VL_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
#: Qwen2.5-VL's hf_to_vllm_mapper (prefix renames, first match wins).
_QWEN2_5_VL_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "visual."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
)
_VLLM_LM_MODULE = re.compile(r"^language_model\.model\.layers\.\d+\.(self_attn|mlp)\.(\w+)$")


def vllm_module_name(tensor_name: str) -> tuple[str, str]:
    """(vLLM module path, lora_A | lora_B) of a PEFT tensor name, or AssertionError."""
    prefix = "base_model.model."
    assert tensor_name.startswith(prefix), f"{tensor_name}: no {prefix} prefix"
    name = tensor_name[len(prefix) :]
    for old, new in _QWEN2_5_VL_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    parts = name.split(".")
    assert parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"), f"{tensor_name}: not a LoRA weight"
    return ".".join(parts[:-2]), parts[-2]


def assert_vllm_loads(folder: Path, base_config: dict[str, Any]) -> None:
    """The adapter folder passes vLLM's LoRA loader checks for a Qwen2.5-VL base with `base_config`."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert {"r", "lora_alpha", "target_modules"} <= set(config)
    assert not config.get("modules_to_save") and not config.get("use_dora")
    assert config.get("bias", "none") == "none"
    targets = config["target_modules"]
    if isinstance(targets, str):  # PEFT keeps a regex as a string; vLLM checks its final alternation
        match = re.search(r"\((.*?)\)\$?$", targets)
        assert match and set(match.group(1).split("|")) <= VLLM_QWEN2_5_VL_LORA_MODULES, targets
    else:
        assert {t.rsplit(".", 1)[-1] for t in targets} <= VLLM_QWEN2_5_VL_LORA_MODULES, targets
    text = base_config.get("text_config", base_config)
    hidden = text["hidden_size"]
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as tensors:
        names = list(tensors.keys())
        assert names, "no tensors"
        for name in names:
            module, kind = vllm_module_name(name)
            matched = _VLLM_LM_MODULE.match(module)
            assert matched, f"{name} -> {module}: not a language-model layer vLLM applies LoRA to"
            assert matched.group(2) in VLLM_QWEN2_5_VL_LORA_MODULES, f"{name}: {matched.group(2)}"
            shape = tuple(tensors.get_slice(name).get_shape())
            _assert_lora_shape(name, matched.group(2), kind, shape, config["r"], hidden)


def _assert_lora_shape(
    name: str, module: str, kind: str, shape: tuple[int, ...], r: int, hidden: int
) -> None:
    """lora_A is (r, in), lora_B is (out, r); the sides that touch the residual stream are `hidden`."""
    reads_hidden = module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    if kind == "lora_A":
        assert shape[0] == r and (not reads_hidden or shape[1] == hidden), f"{name}: {shape}"
    else:
        assert shape[1] == r and (reads_hidden or shape[0] == hidden), f"{name}: {shape}"
