"""Recipes of the tiny random-weight models built by `spr-tiny-models` (`services.modelzoo.tiny`).

Each recipe is the real transformers class with a tiny config and a locally built tokenizer
(`services.modelzoo.tokenizer`), written with `save_pretrained`; each kind of model has a check that loads
a build back through `services.modelzoo.loading` (the code production uses) and runs it once.
Kept apart from `tiny` because importing these model classes takes seconds, which a cache hit should not pay.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw
from transformers import (
    BertConfig,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    GenerationConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
    GroundingDinoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessorPil,
    Owlv2Processor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    SwinConfig,
)

from services.modelzoo import loading
from services.modelzoo import tokenizer as tok

Kind = Literal["policy", "grounding", "clip"]

# The released Qwen2-VL / Qwen2.5-VL chat template (images and videos, optional "Picture N:" ids).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The released LLaVA-1.5 chat_template.json (llava-hf): "USER: <image>\n{text} ASSISTANT:", images
# before text, no default system prompt. One addition: plain-string contents (text-only turns, such as
# the chosen/rejected completions of a preference trainer), which the released template silently drops.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Shared sizes of the tiny policies' text models: 64 wide (4 heads of 16, 2 KV heads), 2 layers.
TEXT_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
# Qwen-VL: the shared text sizes, vision patch 14, merge 2.
QWEN_TEXT = {
    **TEXT_SIZES,
    # mrope splits the 8 rotary frequencies of a 16-wide head into (temporal, height, width) parts,
    # in the proportions of the released 16/24/24 for 128-wide heads.
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
}
QWEN_PATCH, QWEN_MERGE = 14, 2
# Images are resized to between 56x56 and 112x112 pixels: 4 to 16 image tokens.
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 112 * 112
# LLaVA: a CLIP ViT of patch 14 on 56 px squares sees 4x4 patches; the "default" feature strategy drops
# the CLS token, so every image is 16 `<image>` tokens (576 for the released 336 px).
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 56, 14
LLAVA_IMAGE_TOKENS = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2


@dataclass(frozen=True)
class Recipe:
    """How to build one tiny model into an empty folder, and which loader (`kind`) loads it."""

    name: str
    kind: Kind
    build: Callable[[Path], None]


def _qwen_processor(processor_class: type[ProcessorMixin]) -> ProcessorMixin:
    """A Qwen-VL processor (PIL image processor, local tokenizer, chat template), without videos."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        patch_size=QWEN_PATCH,
        temporal_patch_size=2,
        merge_size=QWEN_MERGE,
    )
    image_only = loading.image_only_processor_class(processor_class)
    return image_only(
        image_processor=image_processor,
        tokenizer=tok.build_qwen_tokenizer(),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )


def _qwen_token_ids(processor: ProcessorMixin) -> dict[str, Any]:
    """Token ids that Qwen-VL configs name, read from the tokenizer that was just built."""
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in tok.QWEN_SPECIAL_TOKENS}
    return {
        "text": {
            "vocab_size": len(processor.tokenizer),
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        "top": {
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
        },
        "bos": ids["<|endoftext|>"],
        "eos": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad": ids["<|endoftext|>"],
    }


def _save_policy(model: PreTrainedModel, processor: ProcessorMixin, ids: dict[str, Any], out: Path) -> None:
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_qwen2_5_vl(out: Path) -> None:
    """Qwen2_5_VLForConditionalGeneration: 2 vision blocks (one windowed, one full), 2 text layers."""
    processor = _qwen_processor(Qwen2_5_VLProcessor)
    ids = _qwen_token_ids(processor)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": QWEN_PATCH,
        "spatial_merge_size": QWEN_MERGE,
        "temporal_patch_size": 2,
        # Windows of 56 px (2x2 merged tokens) so that window attention really partitions 112 px images.
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "out_hidden_size": QWEN_TEXT["hidden_size"],
    }
    config = Qwen2_5_VLConfig(text_config={**QWEN_TEXT, **ids["text"]}, vision_config=vision, **ids["top"])
    _save_policy(Qwen2_5_VLForConditionalGeneration(config), processor, ids, out)


