"""Production loaders for the models SPR runs: the policy MLLM, the grounding model and the CLIP-style model.

Every service (serving, scorers, trainer) and every test loads models through these functions, from a hub
id or a local folder written by `save_pretrained`, through the transformers Auto classes:

- `load_policy`: Qwen2.5-VL / Qwen2-VL (any `AutoModelForImageTextToText` with a Qwen-style processor);
- `load_grounding_model`: Grounding DINO, OWLv2 (`AutoModelForZeroShotObjectDetection`);
- `load_clip`: CLIP, SigLIP (`AutoModel` with `get_image_features` / `get_text_features`).

Environment rules applied here (SPEC section 5):

- Image processors are always the PIL ("slow") ones, requested with `use_fast=False`: torchvision has
  no CPU build for this torch, and the same preprocessing on CPU and GPU machines keeps serving, scoring
  and training consistent. (`backend="pil"` is the transformers-5 spelling, but processors forward
  `backend` to the tokenizer too, where it overwrites the tokenizer's own `backend` attribute.)
- Processors that carry a video processor (Qwen-VL) are built without one: video processors need
  torchvision, and SPR only sends images.
- dtype defaults to bfloat16 on CUDA and float32 elsewhere.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name
from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE
from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME
from transformers.utils.hub import cached_file

log = logging.getLogger(__name__)

ModelAndProcessor = tuple[PreTrainedModel, ProcessorMixin]

# Keeps the image processors on their PIL implementation (see the module docstring).
_PIL_IMAGE_PROCESSOR: dict[str, Any] = {"use_fast": False}
# Prefix of the image-only processor classes made by `image_only_processor_class`, and those classes.
_IMAGE_ONLY_PREFIX = "ImageOnly"
_IMAGE_ONLY_CLASSES: dict[type[ProcessorMixin], type[ProcessorMixin]] = {}


def resolve_device(device: str | torch.device) -> torch.device:
    """`"cpu"`, `"cuda"`, `"cuda:1"` or a `torch.device`; fails early when CUDA is asked for but absent."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """`dtype` (a `torch.dtype` or its name, e.g. `"bfloat16"`), else bf16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def _load_model(
    auto_class: Any,
    model_id_or_path: str | Path,
    device: str | torch.device,
    dtype: torch.dtype | str | None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load weights straight onto `device` in `dtype`, in eval mode."""
    target = resolve_device(device)
    model: PreTrainedModel = auto_class.from_pretrained(
        str(model_id_or_path),
        dtype=resolve_dtype(dtype, target),
        device_map=target,
        **kwargs,
    )
    model.eval()  # type: ignore[no-untyped-call]
    return model


def image_only_processor_class(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of `processor_class` whose constructor takes no video processor.

    `ProcessorMixin` finds a processor's parts from its `__init__` signature and type-checks each one,
    and the video-processor base class only exists when torchvision is installed, so the stock Qwen-VL
    processors cannot be built here at all. Dropping the parameter from the signature drops the part.

    The subclass keeps the parent's `__name__`, so whatever it saves (`processor_config.json`,
    `tokenizer_config.json`) names the standard class and loads anywhere; its `__qualname__` is
    resolvable from this module, so instances pickle (e.g. into `datasets` workers).
    """

    def __init__(
        self: ProcessorMixin,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        processor_class.__init__(  # type: ignore[no-untyped-call]
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    if processor_class not in _IMAGE_ONLY_CLASSES:  # one class per parent, so isinstance and pickle agree
        qualname = _IMAGE_ONLY_PREFIX + processor_class.__name__
        namespace = {"__init__": __init__, "__module__": __name__, "__qualname__": qualname}
        _IMAGE_ONLY_CLASSES[processor_class] = type(processor_class.__name__, (processor_class,), namespace)
    return _IMAGE_ONLY_CLASSES[processor_class]


if not TYPE_CHECKING:  # hidden from mypy, which would otherwise accept any name imported from here

    def __getattr__(name: str) -> type[ProcessorMixin]:
        """Resolve `ImageOnly<Processor>` qualnames: unpickling an image-only processor asks for them."""
        base = name.removeprefix(_IMAGE_ONLY_PREFIX)
        if base != name and isinstance(getattr(transformers, base, None), type):
            return image_only_processor_class(getattr(transformers, base))
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _saved_processor_class(model_id_or_path: str, **kwargs: Any) -> str | None:
    """The processor class a checkpoint names in its processor, preprocessor or tokenizer config, if any."""
    for filename in (PROCESSOR_NAME, IMAGE_PROCESSOR_NAME, TOKENIZER_CONFIG_FILE):
        resolved = cached_file(
            model_id_or_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **kwargs,
        )
        if resolved is not None:
            name = json.loads(Path(resolved).read_text(encoding="utf-8")).get("processor_class")
            if isinstance(name, str):
                return name
    return None


def policy_processor_class(model_id_or_path: str | Path, **kwargs: Any) -> type[ProcessorMixin]:
    """The processor class of a policy checkpoint (or of a folder holding only its processor).

    Resolved like `AutoProcessor` does: the class the saved configs name, else the one registered for
    the model type. Classes with a video processor come back as their image-only variant.
    """
    name = _saved_processor_class(str(model_id_or_path), **kwargs)
    if name is not None:
        processor_class = cast(type[ProcessorMixin], processor_class_from_name(name))
    else:
        config = AutoConfig.from_pretrained(str(model_id_or_path), **kwargs)
        processor_class = cast(type[ProcessorMixin], PROCESSOR_MAPPING[type(config)])
    if "video_processor" in processor_class.get_attributes():  # type: ignore[no-untyped-call]
        processor_class = image_only_processor_class(processor_class)
    return processor_class


def load_policy_processor(model_id_or_path: str | Path, **kwargs: Any) -> ProcessorMixin:
    """The policy's processor (PIL image processor, tokenizer, chat template), without a video processor.

    `kwargs` go to `from_pretrained` (e.g. `revision`, or `min_pixels` / `max_pixels` overrides).
    """
    hub = {key: kwargs[key] for key in ("revision",) if key in kwargs}
    processor_class = policy_processor_class(model_id_or_path, **hub)
    processor: ProcessorMixin = processor_class.from_pretrained(
        str(model_id_or_path), **_PIL_IMAGE_PROCESSOR, **kwargs
    )
    return processor


def load_processor(model_id_or_path: str | Path, **kwargs: Any) -> ProcessorMixin:
    """A processor through `AutoProcessor`, with the PIL image processor."""
    processor: ProcessorMixin = AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
        str(model_id_or_path), **_PIL_IMAGE_PROCESSOR, **kwargs
    )
    return processor


def load_policy(
    model_id_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> ModelAndProcessor:
    """Load the policy MLLM (Qwen2.5-VL, Qwen2-VL) and its processor.

    `attn_implementation` is passed through (e.g. `"sdpa"`, `"flash_attention_2"`); None lets
    transformers choose.
    """
    extra: dict[str, Any] = {"revision": revision} if revision else {}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    model = _load_model(AutoModelForImageTextToText, model_id_or_path, device, dtype, **extra)
    processor = load_policy_processor(model_id_or_path, **({"revision": revision} if revision else {}))
    log.info("loaded policy %s (%s) on %s as %s", model_id_or_path, type(model).__name__, device, model.dtype)
    return model, processor


def load_grounding_model(
    model_id_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    revision: str | None = None,
) -> ModelAndProcessor:
    """Load an open-vocabulary detector (Grounding DINO, OWLv2) and its processor."""
    extra: dict[str, Any] = {"revision": revision} if revision else {}
    model = _load_model(AutoModelForZeroShotObjectDetection, model_id_or_path, device, dtype, **extra)
    processor = load_processor(model_id_or_path, **extra)
    log.info("loaded grounding model %s (%s) on %s", model_id_or_path, type(model).__name__, device)
    return model, processor


def load_clip(
    model_id_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    revision: str | None = None,
) -> ModelAndProcessor:
    """Load an image-text dual encoder (CLIP, SigLIP) and its processor."""
    extra: dict[str, Any] = {"revision": revision} if revision else {}
    model = _load_model(AutoModel, model_id_or_path, device, dtype, **extra)
    processor = load_processor(model_id_or_path, **extra)
    log.info("loaded image-text model %s (%s) on %s", model_id_or_path, type(model).__name__, device)
    return model, processor
