"""Triton python-backend adapter for the policy MLLM: tensors in, `PolicyRunner` call, tensors out.

Errors are returned per request (the rest of the batch is served) with a message that starts with
a stable code the describer maps to a gRPC status: `INVALID_ARGUMENT: ...`, `ADAPTER_NOT_FOUND: ...`.
Resident adapters, aliases, load times and requests per adapter are Triton custom metrics, so
they appear on Triton's own /metrics endpoint next to its inference metrics.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

# Triton's python stub embeds the interpreter without reading PYTHONPATH; honour it, so that the
# project also loads from a source checkout or a `pip install --target` directory.
sys.path.extend(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path)

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from services.adapters.store import AdapterStore
from services.common.kafka_io import KafkaSettings
from services.policy.adapters import AdapterNotFound
from services.policy.follower import AdapterFollower
from services.policy.runner import (
    GenerationRequest,
    GenerationResult,
    PolicyRunner,
    Sampling,
    decode_image,
)

SETTINGS = (
    "model_path",
    "base_model_id",
    "device",
    "dtype",
    "max_num_samples",
    "adapter_store",
    "max_resident_adapters",
    "kafka_bootstrap",
    "kafka_api_version",
)


def _settings(model_config: dict[str, Any]) -> dict[str, str]:
    """config.pbtxt parameters, overridden by SPR_POLICY_<NAME> environment variables."""
    params = model_config.get("parameters", {})
    return {
        key: os.environ.get(f"SPR_POLICY_{key.upper()}") or str(params.get(key, {}).get("string_value", ""))
        for key in SETTINGS
    }


def _scalar(request: Any, name: str, default: Any) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _error(code: str, message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{code}: {message}"))


class RequestError(ValueError):
    pass


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        cfg = _settings(json.loads(args["model_config"]))
        if not cfg["model_path"]:
            raise ValueError("spr_policy: set SPR_POLICY_MODEL_PATH (or the model_path parameter)")
        self.max_num_samples = int(cfg["max_num_samples"] or 32)
        store = AdapterStore(cfg["adapter_store"]) if cfg["adapter_store"] else None
        self.runner = PolicyRunner(
            cfg["model_path"],
            device=cfg["device"] or "cpu",
            dtype=None if cfg["dtype"] in ("", "auto") else cfg["dtype"],
            adapter_store=store,
            base_model_id=cfg["base_model_id"] or None,
            max_resident_adapters=int(cfg["max_resident_adapters"] or 4),
        )
        self._init_metrics()
        self.follower = self._start_follower(cfg)
        pb_utils.Logger.log_info(
            f"spr_policy: {cfg['model_path']} on {self.runner.device}, {torch.get_num_threads()} threads"
        )

    def _start_follower(self, cfg: dict[str, str]) -> AdapterFollower | None:
        if not cfg["kafka_bootstrap"]:
            return None
        api_version = cfg["kafka_api_version"]
        kafka = KafkaSettings(
            bootstrap_servers=cfg["kafka_bootstrap"],
            client_id="spr-policy",
            api_version=tuple(int(p) for p in api_version.split(".")) if api_version else None,
        )
        follower = AdapterFollower(self.runner.adapters, kafka, on_change=self._publish_adapter_metrics)
        return follower.start()

    def _init_metrics(self) -> None:
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.m_resident = pb_utils.MetricFamily(
            "spr_policy_adapter_resident", "1 while a version is loaded", gauge
        )
        self.m_alias = pb_utils.MetricFamily(
            "spr_policy_adapter_alias", "1 for the version an alias names", gauge
        )
        self.m_load = pb_utils.MetricFamily("spr_policy_adapter_load_seconds", "adapter load time", gauge)
        self.m_requests = pb_utils.MetricFamily(
            "spr_policy_adapter_requests_total", "requests per adapter", counter
        )
        self._metric_cache: dict[tuple[int, str], Any] = {}
        self._metrics_lock = threading.RLock()
        self._published_revision = -1

    def _metric(self, family: Any, labels: dict[str, str]) -> Any:
        key = (id(family), json.dumps(labels, sort_keys=True))
        with self._metrics_lock:  # the follower thread refreshes gauges while execute() counts
            if key not in self._metric_cache:
                self._metric_cache[key] = family.Metric(labels=labels)
            return self._metric_cache[key]

    def _publish_adapter_metrics(self) -> None:
        """Refresh the residency and alias gauges, only when the registry changed since last time.

        Called from execute() (on-demand loads) and from the follower thread, hence the lock.
        """
        with self._metrics_lock:
            revision = (
                self.runner.adapters.revision
            )  # read first: a change racing with us is caught next time
            if revision == self._published_revision:
                return
            self._published_revision = revision
            aliases, resident = self.runner.adapters.snapshot()
            for (fid, _labels), metric in self._metric_cache.items():
                if fid in (id(self.m_resident), id(self.m_alias)):
                    metric.set(0)
            for version, stats in resident.items():
                self._metric(self.m_resident, {"version": version}).set(1)
                self._metric(self.m_load, {"version": version}).set(stats.load_seconds)
            for alias, version in aliases.items():
                self._metric(self.m_alias, {"alias": alias, "version": version}).set(1)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        accepted: list[tuple[int, GenerationRequest, str]] = []
        for i, request in enumerate(requests):
            try:
                parsed = self._parse(request)
                accepted.append((i, parsed, self.runner.adapters.resolve(parsed.adapter)))
            except RequestError as exc:
                responses[i] = _error("INVALID_ARGUMENT", str(exc))
            except AdapterNotFound as exc:
                responses[i] = _error("ADAPTER_NOT_FOUND", str(exc))
        if accepted:
            results = self.runner.generate([a[1] for a in accepted], versions=[a[2] for a in accepted])
            for (i, _, version), result in zip(accepted, results, strict=True):
                responses[i] = self._response(result)
                self._metric(self.m_requests, {"version": version or "base"}).increment(1)
            self._publish_adapter_metrics()
        return responses

    def _parse(self, request: Any) -> GenerationRequest:
        seed = int(_scalar(request, "SEED", -1))
        sampling = Sampling(
            num_samples=int(_scalar(request, "NUM_SAMPLES", 1)),
            temperature=float(_scalar(request, "TEMPERATURE", 1.0)),
            top_p=float(_scalar(request, "TOP_P", 0.9)),
            max_new_tokens=int(_scalar(request, "MAX_NEW_TOKENS", 64)),
            seed=None if seed < 0 else seed,
            greedy=bool(_scalar(request, "GREEDY", False)),
        )
        if not 1 <= sampling.num_samples <= self.max_num_samples:
            raise RequestError(
                f"NUM_SAMPLES must be in [1, {self.max_num_samples}], got {sampling.num_samples}"
            )
        if not sampling.greedy and not (sampling.temperature > 0 and 0 < sampling.top_p <= 1):
            raise RequestError("TEMPERATURE must be > 0 and TOP_P in (0, 1] when sampling")
        image_bytes = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1).tobytes()
        try:
            image = decode_image(image_bytes)
        except Exception as exc:  # PIL raises many types for corrupt data
            raise RequestError(f"IMAGE is not a decodable image: {exc}") from exc
        return GenerationRequest(
            image=image,
            instruction=_text(_scalar(request, "INSTRUCTION", b"")),
            sampling=sampling,
            adapter=_text(_scalar(request, "ADAPTER", b"")),
        )

    def _response(self, result: GenerationResult) -> Any:
        width = max((len(lp) for lp in result.token_logprobs), default=0)
        logprobs = np.zeros((len(result.texts), width), dtype=np.float32)
        for row, lp in enumerate(result.token_logprobs):
            logprobs[row, : len(lp)] = lp
        # Leading axis of 1: the batch dimension that max_batch_size > 0 gives every tensor.
        texts = np.array([[t.encode("utf-8") for t in result.texts]], dtype=np.object_)
        num_tokens = np.array([[len(lp) for lp in result.token_logprobs]], dtype=np.int32)
        version = np.array([[result.adapter_version.encode("utf-8")]], dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("TEXT", texts),
                pb_utils.Tensor("TOKEN_LOGPROBS", logprobs[None]),
                pb_utils.Tensor("NUM_TOKENS", num_tokens),
                pb_utils.Tensor("ADAPTER_VERSION", version),
            ]
        )

    def finalize(self) -> None:
        if self.follower is not None:
            self.follower.stop()
