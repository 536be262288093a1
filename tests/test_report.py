"""``spectral_report``, ``lipschitz_bound(s)`` and ``snpatch inspect --method operator``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import snpatch
from snpatch.cli import main
from tests.test_operator import dense_norm

KEYS = [
    "name",
    "layer_type",
    "weight_shape",
    "method",
    "mode",
    "target",
    "sigma_estimate",
    "sigma_exact",
    "bound",
    "within_target",
]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.blur = nn.Conv2d(4, 4, 5, padding=2, bias=False)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.blur.weight.fill_(1.0)  # its matrix norm is far below its operator norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blur(self.conv(x)).mean((2, 3)))


def test_report_rows_compare_matrix_and_operator_methods() -> None:
    torch.manual_seed(0)
    model = Net()
    snpatch.apply_spectral_norm(model, include="blur")
    snpatch.apply_spectral_norm(model, exclude="blur", method="operator")
    report = snpatch.spectral_report(model, (2, 8, 8))
    rows = {row.name: row for row in report}
    assert list(rows) == ["conv", "blur", "head"]
    assert rows["conv"].method == "operator"
    assert rows["blur"].method == "matrix"
    assert rows["head"].method == "matrix"
    # The matrix-normalized blur has operator norm ~4.9 on 8x8: reported, not within target.
    assert rows["blur"].sigma_exact == pytest.approx(dense_norm(model.blur, (8, 8)), rel=1e-6)
    assert rows["blur"].sigma_exact > 4
    assert not rows["blur"].within_target
    assert rows["conv"].sigma_exact == pytest.approx(dense_norm(model.conv, (8, 8)), rel=1e-6)
    assert rows["conv"].within_target
    for row in report:
        assert row.bound is not None
        assert row.bound >= row.sigma_exact * (1 - 1e-9)
    assert rows["head"].sigma_exact == pytest.approx(1.0, rel=1e-3)
    assert rows["conv"].weight_shape == (4, 2, 3, 3)


def test_report_to_dict_and_table() -> None:
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    snpatch.apply_spectral_norm(model, method="operator", lipschitz=2.0)
    report = snpatch.spectral_report(model, (3, 4))
    items = report.to_dict()
    assert [list(item) for item in items] == [KEYS, KEYS]
    json.dumps(items)  # plain values only
    assert items[0]["weight_shape"] == [4, 3, 3]
    lines = str(report).splitlines()
    assert lines[0].split() == [
        "layer",
        "type",
        "weight",
        "method",
        "mode",
        "target",
        "estimate",
        "exact",
        "bound",
        "ok",
    ]
    assert len(lines) == 3
    # Aligned: every row's right-aligned "ok" column ends at the same place as the header.
    assert len({len(line) for line in lines}) == 1
    assert lines[1].startswith("0 ")
    assert lines[1].split()[1:5] == ["Conv1d", "4x3x3", "operator", "hard"]


def test_lipschitz_bounds_use_the_recorded_size() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"))
    snpatch.apply_spectral_norm(model, method="operator", example_inputs=(torch.randn(1, 2, 6, 6),))
    bounds = snpatch.lipschitz_bounds(model)
    assert list(bounds) == ["0"]
    assert bounds["0"] == pytest.approx(snpatch.lipschitz_bound(model[0], (2, 6, 6)))
    # The circulant is normalized by its exact norm: 1 up to float32 rounding of the divisor.
    assert 1.0 - 1e-6 <= bounds["0"] <= 1.0 + 1e-3


def test_lipschitz_bound_rejects_what_it_cannot_bound() -> None:
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(snpatch.InvalidArgumentError, match=r"expected \(3, n, n\)"):
        snpatch.lipschitz_bound(conv, (4, 8, 8))
    with pytest.raises(snpatch.InvalidArgumentError, match="empty output"):
        snpatch.lipschitz_bound(conv, (3, 2, 8))
    with pytest.raises(snpatch.InvalidArgumentTypeError, match="tuple of ints"):
        snpatch.lipschitz_bound(conv, "3,8,8")  # type: ignore[arg-type]
    with pytest.raises(snpatch.UnsupportedLayerError, match="MultiheadAttention"):
        snpatch.lipschitz_bound(nn.MultiheadAttention(4, 2))
    linear = nn.Linear(5, 3)
    exact = float(torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2))
    assert exact <= snpatch.lipschitz_bound(linear) <= exact * (1 + 1e-4)


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snpatch", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.mark.slow
def test_inspect_operator_report_through_the_cli(tmp_path: Path) -> None:
    (tmp_path / "tinynets.py").write_text(
        "import torch.nn as nn\n"
        "def small():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(4, 2, 3, stride=2, padding=1))\n"
    )
    result = _run(
        "inspect",
        "tinynets:small",
        "--method",
        "operator",
        "--input-shape",
        "3,8,8",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert [row["name"] for row in report] == ["0", "2"]
    for row in report:
        assert list(row) == KEYS
        assert row["method"] == "operator"
        assert row["within_target"] is True
        assert abs(row["sigma_exact"] - 1.0) <= 5e-3
        assert row["bound"] >= row["sigma_exact"]


def test_inspect_operator_table_and_bad_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (the subprocess path is tested above): the table and one-line errors.
    (tmp_path / "tinynets2.py").write_text(
        "import torch.nn as nn\n"
        "def small():\n"
        "    return nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["inspect", "tinynets2:small", "--method", "operator"]
    assert main([*args, "--input-shape", "3,8"]) == 0
    out = capsys.readouterr().out
    assert "spectral report (method=operator, input 3,8):" in out
    table = out.split("spectral report", 1)[1].splitlines()[1:]
    assert table[0].split()[:3] == ["layer", "type", "weight"]
    assert [line.split()[0] for line in table[1:]] == ["0", "2"]
    cases = [
        ("3,x,8", "--input-shape must be positive integers"),
        ("5,8", "the model's forward failed"),
    ]
    for shape, message in cases:
        assert main([*args, "--input-shape", shape]) == 2
        err = capsys.readouterr().err
        assert message in err
        assert len(err.strip().splitlines()) == 1
