"""Build a small REAL-architecture Qwen2.5-VL (random weights) for GPU benchmarks.

No weights can be downloaded, so this keeps the real layer shapes of a small configuration — the
Qwen2.5-0.5B text stack (hidden 896, 24 layers, 14 heads, 2 KV heads) under the full Qwen2.5-VL
vision tower (32 blocks, width 1280, window attention) — with the tiny model's tokenizer and
processor, so sequence lengths and compute per token are those of a real small VLM.

    python bench/gpu/build_small_policy.py --out /tmp/small-qwen2.5-vl
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from services.modelzoo.tiny import ensure_model

PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)


def small_config(tiny: Qwen2_5_VLConfig) -> Qwen2_5_VLConfig:
    text = tiny.text_config.to_dict()
    text.pop("layer_types", None)  # derived from the layer count: let the config recompute it
    text.update(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},  # sums to head_dim / 2 = 32
    )
    vision = tiny.vision_config.to_dict()
    vision.update(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=896,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    config = tiny.to_dict()
    config.update(text_config=text, vision_config=vision)
    return Qwen2_5_VLConfig(**config)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    tiny = ensure_model("tiny-qwen2.5-vl")
    config = small_config(Qwen2_5_VLConfig.from_pretrained(tiny))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny).generation_config
    model.save_pretrained(args.out)
    for name in PROCESSOR_FILES:
        if (tiny / name).exists():
            shutil.copy2(tiny / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"small Qwen2.5-VL: {params / 1e6:.0f}M parameters (bf16) -> {args.out}")


if __name__ == "__main__":
    main()