def build_qwen2_vl(out: Path) -> None:
    """Qwen2VLForConditionalGeneration with the same tokenizer and text sizes as tiny-qwen2.5-vl."""
    processor = _qwen_processor(Qwen2VLProcessor)
    ids = _qwen_token_ids(processor)
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": QWEN_TEXT["hidden_size"],
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": QWEN_PATCH,
        "spatial_merge_size": QWEN_MERGE,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(text_config={**QWEN_TEXT, **ids["text"]}, vision_config=vision, **ids["top"])
    _save_policy(Qwen2VLForConditionalGeneration(config), processor, ids, out)


def _llava_processor() -> ProcessorMixin:
    """A LlavaProcessor: PIL CLIP image processor, Vicuna-style tokenizer, LLaVA-1.5 chat template.

    The image is stretched to the square rather than resized by its short side and centre-cropped (the
    llava-hf default), so the model sees the whole image and 0-999 bins stay relative to all of it, the
    frame `services.describer.families.FixedResize` assumes.
    """
    square = {"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}
    image_processor = CLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False)
    return LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tok.build_llama_tokenizer(),
        patch_size=LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" then drops
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=tok.LLAVA_IMAGE_TOKEN,
    )


def build_llava(out: Path) -> None:
    """LlavaForConditionalGeneration (LLaVA-1.5 layout): 2-layer CLIP ViT, 2-layer MLP projector, Llama.

    Image features come from the vision tower's second-last layer, as in LLaVA-1.5.
    """
    processor = _llava_processor()
    tokenizer = processor.tokenizer
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    text = {"model_type": "llama", **TEXT_SIZES, "vocab_size": len(tokenizer)}
    text |= {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    vision = {"model_type": "clip_vision_model", **_vit(LLAVA_IMAGE_SIZE, LLAVA_PATCH, layers=2)}
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(tok.LLAVA_IMAGE_TOKEN),
        image_seq_length=LLAVA_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    _save_policy(LlavaForConditionalGeneration(config), processor, ids, out)


def build_grounding_dino(out: Path) -> None:
    """GroundingDinoForObjectDetection: 4-stage Swin (16 wide), 1-layer BERT, d_model 32, 2 decoder layers."""
    tokenizer = tok.build_bert_tokenizer()
    backbone = SwinConfig(  # type: ignore[call-arg]  # out_indices is a property, set through __init__
        image_size=128,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=tokenizer.model_max_length,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        num_queries=30,
        encoder_layers=1,
        decoder_layers=2,  # bbox heads of layers 1.. are tied to layer 0: one layer leaves none to tie
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=tokenizer.model_max_length,
    )
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 96, "longest_edge": 128})
    GroundingDinoForObjectDetection(config).save_pretrained(out)
    processor = GroundingDinoProcessor(image_processor, tokenizer)  # type: ignore[no-untyped-call]
    processor.save_pretrained(out)


def _clip_text(tokenizer: Any, layers: int, width: int = 32) -> dict[str, Any]:
    """A CLIP-family text tower sized for `tokenizer` (its eos id is the pooled token, as in CLIP)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _vit(image_size: int, patch_size: int, layers: int, width: int = 32) -> dict[str, Any]:
    return {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def build_owlv2(out: Path, *, patch_size: int = 16, width: int = 32, layers: int = 1) -> None:
    """Owlv2ForObjectDetection: 96 px images, patch 16 (36 box predictions), 1-layer towers by default
    (the world's grounder, `services.bootstrap.grounder`, asks for a finer grid and deeper towers)."""
    tokenizer = tok.build_clip_tokenizer(model_max_length=16)
    config = Owlv2Config(
        text_config=_clip_text(tokenizer, layers=layers, width=width),
        vision_config=_vit(96, patch_size, layers=layers, width=width),
        projection_dim=width,
    )
    image_processor = Owlv2ImageProcessorPil(size={"height": 96, "width": 96})
    Owlv2ForObjectDetection(config).save_pretrained(out)
    Owlv2Processor(image_processor, tokenizer).save_pretrained(out)  # type: ignore[no-untyped-call]


def build_clip(out: Path) -> None:
    """CLIPModel: 64 px images, patch 8 (an 8x8 grid of patch features), 2-layer towers."""
    tokenizer = tok.build_clip_tokenizer(model_max_length=77)
    config = CLIPConfig(
        text_config=_clip_text(tokenizer, layers=2),
        vision_config=_vit(64, 8, layers=2),
        projection_dim=32,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    CLIPModel(config).save_pretrained(out)
    CLIPProcessor(image_processor, tokenizer).save_pretrained(out)  # type: ignore[no-untyped-call]


def build_siglip(out: Path) -> None:
    """SiglipModel: 64 px images, patch 8, 2-layer towers, SentencePiece tokenizer."""
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = tok.build_siglip_tokenizer(Path(workdir))
        text = _clip_text(tokenizer, layers=2)
        config = SiglipConfig(text_config=text, vision_config=_vit(64, 8, layers=2))
        image_processor = SiglipImageProcessorPil(size={"height": 64, "width": 64})
        SiglipModel(config).save_pretrained(out)
        SiglipProcessor(image_processor, tokenizer).save_pretrained(out)  # type: ignore[no-untyped-call]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("tiny-qwen2.5-vl", "policy", build_qwen2_5_vl),
        Recipe("tiny-qwen2-vl", "policy", build_qwen2_vl),
        Recipe("tiny-llava", "policy", build_llava),
        Recipe("tiny-grounding-dino", "grounding", build_grounding_dino),
        Recipe("tiny-owlv2", "grounding", build_owlv2),
        Recipe("tiny-clip", "clip", build_clip),
        Recipe("tiny-siglip", "clip", build_siglip),
    )
}


