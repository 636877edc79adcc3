"""Serving benchmark: region descriptions through the Describer gRPC service and Triton versus the
same model called in-process, and adapter swap latency (publication to first response using it).

    python bench/bench_serving.py                       # tiny policy on CPU (a few minutes)
    python bench/bench_serving.py --device cuda --dtype bfloat16 --model PATH

Every figure is measured in this run on the same requests. The in-process baseline runs the same
describer logic (prepare -> generate -> parse and map boxes) with no transport, batched as Triton's
dynamic batcher can batch (`--concurrency` requests at a time) or one at a time, whichever is faster.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from peft import LoraConfig, get_peft_model
from PIL import Image

from services.adapters.events import announce_version, move_alias
from services.adapters.store import AdapterStore
from services.common.grpc_server import build_server, make_channel
from services.common.kafka_io import ProtoProducer
from services.core import read_coco
from services.describer.logic import Describer, PreparedRegion
from services.describer.servicer import register_with
from services.describer.settings import DescriberSettings, SamplingDefaults, processor_config_of
from services.describer.triton_client import PolicyOutput, build_inputs
from services.devstack.broker import BrokerProcess
from services.devstack.process import free_port, log_tail
from services.devstack.triton import TritonServer
from services.modelzoo.loading import load_policy
from services.modelzoo.tiny import ensure_model
from services.policy.runner import GenerationRequest, PolicyRunner
from services.sampler.regions import iter_regions
from services.world import generate_world
from spr.v1 import adapters_pb2, describer_pb2, describer_pb2_grpc

REPOSITORY = Path(__file__).resolve().parents[1] / "services" / "policy" / "model_repository"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-qwen2.5-vl", help="tiny model name or a model folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=32, help="region requests per measured pass")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (= in-process batch)")
    parser.add_argument("--samples", type=int, default=8, help="N descriptions per region")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=10, help="adapter publications to time")
    parser.add_argument("--passes", type=int, default=2, help="measured passes per path (best is kept)")
    parser.add_argument(
        "--no-single",
        action="store_true",
        help="skip the one-request-at-a-time baseline (slow on big models)",
    )
    return parser.parse_args()


# -- the workload: real regions of the synthetic world -------------------------------------------
def region_requests(
    work: Path, count: int, args: argparse.Namespace
) -> list[describer_pb2.DescribeRegionRequest]:
    world = generate_world(work / "world", count, seed=11)
    dataset = read_coco(world, world.parent, dataset_id="bench")
    return [
        describer_pb2.DescribeRegionRequest(
            image_uri=region.image.uri,
            region=region.box,
            object_refs=region.members,
            prompt_mode=describer_pb2.PROMPT_MODE_CROP_WITH_REFS,
            region_id=region.region_id,
        )
        for region in list(iter_regions(dataset, seed=0))[:count]
    ]


def describer_settings(model_path: str, triton_url: str, args: argparse.Namespace) -> DescriberSettings:
    return DescriberSettings(
        port=0,
        metrics_port=0,
        max_workers=max(8, 2 * args.concurrency),
        triton_url=triton_url,
        policy_model_id=model_path,
        processor_config=processor_config_of(Path(model_path)),
        sampling=SamplingDefaults(num_samples=args.samples, max_new_tokens=args.max_new_tokens),
    )


# -- in-process baseline: the same describer logic, no transport ---------------------------------
def in_process_pass(
    runner: PolicyRunner, describer: Describer, prepared: list[PreparedRegion], batch: int
) -> float:
    """Seconds to describe every region in batches of `batch`: decode, generate, parse and map."""
    start = time.perf_counter()
    for i in range(0, len(prepared), batch):
        chunk = prepared[i : i + batch]
        requests = [
            GenerationRequest(
                Image.open(io.BytesIO(p.policy_request.image)).convert("RGB"),
                p.instruction,
                p.policy_request.sampling,
            )
            for p in chunk
        ]
        for p, result in zip(chunk, runner.generate(requests), strict=True):
            describer.build(p, PolicyOutput(result.texts, result.token_logprobs, result.adapter_version))
    return time.perf_counter() - start


def measure_in_process(
    model_path: str, describer: Describer, prepared: list[PreparedRegion], args: argparse.Namespace
) -> tuple[float, float]:
    """Best-of-2 seconds batched by `concurrency`, and one request at a time."""
    runner = PolicyRunner(model_path, device=args.device, dtype=None if args.dtype == "auto" else args.dtype)
    in_process_pass(runner, describer, prepared[: args.concurrency], args.concurrency)  # warm-up
    batched = best_of(args.passes, lambda: in_process_pass(runner, describer, prepared, args.concurrency))
    if args.no_single:
        return batched, float("inf")
    single = best_of(args.passes, lambda: in_process_pass(runner, describer, prepared, 1))
    return batched, single


# -- through Triton, and through the Describer in front of it ------------------------------------
def triton_pass(url: str, prepared: list[PreparedRegion], concurrency: int) -> float:
    """Seconds for every policy request sent straight to Triton with `concurrency` in flight."""
    local = threading.local()

    def one(p: PreparedRegion) -> None:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(url)
        local.client.infer("spr_policy", build_inputs(p.policy_request))

    return timed_pool(one, prepared, concurrency)


def describer_pass(port: int, requests: list[describer_pb2.DescribeRegionRequest], concurrency: int) -> float:
    """Seconds for every DescribeRegion call over loopback gRPC with `concurrency` in flight."""
    local = threading.local()

    def one(request: describer_pb2.DescribeRegionRequest) -> None:
        if not hasattr(local, "stub"):
            local.stub = describer_pb2_grpc.DescriberStub(make_channel(f"127.0.0.1:{port}"))
        responses = list(local.stub.DescribeRegion(request, timeout=600))
        assert responses, "a region came back with no candidate"

    return timed_pool(one, requests, concurrency)


def timed_pool(work: Callable[[object], None], items: list, concurrency: int) -> float:  # type: ignore[type-arg]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(work, items))
    return time.perf_counter() - start


# -- adapter swap latency -----------------------------------------------------------------------
class RandomAdapters:
    """LoRA adapters with random weights for the policy (what a trainer would publish, minus training)."""

    def __init__(self, model_path: str, device: str) -> None:
        self.base, _ = load_policy(model_path, device=device)

    def make(self, out: Path, seed: int) -> Path:
        torch.manual_seed(seed)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(self.base, config)
        peft_model.save_pretrained(out)
        self.base = peft_model.unload()  # back to the untouched base for the next one
        return out


def swap_latencies(
    port: int,
    broker: BrokerProcess,
    store: AdapterStore,
    model_path: str,
    work: Path,
    probe: describer_pb2.DescribeRegionRequest,
    args: argparse.Namespace,
) -> list[float]:
    """For each swap: publish + announce + move `latest`, then call the Describer with adapter="latest"."""
    stub = describer_pb2_grpc.DescriberStub(make_channel(f"127.0.0.1:{port}"))
    request = describer_pb2.DescribeRegionRequest()
    request.CopyFrom(probe)
    request.adapter = "latest"
    request.sampling.num_samples, request.sampling.max_new_tokens = 1, 1
    latencies: list[float] = []
    if args.swaps == 0:
        return latencies
    adapters = RandomAdapters(model_path, args.device)
    with ProtoProducer(broker.settings()) as producer:
        for k in range(args.swaps):
            folder = adapters.make(work / f"adapter-{k}", seed=100 + k)
            manifest = store.publish(folder, adapters_pb2.AdapterManifest(base_model_id=model_path), k + 1)
            start = time.perf_counter()
            announce_version(producer, manifest)
            move_alias(producer, "latest", manifest.version, reason="bench")
            while (
                next(iter(stub.DescribeRegion(request, timeout=60))).lineage.adapter_version
                != manifest.version
            ):
                pass
            latencies.append(time.perf_counter() - start)
    return latencies


def triton_average_batch(triton: TritonServer) -> float:
    """Requests per model execution so far: how well Triton's dynamic batcher filled batches."""
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(name + "{") and 'model="spr_policy"' in line:
                values[name] = float(line.rsplit(" ", 1)[1])
    return values.get("nv_inference_count", 0.0) / max(values.get("nv_inference_exec_count", 1.0), 1.0)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def best_of(passes: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(passes))


