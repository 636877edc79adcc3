"""`spr-rec-eval`: REC Acc@{0.5..0.9} of a policy and its adapter versions, with paired bootstrap CIs.

    spr-rec-eval --model POLICY --data world/rec_test.json
    spr-rec-eval --model POLICY --data refcoco/ --image-root coco/train2014 --split testA \\
                 --store ADAPTER_STORE --adapter spr-v1-... --adapter latest --out results/

The base model (adapters disabled) is always scored first; every `--adapter` (a version or alias of the
adapter store) is compared with it. Generation is greedy and batched through `PolicyRunner`, the code
serving runs. Prints the table, writes `rec_accuracy.png` (accuracy against IoU threshold, one line per
adapter) and `rec_results.json` (every prediction) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.adapters.store import AdapterStore
from services.core.boxes import Box
from services.core.formats import CoordinateFormat
from services.describer.families import SmartResize
from services.evaluation.datasets import RecSample, read_any
from services.evaluation.plot import plot_accuracy
from services.evaluation.rec import (
    THRESHOLDS,
    AdapterResult,
    FrameOf,
    Generate,
    Prediction,
    accuracy_at,
    format_table,
    predict,
)
from services.policy.adapters import BASE
from services.policy.runner import GenerationRequest, PolicyRunner, Sampling

# model_type -> how that family writes boxes
FORMATS: dict[str, CoordinateFormat] = {
    "qwen2_5_vl": CoordinateFormat.QWEN25_JSON,
    "qwen2_vl": CoordinateFormat.QWEN2_TOKENS,
    "llava": CoordinateFormat.BRACKET_999,
}


def coordinate_format(model: Any) -> CoordinateFormat:
    model_type = model.config.model_type
    if model_type not in FORMATS:
        raise ValueError(
            f"no REC coordinate format known for model type {model_type!r}; known: {', '.join(FORMATS)}"
        )
    return FORMATS[model_type]


def frame_function(processor: Any, fmt: CoordinateFormat) -> FrameOf:
    """The frame the model sees: Qwen-VL's smart resize for absolute pixels; bins are relative to any."""
    if fmt is not CoordinateFormat.QWEN25_JSON:
        return lambda width, height: (width, height)
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    resize = SmartResize(
        factor=ip.patch_size * ip.merge_size,
        min_pixels=getattr(ip, "min_pixels", None) or size["shortest_edge"],
        max_pixels=getattr(ip, "max_pixels", None) or size["longest_edge"],
    )
    return resize.frame_size


def runner_generate(runner: PolicyRunner, adapter: str, max_new_tokens: int) -> Generate:
    sampling = Sampling(num_samples=1, greedy=True, max_new_tokens=max_new_tokens)

    def generate(images: list[Any], instructions: list[str]) -> list[str]:
        requests = [
            GenerationRequest(i, t, sampling, adapter) for i, t in zip(images, instructions, strict=True)
        ]
        return [result.texts[0] for result in runner.generate(requests)]

    return generate


def evaluate_one(
    runner: PolicyRunner,
    samples: Sequence[RecSample],
    adapter: str,
    name: str,
    batch_size: int = 32,
    max_new_tokens: int = 32,
) -> AdapterResult:
    """One adapter (``BASE`` = adapters disabled) on the samples, greedy and batched, with progress."""
    fmt = coordinate_format(runner.adapters.model)
    frame_of = frame_function(runner.processor, fmt)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(
            f"\r[spr-rec-eval] {name}: {done}/{total} ({time.perf_counter() - started:.0f}s)",
            end="",
            flush=True,
        )

    generate = runner_generate(runner, adapter, max_new_tokens)
    predictions = predict(samples, generate, fmt, frame_of, batch_size, progress)
    print(flush=True)
    return AdapterResult(name, predictions)


def evaluate(
    runner: PolicyRunner,
    samples: Sequence[RecSample],
    adapters: Sequence[str] = (),
    batch_size: int = 32,
    max_new_tokens: int = 32,
) -> list[AdapterResult]:
    """The base model, then every adapter, on the same samples (so differences are paired)."""
    return [
        evaluate_one(runner, samples, adapter, adapter or "base", batch_size, max_new_tokens)
        for adapter in [BASE, *adapters]
    ]


def write_outputs(results: Sequence[AdapterResult], out: Path, title: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    curves = {r.name: accuracy_at(r.ious()) for r in results}
    png = plot_accuracy(curves, out / "rec_accuracy.png", title)
    document = {
        "thresholds": list(THRESHOLDS),
        "accuracy": {name: {str(t): v for t, v in curve.items()} for name, curve in curves.items()},
        "predictions": {
            r.name: [
                {**asdict(p), "box": None if p.box is None else list(p.box.as_tuple())} for p in r.predictions
            ]
            for r in results
        },
    }
    path = out / "rec_results.json"
    path.write_text(json.dumps(document, indent=1))
    return png, path


def read_outputs(path: Path) -> list[AdapterResult]:
    """The results :func:`write_outputs` wrote to ``rec_results.json``, in the same order."""
    document = json.loads(path.read_text())
    return [
        AdapterResult(
            name,
            [
                Prediction(p["sample_id"], p["text"], None if p["box"] is None else Box(*p["box"]), p["iou"])
                for p in predictions
            ],
        )
        for name, predictions in document["predictions"].items()
    ]


def evaluate_paths(
    model: Path,
    data: Sequence[Path],
    *,
    limit: int = 0,
    adapters: Sequence[str] = (),
    store: Path | None = None,
    out: Path | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 48,
    device: str = "cpu",
    read_options: dict[str, Any] | None = None,
) -> list[AdapterResult]:
    """Read the data, score the base and every adapter, print the table, write the plot and results."""
    samples = [s for path in data for s in read_any(path, **(read_options or {}))]
    if limit:
        samples = samples[:limit]
    if not samples:
        raise SystemExit("spr-rec-eval: no samples to evaluate")
    runner = PolicyRunner(str(model), device=device, adapter_store=AdapterStore(store) if store else None)
    results = evaluate(runner, samples, adapters, batch_size, max_new_tokens)
    print(format_table(results))
    if out is not None:
        png, path = write_outputs(
            results, out, f"REC on {', '.join(p.name for p in data)} (n={len(samples)})"
        )
        print(f"plot\t{png}\nresults\t{path}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spr-rec-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="policy folder or hub id")
    parser.add_argument(
        "--data", type=Path, action="append", required=True, help="spr-rec JSON, refer or Flickr30k folder"
    )
    parser.add_argument("--image-root", type=Path, help="images of a refer / Flickr30k dataset")
    parser.add_argument("--split", default="test", help="refer split (test, testA, testB, val)")
    parser.add_argument("--store", type=Path, help="adapter store (needed for --adapter)")
    parser.add_argument(
        "--adapter", action="append", default=[], help="adapter version or alias to compare with base"
    )
    parser.add_argument("--limit", type=int, default=0, help="only the first N samples")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("rec-eval"), help="folder for the plot and results")
    args = parser.parse_args(argv)
    if args.adapter and args.store is None:
        parser.error("--adapter needs --store")
    options: dict[str, Any] = {"split": args.split}
    if args.image_root:
        options["image_root"] = args.image_root
    evaluate_paths(
        args.model,
        args.data,
        limit=args.limit,
        adapters=args.adapter,
        store=args.store,
        out=args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        read_options=options,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