def sample_image(width: int = 112, height: int = 84) -> Image.Image:
    """A small deterministic RGB scene (coloured shapes on grey) to push through the models."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 10, height // 8, width // 2, height // 2), fill=(220, 30, 30))
    draw.ellipse((width // 2, height // 2, width - 4, height - 4), fill=(30, 60, 220))
    return image


def check_policy(path: Path) -> None:
    """Load through `load_policy`, generate from an image prompt, and round-trip every coordinate format."""
    # transformers types `generate`, features and post-processing loosely (nn.Module attributes).
    model: Any
    processor: Any
    model, processor = loading.load_policy(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[sample_image()], return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    if generated.shape[1] <= inputs["input_ids"].shape[1]:
        raise AssertionError(f"{path.name}: generate produced no tokens")
    for text in tok.iter_format_examples(3):
        # Without special tokens: Llama-style tokenizers prepend <s> to every text.
        decoded = processor.tokenizer.decode(processor.tokenizer.encode(text, add_special_tokens=False))
        if decoded != text:
            raise AssertionError(f"{path.name}: tokenizer does not round-trip {text!r}: {decoded!r}")


def check_grounding(path: Path) -> None:
    """Load through `load_grounding_model`, detect two phrases, post-process to pixel boxes."""
    model: Any
    processor: Any
    model, processor = loading.load_grounding_model(path)
    image = sample_image()
    target = [(image.height, image.width)]
    if model.config.model_type == "owlv2":
        inputs = processor(text=[["a red square", "a blue circle"]], images=image, return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs)
        results = processor.post_process_grounded_object_detection(
            outputs, threshold=0.0, target_sizes=target
        )
    else:
        inputs = processor(images=image, text="a red square. a blue circle.", return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs)
        results = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=target
        )
    if results[0]["boxes"].shape[-1] != 4:
        raise AssertionError(f"{path.name}: unexpected boxes {results[0]['boxes'].shape}")


def check_clip(path: Path) -> None:
    """Load through `load_clip` and embed one image and two texts into the same space."""
    model: Any
    processor: Any
    model, processor = loading.load_clip(path)
    # SigLIP was trained on texts padded to its full length, so always pad that way (CLIP does not mind).
    texts = ["a red square", "a blue circle"]
    inputs = processor(text=texts, images=sample_image(), padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_features = model.get_text_features(input_ids=inputs["input_ids"])
    image_emb = getattr(image_features, "pooler_output", image_features)
    text_emb = getattr(text_features, "pooler_output", text_features)
    if image_emb.shape[-1] != text_emb.shape[-1]:
        raise AssertionError(f"{path.name}: image {image_emb.shape} and text {text_emb.shape} disagree")


CHECKS: dict[Kind, Callable[[Path], None]] = {
    "policy": check_policy,
    "grounding": check_grounding,
    "clip": check_clip,
}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for a build without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build(name: str, out: Path, *, seed: int, check: bool = True) -> None:
    """Write tiny model `name` into the empty folder `out` (weights from `seed`), then optionally check it."""
    recipe = RECIPES[name]
    with _seeded(seed):
        recipe.build(out)
    if check:
        CHECKS[recipe.kind](out)
