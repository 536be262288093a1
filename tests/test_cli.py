"""The command line, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from snpatch import cli
from tests.conftest import needs_torchvision, torchvision

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snpatch", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@needs_torchvision
def test_inspect_json_reports_every_layer_at_target() -> None:
    result = _run("inspect", "resnet18", "--exclude", "fc", "--lipschitz", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = [row["name"] for row in report["layers"]]
    assert len(names) == 20 and "fc" not in names and names[0] == "conv1"
    for row in report["layers"]:
        assert abs(row["sigma_after"] - 2.0) <= 2e-3
        assert row["sigma_before"] > 0


@pytest.mark.slow
@needs_torchvision
def test_inspect_table_is_readable() -> None:
    result = _run("inspect", "resnet18", "--include", "layer4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("resnet18: 5 layers patched")
    assert "sigma before" in lines[1] and "sigma after" in lines[1]
    assert any(
        line.startswith("layer4.1.conv2") and line.rstrip().endswith("1.0000") for line in lines
    )


@pytest.mark.slow
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


@pytest.mark.slow
@needs_torchvision
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


@pytest.mark.slow
@needs_torchvision
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


def _tiny_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "plotnets.py").write_text(
        "import torch.nn as nn\n"
        "def small():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(8, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "plotnets:small"


def test_inspect_plot_draws_sigma_before_after_and_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    model = _tiny_factory(tmp_path, monkeypatch)
    drawn = []
    real = cli._plot_sigmas

    def keep(*args: Any) -> Any:
        drawn.append(real(*args))
        return drawn[-1]

    monkeypatch.setattr(cli, "_plot_sigmas", keep)
    args = ["inspect", model, "--lipschitz", "2", "--json", "--input-shape", "3,4,4"]
    assert cli.main([*args, "--plot", str(tmp_path / "sigma.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "sigma.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (axes,) = drawn[0].axes
    bars = {bars.get_label(): [bar.get_height() for bar in bars] for bars in axes.containers}
    layers = report["layers"]
    assert bars == {
        "sigma before (matrix)": [row["sigma_before"] for row in layers],
        "sigma after (matrix)": [row["sigma_after"] for row in layers],
        "certified bound": [row["bound"] for row in report["report"]],
    }
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["0", "2", "4"]
    assert [line.get_ydata()[0] for line in axes.get_lines()] == [2.0]  # the target
    # Without --input-shape no bound is known: two series.
    assert cli.main(["inspect", model, "--plot", str(tmp_path / "two.svg")]) == 0
    assert (tmp_path / "two.svg").read_text().lstrip().startswith("<?xml")
    assert len(drawn[1].axes[0].containers) == 2


def test_inspect_plot_errors_are_one_line_and_exit_code_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _tiny_factory(tmp_path, monkeypatch)
    cases = [
        ([str(tmp_path / "nowhere" / "x.png")], "folder", "does not exist"),
        ([str(tmp_path / "x.nosuchformat")], "cannot write plot", "nosuchformat"),
    ]
    pytest.importorskip("matplotlib")
    for plot, *messages in cases:
        assert cli.main(["inspect", model, "--plot", *plot]) == 2
        err = capsys.readouterr().err
        assert all(message in err for message in messages), err
        assert len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert cli.main(["inspect", model, "--plot", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any work
    assert "--plot needs matplotlib" in captured.err
    assert "pip install 'snpatch[plot]'" in captured.err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torchvision is not None, reason="torchvision is installed")
def test_a_torchvision_name_without_torchvision_says_what_to_install(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["inspect", "resnet18"]) == 2
    assert "model 'resnet18' needs torchvision (pip install 'snpatch[vision]')" in (
        capsys.readouterr().err
    )
