"""Ablations of the main job, as the paper reports them: DPO against SFT on the chosen answers, and the
reward's λ (S = λ·S_sem + (1 − λ)·S_loc) in {0, 0.8, 1}.

    python bench/bench_ablations.py                          # every variant, the main job's defaults
    python bench/bench_ablations.py --rounds 1 --regions-per-round 200 --eval-limit 1000

Each variant is one whole `spr-main` run (broker, Triton, every stage, the trainer) from the same cached
bootstrap policy, with the same seeds, regions and held-out expressions; only the knob differs. So the
base rows are identical and every difference is paired: the table gives each variant's last adapter
against the base with 95 % bootstrap CIs, then DPO against SFT-on-chosen directly. Writes
`ablations.md` and each run's outputs under `--work/<variant>/`. About one main-job run per variant.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.evaluation.cli import read_outputs
from services.evaluation.rec import AdapterResult, format_table
from services.loop.main_job import parse_args, run


@dataclass(frozen=True)
class Variant:
    slug: str
    name: str
    args: tuple[str, ...]


VARIANTS = (
    Variant("dpo-lambda0.8", "DPO, λ=0.8 (paper)", ("--lambda-sem", "0.8")),
    Variant(
        "sft-chosen-lambda0.8",
        "SFT on chosen, λ=0.8",
        ("--lambda-sem", "0.8", "--trainer-arg=--objective=sft-chosen"),
    ),
    Variant("dpo-lambda0", "DPO, λ=0 (S_loc only)", ("--lambda-sem", "0")),
    Variant("dpo-lambda1", "DPO, λ=1 (S_sem only)", ("--lambda-sem", "1")),
)


def run_variant(variant: Variant, work: Path, common: list[str]) -> tuple[AdapterResult, AdapterResult]:
    """(base, the variant's last published adapter) from one whole main-job run."""
    out = work / variant.slug
    started = time.monotonic()
    code = run(parse_args([*common, *variant.args, "--work", str(out)]))
    if code != 0:
        raise SystemExit(f"{variant.slug}: spr-main exited {code}")
    results = read_outputs(out / "rec_results.json")
    if len(results) < 2:
        raise SystemExit(f"{variant.slug}: no adapter was published (see {out}/logs)")
    print(f"{variant.slug}: {(time.monotonic() - started) / 60:.1f} min", flush=True)
    base, last = results[0], results[-1]
    return base, AdapterResult(variant.name, last.predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "spr" / "ablations")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--regions-per-round", type=int, default=400)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--only", action="append", default=[], help="variant slug(s) to run (default: all)")
    args = parser.parse_args()
    common = ["--rounds", str(args.rounds), "--regions-per-round", str(args.regions_per_round)]
    common += ["--eval-limit", str(args.eval_limit)]
    chosen = [v for v in VARIANTS if not args.only or v.slug in args.only]

    base: AdapterResult | None = None
    rows: list[AdapterResult] = []
    for variant in chosen:
        variant_base, last = run_variant(variant, args.work, common)
        if base is not None and variant_base.ious().tolist() != base.ious().tolist():
            raise SystemExit("the base answers differ between runs: the comparison would not be paired")
        base = variant_base
        rows.append(last)
    assert base is not None
    sections = ["Each variant's last adapter against the base", format_table([base, *rows])]
    names = [r.name for r in rows]
    if VARIANTS[0].name in names and VARIANTS[1].name in names:
        dpo, sft = rows[names.index(VARIANTS[0].name)], rows[names.index(VARIANTS[1].name)]
        sections += ["DPO against SFT on the chosen answers", format_table([sft, dpo])]
    text = "\n\n".join(sections)
    print("\n" + text)
    (args.work / "ablations.md").write_text(f"```\n{text}\n```\n")


if __name__ == "__main__":
    main()