def policy_environment(
    model_path: str, store: AdapterStore, broker: BrokerProcess, args: argparse.Namespace
) -> None:
    """How one-machine mode configures the Triton model: SPR_POLICY_* variables."""
    api = broker.settings().api_version
    os.environ.update(
        SPR_POLICY_MODEL_PATH=model_path,
        SPR_POLICY_BASE_MODEL_ID=model_path,
        SPR_POLICY_DEVICE=args.device,
        SPR_POLICY_DTYPE=args.dtype,
        SPR_POLICY_ADAPTER_STORE=str(store.root),
        SPR_POLICY_KAFKA_BOOTSTRAP=broker.bootstrap_servers,
        SPR_POLICY_KAFKA_API_VERSION=".".join(map(str, api)) if api else "",
    )


def main() -> None:
    args = parse_args()
    model_path = args.model if os.path.isdir(args.model) else str(ensure_model(args.model))
    work = Path(tempfile.mkdtemp(prefix="spr-bench-serving-"))
    store = AdapterStore(work / "store")
    requests = region_requests(work, args.requests, args)
    offline = Describer(describer_settings(model_path, f"127.0.0.1:{free_port()}", args))
    prepared = [offline.prepare(r) for r in requests]
    t_batched, t_single = measure_in_process(model_path, offline, prepared, args)
    offline.close()
    candidates = len(requests) * args.samples
    print(f"in-process (batch {args.concurrency}) measured: {t_batched:.2f} s", flush=True)

    with BrokerProcess("noida", workdir=work / "broker") as broker:
        policy_environment(model_path, store, broker, args)
        with TritonServer(REPOSITORY, workdir=work / "triton", models=["spr_policy"]) as triton:
            settings = describer_settings(model_path, triton.grpc_url, args)
            describer = Describer(settings)
            server = build_server(settings, register_with(describer))
            server.start()
            try:
                triton_pass(triton.grpc_url, prepared[: args.concurrency], args.concurrency)  # warm-up
            except Exception:
                print(log_tail(triton.log_path, 60), flush=True)  # why the model failed, from Triton itself
                raise
            describer_pass(server.port, requests[: args.concurrency], args.concurrency)
            t_triton = best_of(args.passes, lambda: triton_pass(triton.grpc_url, prepared, args.concurrency))
            t_describer = best_of(
                args.passes, lambda: describer_pass(server.port, requests, args.concurrency)
            )
            batch_size = triton_average_batch(triton)
            swaps = swap_latencies(server.port, broker, store, model_path, work, requests[0], args)
            server.stop(grace=0)
            describer.close()

    t_local = min(t_batched, t_single)
    rate = lambda seconds: f"{candidates / seconds:9.1f} candidates/s  ({seconds:.2f} s)"  # noqa: E731
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device={device} dtype={args.dtype} model={model_path}")
    shape = f"N={args.samples} concurrency={args.concurrency} max_new_tokens={args.max_new_tokens}"
    print(f"regions={len(requests)} {shape}")
    print(f"in-process, batch {args.concurrency:<3d}: {rate(t_batched)}")
    if not args.no_single:
        print(f"in-process, batch 1  : {rate(t_single)}")
    print(f"Triton gRPC          : {rate(t_triton)}")
    print(f"Describer gRPC+Triton: {rate(t_describer)}")
    print(f"Triton requests per model execution (dynamic batching): {batch_size:.2f}")
    print(f"ratio Describer(gRPC+Triton) / best in-process: {t_local / t_describer:.3f}  (goal >= 0.9)")
    print(f"ratio Triton alone / best in-process:           {t_local / t_triton:.3f}")
    p50, p95 = statistics.median(swaps) * 1000, percentile(swaps, 95) * 1000
    print(
        f"adapter swap latency, publication -> first Describer response on it, {len(swaps)} swaps: "
        f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max(swaps) * 1000:.0f} ms  (goal p50 < 1000 ms)"
    )
    print("perf_analyzer: not run (PyPI serves only a 0.1.0 placeholder of `perf-analyzer`)")


if __name__ == "__main__":
    main()
