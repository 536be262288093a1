"""The examples, run as a user runs them (with --quick), each checking its own results."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import scipy.linalg
import torch

from tests.conftest import needs_torchvision, run_torchrun

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


def _example_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_sngan_mixture_coverage_counts_modes_and_high_quality_samples() -> None:
    sngan = _example_module("sngan_mixture")
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
@needs_torchvision
def test_ddp_example_leaves_every_rank_identical() -> None:
    out = run_torchrun(EXAMPLES / "ddp.py", timeout=300)
    assert re.findall(r"^step \d", out, re.MULTILINE) == ["step 0", "step 1", "step 2"]
    assert "identical on all ranks: True" in out


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


@pytest.mark.slow
def test_sngan_digits_quick_prints_every_cell_and_writes_both_figures(tmp_path: Path) -> None:
    out = _run("sngan_digits.py", "--quick", "--plot", str(tmp_path))
    accuracy = re.search(r"held-out accuracy: ([\d.]+)%", out)
    assert accuracy is not None and 0 <= float(accuracy.group(1)) <= 100
    variants = ("none", "torch SN", "snpatch", "WGAN-GP")
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in variants and cells[1] in "ABCDEF":
            rows[cells[0], cells[1]] = cells[2:]
    assert set(rows) == {(v, s) for v in variants for s in "ABCDEF"}
    for fid, score, digits, top, ms in rows.values():
        assert float(fid) >= 0  # one seed in --quick: a plain number, no spread
        assert 1 - 1e-6 <= float(score) <= 10
        covered, total = digits.split("/")
        assert 0 <= float(covered) <= int(total) == 10
        assert top == "-" or 0 < float(top.rstrip("%")) <= 100
        assert float(ms) > 0
    tables = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()]
    sweep = [cells[0] for cells in tables if len(cells) == 6 and cells[0].startswith("snpatch")]
    assert sweep == [
        "snpatch c=0.5",
        "snpatch c=1",
        "snpatch c=2",
        "snpatch soft",
        "snpatch operator",
    ]
    timing = re.findall(r"^\| ([^|]+) \| ([\d.]+) \|$", out, flags=re.MULTILINE)
    assert [name for name, _ in timing] == [*variants, "snpatch operator"]
    assert all(float(ms) > 0 for _, ms in timing)
    for png in ("sngan_digits_samples.png", "sngan_digits_fid.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_sngan_digits_classifier_score_is_one_for_one_digit_and_ten_for_all() -> None:
    digits = _example_module("sngan_digits")
    one_hot = torch.eye(10).repeat(5, 1)
    assert math.isclose(digits.classifier_score(one_hot), 10.0, rel_tol=1e-9)
    assert math.isclose(digits.classifier_score(torch.eye(10)[[3] * 50]), 1.0, rel_tol=1e-9)
    # Unsure predictions score low even when balanced: uniform p(y|x) is p(y), KL 0.
    assert math.isclose(digits.classifier_score(torch.full((20, 10), 0.1)), 1.0, rel_tol=1e-9)
    # Two digits, confidently: exp(log 2).
    assert math.isclose(digits.classifier_score(torch.eye(10)[[0, 1] * 10]), 2.0, rel_tol=1e-9)


def test_sngan_digits_coverage_counts_confident_digits_with_a_fair_share() -> None:
    digits = _example_module("sngan_digits")
    one_hot = torch.eye(10)
    # 100 confident samples: a digit needs 20% of its fair share of 10, i.e. 2 samples.
    counts = torch.tensor([82, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    probs = one_hot.repeat_interleave(counts, dim=0)
    assert digits.coverage(probs) == (10, 0.82)
    counts = torch.tensor([83, 1, 2, 2, 2, 2, 2, 2, 2, 2])
    assert digits.coverage(one_hot.repeat_interleave(counts, dim=0)) == (9, 0.83)
    # Samples below 0.9 confidence do not count at all.
    unsure = torch.full((50, 10), 0.1)
    assert digits.coverage(torch.cat([probs, unsure])) == (10, 0.82)
    assert digits.coverage(unsure) == (0, 1.0)


# An untrained classifier has dead ReLU features, so scipy's sqrtm sees singular covariances.
@pytest.mark.filterwarnings("ignore:Matrix is singular:scipy.linalg.LinAlgWarning")
def test_sngan_digits_fid_is_zero_on_the_held_out_set_itself_and_nan_when_diverged() -> None:
    digits = _example_module("sngan_digits")
    torch.manual_seed(0)
    held_out = torch.rand(300, 1, 8, 8) * 2 - 1
    judge = digits.Judge(digits.Classifier().eval(), held_out)
    assert abs(judge.fid_digits(held_out)) < 1e-3
    # Another distribution: the Frechet distance of the penultimate features, in float64
    # (scipy's matrix square root, independent of torchmetrics' eigenvalue formula).
    other = held_out[:200] * 3 + 2
    with torch.no_grad():
        real, fake = (judge.classifier.body(x).double().numpy() for x in (held_out, other))
    covariance = [np.cov(f, rowvar=False) for f in (real, fake)]
    root = scipy.linalg.sqrtm(covariance[0] @ covariance[1]).real
    expected = ((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(
        covariance[0] + covariance[1] - 2 * root
    )
    assert expected > 0.05
    assert math.isclose(judge.fid_digits(other), expected, rel_tol=1e-3)
    # The held-out statistics survive the reset between evaluations.
    assert abs(judge.fid_digits(held_out)) < 1e-3
    diverged = held_out.clone()
    diverged[0, 0, 0, 0] = math.nan
    assert math.isnan(judge.fid_digits(diverged))
    fid, score, covered, top = judge.scores(diverged)
    assert math.isnan(fid) and math.isnan(score) and covered == 0 and math.isnan(top)
