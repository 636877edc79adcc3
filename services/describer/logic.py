"""The Describer core: region in, N parsed candidates out. No transport code beyond protobuf messages.

One description, step by step (SPEC §2 "Prompting" and "Parsing"):

1. validate the request (template known, N under the cap, sampling sane);
2. load the image (size/pixel limits, decompression bombs) and check the region against it;
3. cut the frame the model will see — the region crop, or the whole image — at integer pixel bounds
   and resize it exactly as the family's processor would (:mod:`services.describer.families`);
4. build the instruction (object references, or the region box in the family's own format);
5. call the policy on Triton (deadline propagated, retries per policy);
6. parse every text in the family's format and map its boxes from the frame to full-image pixels.

Synchronous callers (gRPC handler threads, the Kafka stage) use :meth:`Describer.describe`; the Triton
call runs on a shared event loop thread. Async callers can use :meth:`Describer.prepare`,
:meth:`Describer.generate` and :meth:`Describer.build` directly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import math
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from PIL import Image

from services.common.errors import InvalidRequest
from services.common.images import box_to_pixels, decode_image, read_image_bytes, verify_sha256
from services.core.boxes import Box, image_to_frame
from services.core.formats import Mention, mentions_to_image, parse
from services.core.ids import stable_id
from services.describer import metrics
from services.describer.aio import EventLoopThread
from services.describer.errors import PolicyTimeout, RequestCancelled, TemplateUnknown, TooManySamples
from services.describer.families import (
    ModelFamily,
    PromptKind,
    PromptTemplate,
    ResizeError,
    object_references,
)
from services.describer.settings import DescriberSettings
from services.describer.triton_client import PolicyOutput, PolicyRequest, TritonPolicyClient
from services.policy.sampling import Sampling
from spr.v1 import common_pb2, describer_pb2

#: Extra wait beyond the deadline for the Triton task to report its own timeout before we give up.
_RESULT_GRACE_S = 1.0
_MAX_SEED = 2**63 - 1  # Triton's SEED is INT64
_T = TypeVar("_T")

#: Registers a cancel function to run when the caller goes away (e.g. ``context.add_callback``).
OnCancel = Callable[[Callable[[], None]], object]


@dataclass(frozen=True)
class PreparedRegion:
    """A validated request, turned into what the policy receives and what parsing needs back."""

    region_id: str
    template: PromptTemplate
    instruction: str
    crop_box: Box  # full-image pixels of the frame's source: the crop, or the whole image
    frame_width: int
    frame_height: int
    policy_request: PolicyRequest


@dataclass(frozen=True)
class Description:
    """Every candidate of one region with the lineage that produced them."""

    prepared: PreparedRegion
    candidates: list[describer_pb2.Candidate]
    lineage: common_pb2.Lineage

    def responses(self) -> Iterator[describer_pb2.DescribeRegionResponse]:
        """One streamed response per candidate, each naming its lineage."""
        for candidate in self.candidates:
            yield describer_pb2.DescribeRegionResponse(candidate=candidate, lineage=self.lineage)


def code_version() -> str:
    """The installed version of this project (recorded in the lineage)."""
    try:
        return version("spr-online")
    except PackageNotFoundError:
        return "unknown"


class Describer:
    """Describes regions with the policy model on Triton; thread-safe, one per process."""

    def __init__(
        self,
        settings: DescriberSettings,
        client: TritonPolicyClient | None = None,
        loop: EventLoopThread | None = None,
    ) -> None:
        self.settings = settings
        self.family: ModelFamily = settings.family()
        self.client = client or TritonPolicyClient(
            settings.triton_url,
            settings.model_name,
            model_version=settings.model_version,
            retry=settings.retry,
            ssl=settings.triton_ssl,
            reconnect_backoff_s=settings.triton_reconnect_backoff_s,
        )
        self._loop = loop or EventLoopThread("describer-triton")
        self._code_version = code_version()

    # --- the whole pipeline, for synchronous callers ----------------------------------------------

    def describe(
        self,
        request: describer_pb2.DescribeRegionRequest,
        *,
        deadline: float | None = None,
        on_cancel: OnCancel | None = None,
        expected_sha256: str = "",
        source: str = metrics.SOURCE_GRPC,
    ) -> Description:
        """Describe one region; ``deadline`` is a ``time.monotonic()`` instant. Raises SprError."""
        started = time.monotonic()
        outcome = "error"
        try:
            prepared = self.prepare(request, expected_sha256=expected_sha256)
            output = self._wait(self.generate(prepared, deadline), deadline, on_cancel)
            description = self.build(prepared, output)
            outcome = "ok"
            return description
        finally:
            metrics.REQUESTS.labels(source, outcome).inc()
            metrics.REQUEST_SECONDS.labels(source).observe(time.monotonic() - started)

    def describe_region_record(
        self, region: common_pb2.Region, *, deadline: float | None = None
    ) -> describer_pb2.DescriptionRecord:
        """The Kafka stage's unit of work: a sampled region -> its ``descriptions`` record.

        The image is read from ``region.image.uri`` (and checked against its sha256 when given); the
        object references are the region's members; the prompt mode rotates per region id among
        ``stage.prompt_modes`` so that prompts are diversified but a replay picks the same one.
        """
        kind = self.stage_prompt_kind(region)
        request = describer_pb2.DescribeRegionRequest(
            image_uri=region.image.uri,
            region=region.box,
            object_refs=region.members,
            prompt_mode=kind.proto,
            adapter=self.settings.stage.adapter,
            region_id=region.region_id,
        )
        description = self.describe(
            request, deadline=deadline, expected_sha256=region.image.sha256, source=metrics.SOURCE_KAFKA
        )
        lineage = common_pb2.Lineage()
        lineage.CopyFrom(description.lineage)
        lineage.sampler_version = region.sampler_version
        prepared = description.prepared
        return describer_pb2.DescriptionRecord(
            region=region,
            candidates=description.candidates,
            lineage=lineage,
            prompt_mode=prepared.template.kind.proto,
            prompt=prepared.instruction,
            crop_box=_box_proto(prepared.crop_box),
            frame_width=prepared.frame_width,
            frame_height=prepared.frame_height,
        )

    def stage_prompt_kind(self, region: common_pb2.Region) -> PromptKind:
        """The stage's prompt mode for ``region``: stable per region id; CROP when refs would be empty."""
        modes = self.settings.stage.prompt_modes
        kind = modes[int(stable_id("prompt-mode", region.region_id), 16) % len(modes)]
        if kind is PromptKind.CROP_REFS and not object_references(m.category for m in region.members):
            return PromptKind.CROP
        return kind

    def close(self) -> None:
        """Close the Triton channel and stop the event loop thread."""
        # Shutting down regardless: a stuck close must not block it.
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self._loop.submit(self.client.close()).result(timeout=5.0)
        self._loop.stop()

    # --- step 1-4: validation, image, frame, instruction ------------------------------------------

    def prepare(
        self, request: describer_pb2.DescribeRegionRequest, *, expected_sha256: str = ""
    ) -> PreparedRegion:
        """Validate and build the policy request; raises the specific SprError of any bad input."""
        template = self._template(request)
        sampling = self._sampling(request.sampling)
        if not request.HasField("region"):
            raise InvalidRequest("region is required")
        data = self._image_bytes(request)
        if expected_sha256:
            verify_sha256(data, expected_sha256)
        image = decode_image(data, self.settings.images)
        bounds = box_to_pixels(request.region, image.width, image.height)  # REGION_* errors
        region = _box(request.region).clip(image.width, image.height)
        crop_box, source = self._source(template.kind, image, bounds)
        frame_w, frame_h = self._frame_size(source)
        instruction = self._instruction(template, request, region, crop_box, (frame_w, frame_h))
        return PreparedRegion(
            region_id=request.region_id or _generated_region_id(data, region),
            template=template,
            instruction=instruction,
            crop_box=crop_box,
            frame_width=frame_w,
            frame_height=frame_h,
            policy_request=PolicyRequest(
                image=self._encode(source, frame_w, frame_h),
                instruction=instruction,
                sampling=sampling,
                adapter=request.adapter,
            ),
        )

    @staticmethod
    def _source(
        kind: PromptKind, image: Image.Image, bounds: tuple[int, int, int, int]
    ) -> tuple[Box, Image.Image]:
        """What the model is shown, and where it lies in the full image.

        The crop is cut at integer pixel bounds (every pixel the region touches), and those bounds,
        not the fractional region, are the offset that maps the model's boxes back.
        """
        if kind.crops:
            return Box(*map(float, bounds)), image.crop(bounds)
        return Box(0.0, 0.0, float(image.width), float(image.height)), image

    def _instruction(
        self,
        template: PromptTemplate,
        request: describer_pb2.DescribeRegionRequest,
        region: Box,
        crop_box: Box,
        frame: tuple[int, int],
    ) -> str:
        refs = object_references(o.category for o in request.object_refs)
        if template.kind is PromptKind.CROP_REFS and not refs:
            raise InvalidRequest(f"template {template.template_id} needs object_refs with categories")
        box_markup = ""
        if template.kind is PromptKind.FULL_BOX:
            in_frame = image_to_frame(region, crop_box, *frame)
            box_markup = self.family.render_region(in_frame, *frame)
        return template.render(refs=refs, box=box_markup)

    def _template(self, request: describer_pb2.DescribeRegionRequest) -> PromptTemplate:
        kind = PromptKind.from_proto(request.prompt_mode)
        if kind is None and request.prompt_mode != describer_pb2.PROMPT_MODE_UNSPECIFIED:
            raise InvalidRequest(f"unknown prompt_mode {int(request.prompt_mode)}")
        if not request.template_id:
            return self.family.template(kind=kind or self.settings.default_prompt_mode)
        try:
            template = self.family.template(request.template_id)
        except KeyError as exc:
            raise TemplateUnknown(str(exc.args[0])) from None
        if kind is not None and template.kind is not kind:
            raise InvalidRequest(
                f"template {template.template_id} is a {template.kind.value} template, "
                f"but prompt_mode asks for {kind.value}"
            )
        return template

    def _sampling(self, params: common_pb2.SamplingParams) -> Sampling:
        """PolicyRequest sampling fields; proto3 zeros mean "the configured default"."""
        defaults, cap = self.settings.sampling, self.settings.max_num_samples
        num_samples = params.num_samples or defaults.num_samples
        if num_samples < 0:
            raise InvalidRequest(f"sampling.num_samples must be positive, got {num_samples}")
        if num_samples > cap:
            raise TooManySamples(f"sampling.num_samples {num_samples} is above the cap of {cap}")
        if not math.isfinite(params.temperature) or params.temperature < 0:
            raise InvalidRequest(f"sampling.temperature must be >= 0, got {params.temperature}")
        if not math.isfinite(params.top_p) or not 0 <= params.top_p <= 1:
            raise InvalidRequest(f"sampling.top_p must be in [0, 1], got {params.top_p}")
        limit = self.settings.max_generation_length
        if not 0 <= params.max_new_tokens <= limit:
            raise InvalidRequest(
                f"sampling.max_new_tokens must be in [0, {limit}], got {params.max_new_tokens}"
            )
        return Sampling(
            num_samples=num_samples,
            temperature=params.temperature or defaults.temperature,
            top_p=params.top_p or defaults.top_p,
            max_new_tokens=params.max_new_tokens or defaults.max_new_tokens,
            # 0 = unseeded: requests without a seed share sampling parameters, so Triton batches them.
            seed=(params.seed & _MAX_SEED) or None,
            greedy=params.greedy,
        )

    def _image_bytes(self, request: describer_pb2.DescribeRegionRequest) -> bytes:
        which = request.WhichOneof("image")
        if which == "image_bytes":
            return request.image_bytes
        if which == "image_uri" and request.image_uri:
            return read_image_bytes(request.image_uri, self.settings.images)
        raise InvalidRequest("one of image_bytes or image_uri is required")

    def _frame_size(self, source: Image.Image) -> tuple[int, int]:
        try:
            return self.family.frame_size(source.width, source.height)
        except ResizeError as exc:
            raise InvalidRequest(str(exc)) from None

    def _encode(self, source: Image.Image, frame_w: int, frame_h: int) -> bytes:
        return encode_frame(source, (frame_w, frame_h), self.settings.image_format)

    # --- step 5: the policy call -------------------------------------------------------------------

    async def generate(self, prepared: PreparedRegion, deadline: float | None = None) -> PolicyOutput:
        """Call the policy on Triton (must run on the loop that owns the client)."""
        return await self.client.generate(prepared.policy_request, deadline)

    def _wait(
        self,
        coro: Coroutine[Any, Any, PolicyOutput],
        deadline: float | None,
        on_cancel: OnCancel | None,
    ) -> PolicyOutput:
        return wait_on_loop(self._loop, coro, deadline, on_cancel)

    def failure_record(
        self, region: common_pb2.Region, error: common_pb2.ErrorInfo
    ) -> describer_pb2.DescriptionRecord:
        """The Kafka record of a region this describer could not describe: no candidates, the error,
        and the lineage it would have had (run id, model), so the pair builder's decision keeps it."""
        lineage = self._lineage()
        lineage.sampler_version = region.sampler_version
        return describer_pb2.DescriptionRecord(region=region, lineage=lineage, error=error)

    def _lineage(self, adapter_version: str = "", template_id: str = "") -> common_pb2.Lineage:
        """This describer's part of a record's lineage."""
        return common_pb2.Lineage(
            policy_model_id=self.settings.policy_model_id,
            adapter_version=adapter_version,
            prompt_template_id=template_id,
            run_id=self.settings.run_id,
            code_version=self._code_version,
        )

    # --- step 6: parsing into candidates -----------------------------------------------------------

    def build(self, prepared: PreparedRegion, output: PolicyOutput) -> Description:
        """Candidates with mentions in full-image pixels, and the lineage of the call."""
        lineage = self._lineage(output.adapter_version, prepared.template.template_id)
        candidates = [
            self._candidate(prepared, output, index, lineage.adapter_version)
            for index in range(len(output.texts))
        ]
        return Description(prepared=prepared, candidates=candidates, lineage=lineage)

    def _candidate(
        self, prepared: PreparedRegion, output: PolicyOutput, index: int, adapter_version: str
    ) -> describer_pb2.Candidate:
        fmt = self.family.coordinate_format
        text = output.texts[index]
        frame_w, frame_h = prepared.frame_width, prepared.frame_height
        parsed = parse(text, fmt, frame_w, frame_h)
        mentions = mentions_to_image(parsed.mentions, prepared.crop_box, frame_w, frame_h)
        metrics.CANDIDATES.labels(str(any(m.box is not None for m in mentions)).lower()).inc()
        if parsed.warnings:
            metrics.PARSE_WARNINGS.labels(fmt.value).inc(len(parsed.warnings))
        return describer_pb2.Candidate(
            # The same text of the same request always gets the same id; a region described twice (a
            # stage crashed before its commit, and sampling drew other texts) gets other ids, so the
            # pair builder can never join one description's scores with the other's candidates.
            candidate_id=stable_id(
                prepared.region_id, adapter_version, prepared.template.template_id, index, text
            ),
            sample_index=index,
            text=text,
            mentions=[mention_proto(m) for m in mentions],
            token_logprobs=output.token_logprobs[index] if index < len(output.token_logprobs) else [],
            coordinate_format=fmt.value,
            parse_warnings=parsed.warnings,
        )


