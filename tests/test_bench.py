"""``snpatch bench`` runs and reports, as a user runs it (a subprocess). Not a timed test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from torch import nn

from snpatch.bench import VARIANTS
from snpatch.cli import main
from tests.conftest import needs_torchvision


def small_convnet() -> nn.Module:
    """A factory for the command line: ``tests.test_bench:small_convnet``."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snpatch", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        # One thread: the figures are not judged here, and two threads on a shared 2-core
        # machine can stall each other for a scheduler slice per parallel region.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_bench_mlp_json_reports_every_figure() -> None:
    result = _bench("mlp", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["model"] == "mlp"
    assert report["settings"]["input_shape"] == [2, 512]
    for table in (report["train_ms"], report["eval_ms"]):
        assert set(table) == set(VARIANTS)
        for timing in table.values():
            assert 0 < timing["min"] <= timing["median"] <= timing["max"]
    for kind in ("train", "eval"):
        medians = {name: report[f"{kind}_ms"][name]["median"] for name in VARIANTS}
        ratio = report["ratios"][f"{kind}_snpatch_vs_torch"]
        assert ratio == medians["snpatch"] / medians["torch"]
    assert report["patch_s"]["torch"] > 0 and report["patch_s"]["snpatch"] > 0
    memory = report["memory"]
    assert memory["normalized_weights"] == 8
    assert memory["weight_bytes"] == 8 * 512 * 512 * 4
    # State per 512 x 512 weight: u, v (torch's), a block of 8 vectors, sigma; float32.
    assert memory["snpatch_state_bytes_per_weight"] == (512 + 512 + 8 * 512 + 1) * 4
    assert memory["torch_state_bytes"] == 8 * (512 + 512) * 4
    assert memory["snpatch_eval_cache_bytes"] == memory["weight_bytes"]  # eval only
    errors = report["sigma_error"]
    assert set(errors) == {"torch", "snpatch"}
    assert errors["snpatch"]["after_patching"] <= 1e-3
    assert errors["snpatch"]["over_steps"] <= 5e-3
    # torch starts from 15 iterations of one vector: measurably off on these layers.
    assert errors["torch"]["after_patching"] > errors["snpatch"]["after_patching"]


@pytest.mark.slow
def test_bench_factory_table() -> None:
    result = _bench(
        "tests.test_bench:small_convnet", "--image-size", "6", "--steps", "2", "--warmup", "0"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("snpatch bench tests.test_bench:small_convnet: input (16, 3, 6, 6)")
    assert lines[1].split() == list(VARIANTS)
    assert lines[2].startswith("train step ms") and lines[3].startswith("eval forward ms")
    assert any(line.startswith("train: snpatch/torch ") for line in lines)
    assert any(line.startswith("extra memory: 3 normalized weights") for line in lines)
    assert any(line.startswith("worst |sigma/target - 1| snpatch: ") for line in lines)


@pytest.mark.slow
@needs_torchvision
def test_bench_bad_input_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no_such_model"]) == 2
    assert capsys.readouterr().err.startswith("snpatch: error: unknown model 'no_such_model'")
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "mlp", "--steps", "0"])
    assert stopped.value.code == 2
    assert "--steps: must be >= 1, got 0" in capsys.readouterr().err


def one_by_one_batchnorm() -> nn.Module:
    """A model whose training forward fails at batch size 1 (BatchNorm over one value)."""
    return nn.Sequential(nn.Conv2d(3, 4, 6), nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_bench_model_whose_forward_fails_is_one_line_and_exit_code_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["bench", "tests.test_bench:one_by_one_batchnorm", "--batch-size", "1"]
    assert main([*argv, "--image-size", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "snpatch: error: the unpatched model's training forward fails on an input of shape "
        "(1, 3, 6, 6): Expected more than 1 value per channel when training"
    )
    assert len(err.splitlines()) == 1
