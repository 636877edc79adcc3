"""The README's first command: `spr-demo` runs the loop end to end on the real broker and Triton."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.loop.demo import main

pytestmark = pytest.mark.integration


def test_every_sampled_region_gets_exactly_one_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--work", str(tmp_path), "--images", "3", "--samples", "2", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    regions = int(next(line.split()[-1] for line in out.splitlines() if line.startswith("regions sampled")))
    decided = [line for line in out.splitlines() if ": pair" in line or ": skip" in line]
    assert regions > 0 and len(decided) == regions
    assert "no decision (timed out)                      0" in out