def encode_frame(source: Image.Image, size: tuple[int, int], image_format: str = "PNG") -> bytes:
    """``source`` resized to the model's frame ``size`` (as its processor would) and encoded for Triton."""
    frame = source
    if source.size != size:
        frame = source.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if image_format == "JPEG":
        frame.save(buffer, "JPEG", quality=95)
    else:
        frame.save(buffer, "PNG", compress_level=1)  # lossless; level 1 is several times faster than 6
    return buffer.getvalue()


def wait_on_loop(
    loop: EventLoopThread,
    coro: Coroutine[Any, Any, _T],
    deadline: float | None,
    on_cancel: OnCancel | None = None,
) -> _T:
    """Run a policy coroutine on ``loop`` for a synchronous caller, bounded by ``deadline``.

    Raises PolicyTimeout when the deadline (plus a grace for Triton's own timeout) passes, and
    RequestCancelled when ``on_cancel``'s callback cancelled it.
    """
    future = loop.submit(coro)
    if on_cancel is not None:

        def cancel() -> None:
            future.cancel()  # a no-op once the call finished

        on_cancel(cancel)
    timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0) + _RESULT_GRACE_S
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise PolicyTimeout("the request deadline passed while the policy model was generating") from None
    except concurrent.futures.CancelledError:
        raise RequestCancelled("the request was cancelled while the policy model was generating") from None


# --- helpers ------------------------------------------------------------------------------------------


def _box(box: common_pb2.Box) -> Box:
    return Box(box.x1, box.y1, box.x2, box.y2)


def _box_proto(box: Box) -> common_pb2.Box:
    return common_pb2.Box(x1=box.x1, y1=box.y1, x2=box.x2, y2=box.y2)


def mention_proto(mention: Mention) -> common_pb2.Mention:
    proto = common_pb2.Mention(phrase=mention.phrase, has_box=mention.box is not None)
    if mention.box is not None:
        proto.box.CopyFrom(_box_proto(mention.box))
    if mention.span is not None:
        proto.char_start, proto.char_end = mention.span
    return proto


def _generated_region_id(image_data: bytes, region: Box) -> str:
    """A deterministic id for requests without one: same image and box, same id."""
    digest = hashlib.sha256(image_data).hexdigest()
    return stable_id("region", digest, *(repr(v) for v in region.as_tuple()))
