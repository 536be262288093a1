"""The command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snpatch", *args], capture_output=True, text=True, timeout=300
    )


def test_inspect_json_reports_every_layer_at_target() -> None:
    result = _run("inspect", "resnet18", "--exclude", "fc", "--lipschitz", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = [row["name"] for row in report["layers"]]
    assert len(names) == 20 and "fc" not in names and names[0] == "conv1"
    for row in report["layers"]:
        assert abs(row["sigma_after"] - 2.0) <= 2e-3
        assert row["sigma_before"] > 0


def test_inspect_table_is_readable() -> None:
    result = _run("inspect", "resnet18", "--include", "layer4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("resnet18: 5 layers patched")
    assert "sigma before" in lines[1] and "sigma after" in lines[1]
    assert any(
        line.startswith("layer4.1.conv2") and line.rstrip().endswith("1.0000") for line in lines
    )


def test_inspect_with_a_factory_and_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    factory = tmp_path / "mymodels.py"
    factory.write_text(
        "import torch.nn as nn\ndef net():\n    return nn.Sequential(nn.Linear(4, 3))\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snpatch",
            "inspect",
            "mymodels:net",
            "--weights",
            str(path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["layers"][0]
    expected = float(torch.linalg.matrix_norm(model[0].weight.detach(), ord=2))
    assert abs(row["sigma_before"] - expected) < 1e-5


def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (("inspect", "no_such_model"), "unknown model 'no_such_model'"),
        (
            ("inspect", "resnet18", "--include", "layer9"),
            "include 'layer9' matched no eligible layer",
        ),
        (("inspect", "resnet18", "--weights", str(garbage)), "cannot read weights file"),
        (("inspect", "resnet18", "--lipschitz", "-1"), "lipschitz must be finite and > 0"),
        (("inspect", "nosuchpackage.mod:factory"), "cannot load model factory"),
    ]
    for args, message in cases:
        result = _run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_quickstart_example_runs_and_stays_at_target() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "would patch: 20 layers" in result.stdout
    worst = float(result.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert worst <= 5e-3
