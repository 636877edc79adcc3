"""Sample region descriptions from the policy MLLM. Knows nothing of Triton or gRPC.

The Triton python backend (`model_repository/spr_policy/1/model.py`) is a thin adapter around
`PolicyRunner`; benchmarks and tests call the same class in-process, so "Triton vs in-process"
compares transports, not two implementations.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from services.adapters.store import AdapterStore
from services.core.formats import strip_media_placeholders
from services.modelzoo.loading import load_policy
from services.policy.adapters import BASE, AdapterRegistry
from services.policy.sampling import Sampling

__all__ = ["GenerationRequest", "GenerationResult", "PolicyRunner", "Sampling", "chat_prompt"]


@dataclass
class GenerationRequest:
    image: Image.Image
    instruction: str
    sampling: Sampling = field(default_factory=Sampling)
    adapter: str = BASE  # version, alias, or "" for the base model


@dataclass
class GenerationResult:
    texts: list[str]
    token_logprobs: list[list[float]]  # log-probability of every generated token, per sample
    adapter_version: str = BASE  # the version that actually produced the texts


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (PNG/JPEG/...) to RGB; the caller has already size-checked them."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class PolicyRunner:
    """Loads the policy once and answers batches of generation requests."""

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        adapter_store: AdapterStore | None = None,
        base_model_id: str | None = None,
        max_resident_adapters: int = 4,
    ) -> None:
        model: Any
        model, self.processor = load_policy(model_path, device=device, dtype=dtype)
        model.eval()
        self.device = device
        self.base_model_id = base_model_id or model_path
        self.adapters = AdapterRegistry(model, adapter_store, self.base_model_id, max_resident_adapters)
        # Left padding so that every row of a batch ends where generation starts.
        self.processor.tokenizer.padding_side = "left"

    def build_prompt(self, instruction: str) -> str:
        return chat_prompt(self.processor, instruction)

    def resolve_adapters(self, requests: list[GenerationRequest]) -> list[str]:
        """The version each request will use; raises AdapterNotFound for an unknown one."""
        return [self.adapters.resolve(r.adapter) for r in requests]

    def generate(
        self, requests: list[GenerationRequest], versions: list[str] | None = None
    ) -> list[GenerationResult]:
        """Generate for many requests; requests with equal adapter and sampling share one batched call.

        `versions` are the already-resolved adapter versions (see `resolve_adapters`); resolving
        first lets a caller reject only the requests with unknown adapters.
        """
        versions = versions if versions is not None else self.resolve_adapters(requests)
        results: dict[int, GenerationResult] = {}
        for (version, sampling), indices in _group(requests, versions).items():
            batch = [requests[i] for i in indices]
            for i, result in zip(indices, self._generate_batch(batch, sampling, version), strict=True):
                results[i] = result
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _generate_batch(
        self, batch: list[GenerationRequest], sampling: Sampling, version: str
    ) -> list[GenerationResult]:
        inputs = self.processor(
            text=[self.build_prompt(r.instruction) for r in batch],
            images=[r.image for r in batch],
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        with self.adapters.active(version) as model:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = model.generate(
                **inputs,
                **_generation_kwargs(sampling),
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
            logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            eos_ids = _eos_ids(model.generation_config.eos_token_id)
        self.adapters.count_request(version, len(batch))
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        if sampling.greedy:  # one deterministic decode per request, repeated N times
            new_tokens = new_tokens.repeat_interleave(sampling.num_samples, dim=0)
            logprobs = logprobs.repeat_interleave(sampling.num_samples, dim=0)
        results = self._split_per_request(new_tokens, logprobs, len(batch), sampling.num_samples, eos_ids)
        for result in results:
            result.adapter_version = version
        return results

    def _split_per_request(
        self, new_tokens: torch.Tensor, logprobs: torch.Tensor, batch_size: int, n: int, eos_ids: set[int]
    ) -> list[GenerationResult]:
        pad_id = self.processor.tokenizer.pad_token_id
        results = []
        for b in range(batch_size):
            texts, lps = [], []
            for row in range(b * n, (b + 1) * n):
                length = _generated_length(new_tokens[row].tolist(), eos_ids, pad_id)
                texts.append(
                    self.processor.tokenizer.decode(new_tokens[row, :length], skip_special_tokens=False)
                )
                lps.append([float(v) for v in logprobs[row, :length]])
            results.append(
                GenerationResult(texts=[_strip_special(t, self.processor) for t in texts], token_logprobs=lps)
            )
        return results


def chat_prompt(processor: Any, instruction: str) -> str:
    """One user turn holding the image then the instruction, in the processor's own chat template."""
    messages: Any = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt: str = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def _group(requests: list[GenerationRequest], versions: list[str]) -> dict[tuple[str, Sampling], list[int]]:
    groups: dict[tuple[str, Sampling], list[int]] = {}
    for i, (request, version) in enumerate(zip(requests, versions, strict=True)):
        groups.setdefault((version, request.sampling), []).append(i)
    return groups


def _generation_kwargs(sampling: Sampling) -> dict[str, Any]:
    if sampling.greedy:
        return {"do_sample": False, "num_return_sequences": 1, "max_new_tokens": sampling.max_new_tokens}
    return {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": 0,
        "num_return_sequences": sampling.num_samples,
        "max_new_tokens": sampling.max_new_tokens,
    }


def _eos_ids(eos: int | list[int] | None) -> set[int]:
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def _generated_length(tokens: list[int], eos_ids: set[int], pad_id: int | None) -> int:
    """Tokens up to (excluding) the first end-of-sequence or padding token."""
    for i, token in enumerate(tokens):
        if token in eos_ids or token == pad_id:
            return i
    return len(tokens)


def _strip_special(text: str, processor: Any) -> str:
    """Drop chat-control tokens and media placeholders but keep the grounding tokens (<|box_start|> ...)
    the parsers need."""
    for token in ("<|im_end|>", "<|endoftext|>", processor.tokenizer.pad_token or ""):
        if token:
            text = text.replace(token, "")
    return strip_media_placeholders(text).strip()
