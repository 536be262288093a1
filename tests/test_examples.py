"""The examples, run as a user runs them (with --quick), each checking its own results."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.conftest import needs_torchvision

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_sngan_mixture_quick_prints_every_configuration(tmp_path: Path) -> None:
    out = _run("sngan_mixture.py", "--quick", "--plot", str(tmp_path / "samples.png"))
    rows = [line for line in out.splitlines() if re.match(r"\| (ring|grid) \|", line)]
    assert len(rows) == 8  # 2 datasets x 2 settings x with/without SN
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        covered, total = cells[3].split("/")
        assert 0 <= float(covered) <= int(total) in (8, 25)
        assert 0 <= float(cells[4].rstrip("%")) <= 100
    sweep = [line for line in out.splitlines() if line.startswith("| SN ")]
    assert [line.split("|")[1].strip() for line in sweep] == [
        "SN hard c=0.5",
        "SN hard c=1",
        "SN hard c=2",
        "SN soft c=1",
    ]
    assert (tmp_path / "samples.png").stat().st_size > 10_000


def _sngan_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sngan_mixture", EXAMPLES / "sngan_mixture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_sngan_mixture_coverage_counts_modes_and_high_quality_samples() -> None:
    sngan = _sngan_module()
    grid = sngan.grid()
    centers = grid.centers
    assert sngan.coverage(grid, centers.repeat(4, 1)) == (25, 1.0)
    # Within 3 std of a mode is high quality, beyond is not.
    near = centers + torch.tensor([2.9 * grid.std, 0.0])
    far = centers + torch.tensor([3.1 * grid.std, 0.0])
    modes, quality = sngan.coverage(grid, torch.cat([near, far]))
    assert (modes, quality) == (25, 0.5)
    # A mode counts when it holds at least 20% of its fair share (here 8 of 40 samples).
    collapsed = torch.cat([centers[:1].repeat(1000 - 25 * 7, 1), centers.repeat(7, 1)])
    assert sngan.coverage(grid, collapsed)[0] == 1
    assert sngan.coverage(grid, torch.cat([collapsed, centers, centers]))[0] == 25
    assert sngan.coverage(grid, torch.full((100, 2), math.nan)) == (0, 0.0)


@pytest.mark.slow
@needs_torchvision
def test_patch_pretrained_quick_exports_and_writes_a_plain_checkpoint(tmp_path: Path) -> None:
    out = _run("patch_pretrained.py", "--quick", "--out", str(tmp_path))
    assert "patched 20 layers" in out
    assert re.search(r"torch.export: max \|diff\| vs patched model \d", out)
    assert "ONNX (onnxruntime)" in out
    # torch.onnx writes large initializers next to the graph, in resnet18.onnx.data.
    onnx_size = sum(f.stat().st_size for f in tmp_path.glob("resnet18.onnx*"))
    assert onnx_size > 40_000_000  # resnet18's 11.7M float32 weights
    assert (tmp_path / "resnet18-sn-plain.pth").exists()


@pytest.mark.slow
def test_lipschitz_classifier_quick_reports_a_unit_bound_for_the_patched_twin() -> None:
    out = _run("lipschitz_classifier.py", "--quick")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| plain") or line.startswith("| snpatch")
    }
    assert set(rows) == {"plain", "snpatch operator SN"}
    # Every layer at target 1 and 1-Lipschitz activations: the product of certified
    # per-layer bounds is 1 (to the bounds' slack).
    assert 1.0 <= float(rows["snpatch operator SN"][2]) <= 1.02
    assert float(rows["plain"][2]) > 1.02
