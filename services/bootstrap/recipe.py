"""The bootstrap policy: a small LLaVA-1.5 / Ferret-architecture MLLM built from scratch for the world.

Why LLaVA rather than Qwen-VL for the from-scratch policy: SPEC §6 found that a tiny Qwen2-VL, whose
vision tower and language model see positions only through rotary embeddings, cannot read *where* an
object is without extra modules (coordinate channels, token re-normalisation). LLaVA's CLIP vision tower
adds learned absolute position embeddings to every patch, so patch features carry their location with
the stock architecture; it is also the architecture of Ferret, the model of the SPR paper, and writes
boxes as `[x1, y1, x2, y2]` in 0-999 bins. It is saved with `save_pretrained` and loaded by the
production loader (`services.modelzoo.loading.load_policy`), so serving, the trainer and the evaluator
run exactly what was trained.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import (
    CLIPImageProcessorPil,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from services.modelzoo import tokenizer as tok
from services.modelzoo.recipes import LLAVA_CHAT_TEMPLATE

BINS = 1000  # BRACKET_999 numbers 0..999


@dataclass(frozen=True)
class PolicyRecipe:
    """Model sizes and SFT settings of one bootstrap policy (everything its fingerprint covers)."""

    name: str = "spr-policy-llava"
    image_size: int = 96
    patch_size: int = 16  # 96 px -> 6 x 6 = 36 image tokens
    vision_width: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    # Std of the 2D sin-cos values the vision position embeddings start from (0: transformers' default
    # init, std 0.02). The default init leaves position ~17x weaker than patch content (std ~0.35 on
    # this world), so every patch looks alike after the first LayerNorm and the model cannot tell where
    # anything is (SPEC §6); starting positions at the content's scale makes them visible from step 0.
    position_init_std: float = 0.35
    # Box numbers 0-999 as whole tokens (one classification per coordinate instead of three digits)
    # and Gaussian soft labels over them in SFT, sigma in bins (96 px = 999 bins). SPEC §6's ~1.5 px
    # (15 bins) makes each example teach only the few numbers next to its target; ~5 px (50 bins) lets
    # every example move its neighbours too, and the argmax still lands on the mode. Measured with
    # `number_init` below (2026-11-28, 1000 held-out expressions, paired): see there.
    number_tokens: bool = True
    coordinate_sigma_bins: float = 50.0
    # Start the number tokens' input and output embeddings from 1D sin-cos codes of their value (periods
    # from 10 bins to twice the range), so that nearby numbers start alike: a box learned at one place
    # generalises to its neighbours from step 0 instead of each of the 1000 numbers being learned alone.
    # Writing out the box it has found is what the policy learns slowest: on one-object training
    # scenes the old recipe reached only 20 % Acc@0.5. Measured on the same pretrained tower and SFT
    # (750 steps; held-out Acc@0.5 / 0.6 / 0.7, paired differences to the old recipe 4.2 / 1.8 / 0.5):
    # sigma 50 alone 5.3 (+1.1 [-0.5, +2.7]); number_init alone 6.2 (+2.0 [+0.4, +3.6]), one-object
    # training scenes 31 %; both 8.9 / 3.7 / 1.4 (+4.7 [+2.8, +6.8], +1.9 [+0.6, +3.3], +0.9 [+0.1, +1.8]).
    # (Without the vision pretraining, when the policy ignored the image, it had shown no gain.)
    number_init: bool = True
    # SFT answers' boxes drawn loose: every side moved out by this share of the box's size (clipped to
    # the frame), in REC and description answers alike; the world's annotations, the scorers' models and
    # every evaluation keep the exact boxes. An experiment on whether a *systematic* localization error
    # (loose boxes, as real MLLMs learn from loosely drawn web-scale labels) is one the loop corrects,
    # where the random spread of the number tokens was not (README, #7). Measured 2026-11-29 with 0.15
    # (`spr-main --bootstrap-box-slack 0.15`, default run): the policy learned part of it (REC boxes
    # with IoU >= 0.3: median side 1.20x the GT's, 1.10x with exact labels); the rounds tightened the
    # described boxes (IoU >= 0.7: 14.5 -> 24.0 %, +9.4 [+0.2, +18.3]) but not the REC answers (1.17x,
    # 1.22x), and REC Acc@0.5 fell as before (6.3 base; -1.1 [-2.5, +0.3], -1.1 [-2.8, +0.5]).
    box_label_slack: float = 0.0
    # REC answers in SFT name the target before its box ("red striped circle [x1, y1, x2, y2]"), written
    # exactly as a description writes a mention (Ferret's REC answers name the object too), so that
    # both tasks write a box in the same context, after the object's phrase; the evaluator reads the
    # first box either way. False: the box alone. Measured 2026-11-29 with box_label_slack 0.15 in a
    # default run: base REC fell to 4.1 % Acc@0.5 (6.3 without it); round 1 tightened the described
    # boxes (IoU >= 0.7 +6.2 [-2.5, +14.9]) but REC answers again did not follow (Acc@0.5 -0.4, -0.8,
    # CIs across 0; REC box side 1.22x the GT's before and 1.24x after), so it stays off.
    rec_answer_names_object: bool = False
    # Dense grounding pretraining of the vision tower before SFT (`services.bootstrap.vision_pretrain`):
    # each patch learns the box and attributes of the object under it. Without it the policy ignored the
    # image for the whole SFT (loss unchanged with the images shuffled); with it, 250 SFT steps on
    # one-object scenes reached 20 % Acc@0.5 instead of 0 (~0.13 s a step on 2 cores).
    vision_pretrain_steps: int = 1000
    vision_pretrain_batch_size: int = 64
    vision_pretrain_learning_rate: float = 2e-3
    # Keep the pretrained tower frozen during SFT, as LLaVA-1.5 does: the language model's early, random
    # gradients would otherwise wash out what the tower learned before the model can use it.
    freeze_vision: bool = True
    # SFT
    # ~0.58 s a step of 48 on 2 cores (0.79 before a batch's rows were run in length-sorted parts,
    # 2026-11-29): 750 steps plus the vision pretraining kept the bootstrap near 9 minutes.
    # Without the vision pretraining, 1500 steps were no better than 750 (1.9-2.5 % Acc@0.5, both at the
    # box prior); with it, 750 steps reach 3.2-4.2 % on 1000 held-out expressions and use the image,
    # 8.9 % with number_init and sigma 50, still climbing (1.2 % at step 250, 5.4 % at 500).
    # 2000 steps (26 min, 2026-11-29): base 8.6 % (7.6 % at 750 on the same machine), and the loop's
    # adapters from it averaged +0.7 points of Acc@0.5 (six, one CI clear of 0) where the 750-step
    # base's lost 0.6-3.0 (README, #7); the SFT step is compute-bound (~110 GFLOP/s), so the
    # 30-minute fresh-install goal cannot hold 2000. 1100 steps fit it (base 9.2 %) but their rounds
    # lost REC (-1.2, -1.6). (Those figures are of batches of 48.)
    # Batches of 16 (2026-11-29): 2250 steps see the same 36k examples as 750 of 48 in ~8 minutes
    # (~0.21 s a step, 479 s against ~430) and fit them better (final loss 1.511 against 1.566): base
    # 8.3 / 4.1 / 1.3 % Acc@0.5 / 0.6 / 0.7 (5.7 / 2.2 / 0.6 for 750 of 48 on the same machine), and the
    # loop's first round from it stopped losing REC: +0.4, +0.4, +0.1 in three runs (round 2: -0.4, -0.3,
    # -0.9), where every run from 750 of 48 lost 0.6-3.7 in round 1 (README, #7).
    steps: int = 2250
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    rec_share: float = 0.6  # share of REC batches; the rest are region descriptions with boxes
    seed: int = 0
    # the world it is trained on
    world_seed: int = 0
    world_images: int = 2000
    world_max_objects: int = 5
    # Extra one-object training scenes (held-out scenes are drawn without them; `generate_world`): where
    # an object is, before telling look-alikes apart. Measured together with the vision pretraining.
    world_single_object_share: float = 0.3
    test_fraction: float = 0.3

    def fingerprint(self, extra: str = "") -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        digest.update(extra.encode())
        return digest.hexdigest()[:12]

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_processor(recipe: PolicyRecipe) -> Any:
    """LLaVA-1.5 processor: the image stretched to a square (bins stay relative to the whole image)."""
    square = {"height": recipe.image_size, "width": recipe.image_size}
    image_processor = CLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False)
    tokenizer = tok.build_llama_tokenizer()
    if recipe.number_tokens:
        # Added (not special) tokens: matched whole before BPE, decoded verbatim, kept by save_pretrained.
        tokenizer.add_tokens([AddedToken(str(v), normalized=False) for v in range(BINS)])
    return LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=recipe.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" drops
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=tok.LLAVA_IMAGE_TOKEN,
    )


def build_model(recipe: PolicyRecipe, processor: Any) -> LlavaForConditionalGeneration:
    """Fresh random weights (seeded by the caller) of the recipe's LLaVA configuration."""
    tokenizer = processor.tokenizer
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    text = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": recipe.text_width,
        "intermediate_size": recipe.text_width * 3,
        "num_hidden_layers": recipe.text_layers,
        "num_attention_heads": recipe.text_heads,
        "num_key_value_heads": recipe.text_heads,
        "max_position_embeddings": 512,
        **ids,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": recipe.vision_width,
        "intermediate_size": recipe.vision_width * 2,
        "num_hidden_layers": recipe.vision_layers,
        "num_attention_heads": recipe.vision_heads,
        "image_size": recipe.image_size,
        "patch_size": recipe.patch_size,
    }
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(tok.LLAVA_IMAGE_TOKEN),
        image_seq_length=recipe.image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    if recipe.position_init_std > 0:
        _init_positions(model, recipe)
    if recipe.number_tokens and recipe.number_init:
        _init_numbers(model, tokenizer, recipe.text_width, model.config.get_text_config().initializer_range)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"]
    )
    return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2D sin-cos position codes (MAE style): half the channels code y, half x."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coordinate in (ys.reshape(-1), xs.reshape(-1)):
        angles = coordinate[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    codes = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(codes, (0, dim - codes.shape[1])).float()


def _init_positions(model: LlavaForConditionalGeneration, recipe: PolicyRecipe) -> None:
    """Start the CLIP position embeddings (CLS row 0, then patches row-major) from scaled sin-cos codes."""
    grid = recipe.image_size // recipe.patch_size
    codes = sincos_2d(grid, recipe.vision_width)
    codes = codes / codes.std() * recipe.position_init_std
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        weight[0].zero_()
        weight[1:] = codes


def sincos_1d(
    values: torch.Tensor, dim: int, shortest: float = 10.0, longest: float = 2.0 * BINS
) -> torch.Tensor:
    """(len(values), dim) sin-cos codes with periods spaced geometrically from `shortest` to `longest`:
    the dot product of two codes falls smoothly with the distance of their values."""
    half = dim // 2
    periods = shortest * (longest / shortest) ** (torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    angles = values.double()[:, None] * (2 * math.pi / periods)[None, :]
    codes = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(codes, (0, dim - codes.shape[1])).float()


def _init_numbers(model: LlavaForConditionalGeneration, tokenizer: Any, width: int, std: float) -> None:
    """Number tokens' input and output embedding rows from their values' sin-cos codes, at the std of
    the default init (so they stay on the scale of every other token)."""
    ids = torch.tensor(tokenizer.convert_tokens_to_ids([str(v) for v in range(BINS)]))
    codes = sincos_1d(torch.arange(BINS), width)
    codes = codes / codes.std() * std
    embeddings: list[torch.nn.Module] = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():
        for embedding in embeddings:
            weight: torch.Tensor = getattr(embedding, "weight")  # noqa: B009 (typed: Module attrs are unions)
            weight[ids] = codes


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
