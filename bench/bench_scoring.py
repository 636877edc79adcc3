"""Benchmark: per-region scoring latency, PyTorch vs onnxruntime, with and without batching.

Run ``python bench/bench_scoring.py`` (``--repeat N``, ``--threads N``; real checkpoints: ``--grounding``,
``--encoder``).

For each scorer model (tiny random-weight models by default; ``--grounding``/``--encoder`` take real
checkpoints) it exports the model to ONNX (spr-export-onnx's code, parity printed), then times one
region of 8 candidates through the scorer on the PyTorch path and on the onnxruntime path (median of
``--repeat`` runs, after a warm-up) and prints the ratio. Throughput (regions/s, onnxruntime path)
is measured with batching (all candidates of a region in one grounding pass / one text batch) and
without (candidates scored one by one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test scene lives in tests/scorers

from services.modelzoo.tiny import ensure_model
from services.scorers.common import RegionInput, load_region
from services.scorers.localization.logic import LocalizationScorer
from services.scorers.localization.settings import GroundingBackend, LocalizationSettings
from services.scorers.onnx_export import export
from services.scorers.semantic.logic import SemanticScorer
from services.scorers.semantic.settings import SemanticBackend, SemanticSettings
from tests.scorers.conftest import candidates, make_region, scene_png

Scorer = LocalizationScorer | SemanticScorer


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def region_call(scorer: Scorer, region: RegionInput, batched: bool) -> Callable[[], object]:
    """Score 8 candidates of the region, at once or one by one."""
    cands = candidates(8)
    if batched:
        return lambda: scorer.score(region, cands)
    return lambda: [scorer.score(region, [c]) for c in cands]


def bench_model(name: str, path: Path, kind: str, out: Path, repeat: int, threads: int) -> None:
    """Export, then time both paths and both batching modes for one model."""
    report = export(path, out)
    worst = max(p.max_abs_diff for p in report)
    region = load_region(make_region(), scene_png(), LocalizationSettings().images)
    if kind == "grounding":
        torch_scorer: Scorer = LocalizationScorer(LocalizationSettings(model=str(path)))
        onnx_scorer: Scorer = LocalizationScorer(
            LocalizationSettings(model=str(out), backend=GroundingBackend.ONNX, threads=threads)
        )
        unbatched_onnx = onnx_scorer
    else:
        torch_scorer = SemanticScorer(SemanticSettings(model=str(path)))
        onnx_scorer = SemanticScorer(
            SemanticSettings(model=str(out), backend=SemanticBackend.ONNX, threads=threads)
        )
        unbatched_onnx = SemanticScorer(
            SemanticSettings(model=str(out), backend=SemanticBackend.ONNX, batch_texts=False),
            onnx_scorer.encoder,
        )
    pt = median_ms(region_call(torch_scorer, region, True), repeat)
    ort = median_ms(region_call(onnx_scorer, region, True), repeat)
    batched = ort  # the same call: all candidates of the region at once
    unbatched = median_ms(region_call(unbatched_onnx, region, kind != "grounding"), repeat)
    print(
        f"{name:22s} parity {worst:8.2e} | region (8 cand.) torch {pt:8.2f} ms  onnxruntime {ort:8.2f} ms"
        f"  ratio {pt / ort:5.2f}x | throughput batched {1000 / batched:7.1f} regions/s"
        f"  unbatched {1000 / unbatched:7.1f} regions/s ({unbatched / batched:4.2f}x)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark; one line per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--grounding", nargs="*", default=["tiny-grounding-dino", "tiny-owlv2"])
    parser.add_argument("--encoder", nargs="*", default=["tiny-clip", "tiny-siglip"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, names in (("grounding", args.grounding), ("encoder", args.encoder)):
            for name in names:
                path = ensure_model(name) if name.startswith("tiny-") else Path(name)
                bench_model(name, path, kind, Path(tmp) / Path(name).name, args.repeat, args.threads)


if __name__ == "__main__":
    main()
