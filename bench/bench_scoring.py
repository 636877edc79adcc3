"""Benchmark: per-region scoring latency, PyTorch vs onnxruntime (fp32 and int8), batched vs not.

Run ``python bench/bench_scoring.py`` (``--repeat N``, ``--threads N`` (default 1 for both engines),
``--base-clip`` for a random-weight CLIP of real size; real checkpoints: ``--grounding``, ``--encoder``).

For each scorer model (tiny random-weight models by default) it exports the model to ONNX with int8
graphs (spr-export-onnx's code, parity printed), then scores the sample region of 8 candidates
(:mod:`services.scorers.sample`) through the scorer on each path. Paths run interleaved, one call of
each per round, so that load from other processes hits them alike; the figure is the median over
``--repeat`` rounds after a warm-up. Printed per model:

* ``region``: milliseconds per region on PyTorch, onnxruntime fp32 and int8, and the ratios;
* ``engine``: the part of that spent inside the model runners (same inputs on every path), so the
  ratio of the engines alone is visible next to the whole-region ratio;
* ``throughput``: regions/s on onnxruntime fp32 with batching (all candidates of a region in one
  grounding pass / one text batch) and without (candidates one by one).

Text-embedding caches are emptied before every timed call (the cold path, as for a region whose
sentences are new); one more line per encoder gives the warm-cache latency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from services.modelzoo.tiny import ensure_model
from services.scorers.common import RegionInput, load_region
from services.scorers.localization.logic import LocalizationScorer
from services.scorers.localization.settings import GroundingBackend, LocalizationSettings
from services.scorers.onnx_export import export
from services.scorers.onnx_runtime import Arrays, Runner
from services.scorers.sample import sample_candidates, sample_region, scene_png
from services.scorers.semantic.backends import DualEncoder
from services.scorers.semantic.logic import SemanticScorer
from services.scorers.semantic.settings import SemanticBackend, SemanticSettings

Scorer = LocalizationScorer | SemanticScorer
CANDIDATES = 8


class TimedRunner:
    """Wraps a model runner and adds up the time spent inside it (the engine's share of a region)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.seconds = 0.0

    def __call__(self, feed: Arrays) -> list[Any]:
        started = time.perf_counter()
        try:
            return self.runner(feed)
        finally:
            self.seconds += time.perf_counter() - started


@dataclass
class Contender:
    """One way of scoring a region, and its timings (ms per call)."""

    name: str
    call: Callable[[], object]
    runners: list[TimedRunner]
    region_ms: list[float] = field(default_factory=list)
    engine_ms: list[float] = field(default_factory=list)

    def run_once(self) -> None:
        for runner in self.runners:
            runner.seconds = 0.0
        started = time.perf_counter()
        self.call()
        self.region_ms.append((time.perf_counter() - started) * 1000)
        self.engine_ms.append(sum(r.seconds for r in self.runners) * 1000)

    def median(self) -> tuple[float, float]:
        return statistics.median(self.region_ms), statistics.median(self.engine_ms)


def timed_runners(scorer: Scorer) -> list[TimedRunner]:
    """Put a TimedRunner around every model runner of the scorer."""
    if isinstance(scorer, LocalizationScorer):
        grounder: Any = scorer.grounder
        grounder.runner = TimedRunner(grounder.runner)
        return [grounder.runner]
    encoder = scorer.encoder
    assert isinstance(encoder, DualEncoder)
    vision, text = TimedRunner(encoder.vision), TimedRunner(encoder.text)
    encoder.vision, encoder.text = vision, text
    return [vision, text]


def region_call(
    scorer: Scorer, region: RegionInput, batched: bool, cold: bool = True
) -> Callable[[], object]:
    """Score the 8 candidates of the region at once or one by one; cold: empty the text cache first."""
    cands = sample_candidates(CANDIDATES)
    encoder = scorer.encoder if isinstance(scorer, SemanticScorer) else None

    def call() -> object:
        if cold and isinstance(encoder, DualEncoder):
            encoder.text_cache.clear()
        if batched:
            return scorer.score(region, cands)
        return [scorer.score(region, [c]) for c in cands]

    return call


def interleaved(paths: Sequence[Contender], repeat: int) -> None:
    """Warm up, then one call of each path per round."""
    for path in paths:
        path.run_once()
        path.region_ms.clear()
        path.engine_ms.clear()
    for _ in range(repeat):
        for path in paths:
            path.run_once()


def scorers(kind: str, model: Path, export_dir: Path, threads: int) -> dict[str, Scorer]:
    """The PyTorch, onnxruntime fp32 and onnxruntime int8 scorers of one model."""
    if kind == "grounding":

        def loc(**fields: Any) -> Scorer:
            return LocalizationScorer(LocalizationSettings(**fields))

        onnx = {"model": str(export_dir), "backend": GroundingBackend.ONNX, "threads": threads}
        return {"torch": loc(model=str(model)), "onnx": loc(**onnx), "int8": loc(**onnx, onnx_int8=True)}

    def sem(**fields: Any) -> Scorer:
        return SemanticScorer(SemanticSettings(**fields))

    onnx = {"model": str(export_dir), "backend": SemanticBackend.ONNX, "threads": threads}
    return {"torch": sem(model=str(model)), "onnx": sem(**onnx), "int8": sem(**onnx, onnx_int8=True)}


def unbatched_scorer(kind: str, batched: Scorer) -> Scorer:
    """The onnxruntime scorer without batching: grounding gets one candidate per call (see
    region_call); the semantic scorer embeds each candidate's sentences in a call of their own."""
    if kind == "grounding":
        return batched
    assert isinstance(batched, SemanticScorer)
    settings = batched.settings.model_copy(update={"batch_texts": False})
    return SemanticScorer(settings, batched.encoder)


def bench_model(name: str, path: Path, kind: str, out: Path, repeat: int, threads: int) -> None:
    """Export, then time every path and both batching modes for one model."""
    report = export(path, out, int8=True)
    fp32 = max(p.max_abs_diff for p in report if not p.int8)
    int8 = max(p.max_abs_diff for p in report if p.int8)
    region = load_region(sample_region(), scene_png(), LocalizationSettings().images)
    made = scorers(kind, path, out, threads)
    paths = [Contender(label, region_call(s, region, True), timed_runners(s)) for label, s in made.items()]
    unbatched = unbatched_scorer(kind, made["onnx"])
    paths.append(Contender("unbatched", region_call(unbatched, region, False), []))
    if kind != "grounding":
        paths.append(Contender("warm", region_call(made["onnx"], region, True, cold=False), []))
    interleaved(paths, repeat)
    by = {p.name: p.median() for p in paths}
    (pt, pt_engine), (ort, ort_engine), (q8, q8_engine) = by["torch"], by["onnx"], by["int8"]
    print(
        f"{name:20s} parity fp32 {fp32:.1e} int8 {int8:.1e}\n"
        f"  region (8 cand.)  torch {pt:7.2f} ms | onnxruntime {ort:7.2f} ms ({pt / ort:5.2f}x)"
        f" | int8 {q8:7.2f} ms ({pt / q8:5.2f}x)\n"
        f"  engine only       torch {pt_engine:7.2f} ms | onnxruntime {ort_engine:7.2f} ms"
        f" ({pt_engine / ort_engine:5.2f}x) | int8 {q8_engine:7.2f} ms ({pt_engine / q8_engine:5.2f}x)\n"
        f"  throughput (onnxruntime) batched {1000 / ort:7.1f} regions/s"
        f" | unbatched {1000 / by['unbatched'][0]:7.1f} regions/s ({by['unbatched'][0] / ort:4.2f}x)"
    )
    if "warm" in by:
        warm = by["warm"][0]
        print(f"  warm text cache   onnxruntime {warm:7.2f} ms ({pt / warm:5.2f}x the cold torch region)")


def build_base_clip(out: Path) -> Path:
    """A CLIP of ViT-B/32 size (transformers' default CLIPConfig, 151M parameters) with random weights
    and the tiny CLIP's tokenizer and processor: real-size compute, where the engines differ most."""
    from transformers import CLIPConfig, CLIPModel

    shutil.copytree(ensure_model("tiny-clip"), out)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark; a block per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--grounding", nargs="*", default=["tiny-grounding-dino", "tiny-owlv2"])
    parser.add_argument("--encoder", nargs="*", default=["tiny-clip", "tiny-siglip"])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument(
        "--base-clip", action="store_true", help="also a random-weight CLIP of ViT-B/32 size (~2 min more)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of PyTorch and onnxruntime alike (0 = each library's default). One by default:"
        " on a small shared machine, PyTorch's OpenMP threads stall when another process takes a core, which"
        " would be measured as an onnxruntime win",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f};"
        f" threads: torch {torch.get_num_threads()}, onnxruntime {args.threads or 'default'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.base_clip:
            args.encoder.append(str(build_base_clip(Path(tmp) / "base-clip")))
        for kind, names in (("grounding", args.grounding), ("encoder", args.encoder)):
            for name in names:
                path = ensure_model(name) if name.startswith("tiny-") else Path(name)
                bench_model(
                    Path(name).name,
                    path,
                    kind,
                    Path(tmp) / f"{Path(name).name}-onnx",
                    args.repeat,
                    args.threads,
                )


if __name__ == "__main__":
    main()
