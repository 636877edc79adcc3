"""The policy MLLM as a grounder (SPEC §2: "OWLv2 or the MLLM itself as alternatives").

For one region, every phrase becomes one greedy request to the policy on Triton (``spr_policy``,
through the describer's :class:`TritonPolicyClient`): the region crop resized to the family's frame,
and the family's grounding instruction ("Locate <phrase> in the image; answer with its box" in the
family's coordinate format). The answer is parsed with the family's own parser
(:func:`services.core.formats.parse`) and its boxes mapped from the frame to full-image pixels.

Batching: ``spr_policy`` reads one image and one instruction per request (row 0 of each tensor), so
N prompts cannot travel in one request. All phrases of a region are sent at once instead, and
Triton's dynamic batcher hands them to one ``execute()`` where requests with equal sampling share one
``generate()`` — so a region costs ``ceil(phrases / max_batch_size)`` generate calls.

Unparseable answers (random weights, a confused model) give that phrase no box and are counted in
``spr_localization_mllm_unparsed``; they are not errors. Triton failures are the describer's typed
errors (Triton down: POLICY_UNAVAILABLE, gRPC UNAVAILABLE, retried by the Kafka stage).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from services.common.errors import InvalidRequest
from services.core.boxes import Box, frame_to_image
from services.core.formats import parse
from services.describer.aio import EventLoopThread
from services.describer.families import ModelFamily, ResizeError
from services.describer.logic import encode_frame, wait_on_loop
from services.describer.triton_client import PolicyOutput, PolicyRequest, TritonPolicyClient
from services.evaluation.prompts import rec_instruction
from services.policy.sampling import Sampling
from services.scorers.localization import metrics
from services.scorers.localization.backends import Detection, GroundingOptions
from services.scorers.localization.settings import MllmGrounding

PHRASE_PLACEHOLDER = "{phrase}"
# Special-token markup a phrase can spell out as plain text: phrases come from model output, and a
# "<|image_pad|>" or "<image>" inside the prompt is taken by the processor for an image placeholder,
# which fails the whole request ("number of image tokens ... should be the same as the number of images").
_SPECIAL_MARKUP = re.compile(r"<\|[^<>|]*\|>|</?(?:image|video)>")


def grounding_template(family: ModelFamily, override: str = "") -> str:
    """The configured template, or the family's; it must contain ``{phrase}``."""
    # By default the REC instruction: grounding a phrase is referring-expression comprehension, and it is
    # what the evaluator asks and the bootstrap teaches (one wording per family, in one place).
    template = override or rec_instruction(PHRASE_PLACEHOLDER, family.coordinate_format)
    if PHRASE_PLACEHOLDER not in template:
        raise ValueError(f"the grounding template must contain {PHRASE_PLACEHOLDER}: {template!r}")
    return template


@dataclass(frozen=True)
class Frame:
    """What the model is shown for one region: the encoded frame and where it lies in the image."""

    image: bytes
    crop_box: Box  # full-image pixels of the crop
    width: int
    height: int


class MllmGrounder:
    """Grounds phrases with the policy MLLM served by Triton; thread-safe (one event loop thread)."""

    name = "mllm"

    def __init__(
        self,
        client: TritonPolicyClient,
        family: ModelFamily,
        settings: MllmGrounding,
        options: GroundingOptions,
        loop: EventLoopThread | None = None,
    ) -> None:
        self.client, self.family, self.settings, self.options = client, family, settings, options
        self.template = grounding_template(family, settings.template)
        self.sampling = Sampling(num_samples=1, greedy=True, max_new_tokens=settings.max_new_tokens)
        self._loop = loop or EventLoopThread("mllm-grounder")

    @classmethod
    def from_settings(cls, settings: MllmGrounding, options: GroundingOptions) -> MllmGrounder:
        """A grounder talking to the Triton of ``settings``."""
        client = TritonPolicyClient(
            settings.triton_url,
            settings.triton_model,
            retry=settings.retry,
            reconnect_backoff_s=settings.reconnect_backoff_s,
        )
        return cls(client, settings.model_family(), settings, options)

    def forward_passes(self, phrases: Sequence[str]) -> int:
        """``generate()`` calls on the policy: Triton batches up to ``max_batch_size`` requests."""
        return math.ceil(len(phrases) / self.settings.max_batch_size)

    def instruction(self, phrase: str) -> str:
        """The grounding prompt of one phrase, stripped of special-token markup (see _SPECIAL_MARKUP)."""
        return self.template.replace(PHRASE_PLACEHOLDER, " ".join(_SPECIAL_MARKUP.sub(" ", phrase).split()))

    def ground(
        self,
        image: Image.Image,
        offset: tuple[float, float],
        phrases: Sequence[str],
        deadline: float | None = None,
    ) -> list[list[Detection]]:
        """Detections per phrase in full-image pixels; [] for a phrase whose answer has no box."""
        if not phrases:
            return []
        frame = self.frame(image, offset)
        requests = [
            PolicyRequest(frame.image, self.instruction(p), self.sampling, self.settings.adapter)
            for p in phrases
        ]
        outputs = wait_on_loop(self._loop, self._generate_all(requests, deadline), deadline)
        return [self.detections(output, frame) for output in outputs]

    def frame(self, image: Image.Image, offset: tuple[float, float]) -> Frame:
        """The crop resized exactly as the family's processor would, encoded once for every phrase."""
        try:
            width, height = self.family.frame_size(image.width, image.height)
        except ResizeError as exc:
            raise InvalidRequest(f"the region cannot be shown to the policy: {exc}") from None
        left, top = offset
        crop_box = Box(left, top, left + image.width, top + image.height)
        return Frame(encode_frame(image, (width, height)), crop_box, width, height)

    async def _generate_all(
        self, requests: Sequence[PolicyRequest], deadline: float | None
    ) -> list[PolicyOutput]:
        # Sent together so that Triton's dynamic batcher puts them into one generate().
        return list(await asyncio.gather(*(self.client.generate(r, deadline) for r in requests)))

    def detections(self, output: PolicyOutput, frame: Frame) -> list[Detection]:
        """The boxes of the (single, greedy) answer in full-image pixels; counted when there is none."""
        text = output.texts[0] if output.texts else ""
        boxes = parse(text, self.family.coordinate_format, frame.width, frame.height).boxes
        if not boxes:
            metrics.MLLM_UNPARSED.inc()
            return []
        confidence = answer_confidence(output.token_logprobs[0] if output.token_logprobs else [])
        return [
            Detection(frame_to_image(box, frame.crop_box, frame.width, frame.height).as_tuple(), confidence)
            for box in boxes[: self.options.max_boxes_per_phrase]
        ]

    def close(self) -> None:
        """Close the Triton channel and stop the event loop thread."""
        wait_on_loop(self._loop, self.client.close(), None)
        self._loop.stop()


def answer_confidence(token_logprobs: Sequence[float]) -> float:
    """The geometric-mean token probability of the answer (the MLLM gives no box score of its own)."""
    finite = [lp for lp in token_logprobs if math.isfinite(lp)]
    return math.exp(sum(finite) / len(finite)) if finite else 0.0
