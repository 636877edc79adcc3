"""The scorers' own input preparation equals the transformers code it replaces: OWLv2's resize as two
sparse band products (scipy blur + zoom), SigLIP's tokenizer as one batched sentencepiece call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from services.modelzoo.loading import load_processor
from services.scorers.preprocess import PixelPreprocessor, owlv2_axis_operator
from services.scorers.semantic.backends import load_torch_encoder

# (height, width): tiny, single-row/column, square, nearly square, the sample crop both ways, large
SHAPES = [(1, 1), (1, 7), (5, 1), (2, 3), (30, 100), (96, 96), (97, 95), (120, 170), (170, 120), (300, 220)]
# Output sides: the tiny model's own (96), a real model's 960 (upscaling), and a strong downscale.
SIZES = [96, 960, 7]


def _reference(processor: object, image: Image.Image, size: int) -> np.ndarray:
    out = processor(  # type: ignore[operator]
        images=image,
        size={"height": size, "width": size},
        input_data_format="channels_last",  # tiny images are ambiguous (e.g. 3 x 1) without it
        return_tensors="np",
    )["pixel_values"]
    return np.asarray(out)


@pytest.mark.parametrize("size", SIZES)
def test_owlv2_preprocessing_equals_the_transformers_processor(
    size: int, tiny_models: dict[str, Path]
) -> None:
    processor = load_processor(tiny_models["tiny-owlv2"]).image_processor
    ours = PixelPreprocessor.of(processor)
    rng = np.random.default_rng(size)
    for height, width in SHAPES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        got = ours([image], size)
        assert got.shape == (1, 3, size, size) and got.dtype == np.float32
        # float32 rounding only: the processor rounds after each scipy pass, we after each product.
        np.testing.assert_allclose(got, _reference(processor, image, size), atol=2e-6, rtol=0)


@pytest.mark.parametrize(("length", "side", "size"), [(170, 170, 96), (120, 170, 96), (3, 5, 96), (1, 1, 9)])
def test_owlv2_axis_operator_is_scipys_blur_then_zoom_on_the_padded_axis(
    length: int, side: int, size: int
) -> None:
    factor = side / size
    sigma = max(0.0, (factor - 1.0) / 2.0)
    basis = np.eye(side)[:, :length]  # column k: the padded axis with a single 1 at sample k < length
    blurred = ndimage.gaussian_filter1d(basis, sigma, axis=0, mode="mirror") if sigma > 1e-15 else basis
    zoomed = ndimage.zoom(blurred, (1 / factor, 1), order=1, mode="mirror", grid_mode=True)
    np.testing.assert_allclose(owlv2_axis_operator(length, side, size).toarray(), zoomed, atol=1e-7)


TEXTS = [
    "A red circle left of a blue square.",
    "Sample 0.",
    "",
    " ",
    "\u2581",
    "a\u2581b",
    "HELLO, World!!",
    "tabs\tand\nnewlines  x",
    "ünïcödé café – “quotes” 日本語",
    "word " * 80,  # truncated
    "it's 3.5 m (approx.)",
    "   leading and trailing   ",
    "a<b>c",
]


def test_siglip_token_ids_equal_the_transformers_tokenizer(tiny_models: dict[str, Path]) -> None:
    encoder = load_torch_encoder(tiny_models["tiny-siglip"], "cpu")
    assert encoder.fast_ids is not None
    ours = encoder.fast_ids(TEXTS, encoder.text_length)
    assert ours is not None
    theirs = encoder.tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=encoder.text_length, return_tensors="np"
    )
    for name in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[name], theirs[name])
    # Added tokens in the text: the transformers path, which splits on them.
    assert encoder.fast_ids(["a </s> b"], encoder.text_length) is None
    feed = encoder.text_feed(["a </s> b"])
    expected = encoder.tokenizer(
        ["a </s> b"],
        padding="max_length",
        truncation=True,
        max_length=encoder.text_length,
        return_tensors="np",
    )
    np.testing.assert_array_equal(feed["input_ids"], expected["input_ids"])


def test_clip_keeps_the_transformers_tokenizer(tiny_models: dict[str, Path]) -> None:
    assert load_torch_encoder(tiny_models["tiny-clip"], "cpu").fast_ids is None
