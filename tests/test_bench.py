"""``snpatch bench`` runs and reports, as a user runs it (a subprocess). Not a timed test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from snpatch.bench import (
    BUILTINS,
    VARIANTS,
    mixture_discriminator,
    run_bench,
    sngan_discriminator,
    time_runs,
)
from snpatch.cli import main
from tests.conftest import needs_torchvision

# Fake CUDA tensors (snpatch.audit, `bench --ops`) need a torch built with CUDA, not a GPU.
needs_cuda_build = pytest.mark.skipif(
    torch.version.cuda is None, reason="a CPU-only torch build can't make fake CUDA tensors"
)


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
    # State per 512 x 512 weight: u, v (torch's), a block of 16 vectors, sigma; float32.
    assert memory["snpatch_state_bytes_per_weight"] == (512 + 512 + 16 * 512 + 1) * 4
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


def test_sngan_discriminator_is_the_papers_standard_cnn() -> None:
    # Miyato et al. 2018, table 3: (in, out, kernel, stride, padding) per conv, LeakyReLU 0.1.
    model = sngan_discriminator()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [
        (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs
    ] == [
        (3, 64, 3, 1, 1),
        (64, 64, 4, 2, 1),
        (64, 128, 3, 1, 1),
        (128, 128, 4, 2, 1),
        (128, 256, 3, 1, 1),
        (256, 256, 4, 2, 1),
        (256, 512, 3, 1, 1),
    ]
    slopes = [m.negative_slope for m in model if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.1] * 7
    head = model[-1]
    assert isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (512 * 4 * 4, 1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1)
    assert (BUILTINS["sngan_d"].batch_size, BUILTINS["sngan_d"].image_size) == (64, 32)


def test_mixture_discriminator_is_an_mlp_2_64_64_64_1() -> None:
    model = mixture_discriminator()
    linears = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)]
    assert linears == [(2, 64), (64, 64), (64, 64), (64, 1)]
    assert BUILTINS["mixture_d"].batch_size == 512


def test_a_builtin_brings_its_own_batch(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "mixture_d", "--steps", "1", "--warmup", "0", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["input_shape"] == [512, 2]
    assert report["memory"]["normalized_weights"] == 4


class SimulatedDevice:
    """A GPU stand-in for :func:`time_runs`: the host queues kernels, the device runs them.

    Queueing a kernel costs the host ``LAUNCH`` (it does not wait), the device runs the
    kernels one after another (``KERNEL`` each); a mark is reached when the work queued
    before it is done, as a CUDA event is; ``synchronize`` makes the host wait.
    """

    LAUNCH, KERNEL = 1.0, 10.0

    def __init__(self) -> None:
        self.host = 0.0
        self.free_at = 0.0

    def launch(self) -> None:
        self.host += self.LAUNCH
        self.free_at = max(self.host, self.free_at) + self.KERNEL

    def mark(self) -> object:
        return max(self.host, self.free_at)

    def elapsed_ms(self, start: object, end: object) -> float:
        assert isinstance(start, float)
        assert isinstance(end, float)
        self.host = max(self.host, end)
        return end - start

    def synchronize(self) -> None:
        self.host = max(self.host, self.free_at)


def test_time_runs_shows_a_sync_inside_a_step_as_lost_time() -> None:
    device = SimulatedDevice()

    def overlapped() -> None:  # 4 kernels, queued while the device works
        for _ in range(4):
            device.launch()

    def syncing() -> None:  # the same 4 kernels with a `.item()` after the second
        device.launch()
        device.launch()
        device.synchronize()
        device.launch()
        device.launch()

    ran: list[str] = []
    order = ["overlapped", "syncing"]
    times = time_runs(
        {"overlapped": overlapped, "syncing": syncing},
        device,
        runs=3,
        run_length=10,
        order=order,
        after_run=ran.append,
    )
    # 10 steps of 4 kernels back to back, plus the first launch: the device never waits.
    # Timing each step alone, with a sync around it, would give 41: a lost launch each.
    assert times["overlapped"] == pytest.approx([40.1] * 3)
    # After each sync the device idles while the host queues the next kernel: one launch
    # lost per step.
    assert times["syncing"] == pytest.approx([41.1] * 3)
    assert ran == ["overlapped", "syncing", "syncing", "overlapped", "overlapped", "syncing"]
    assert order == ["syncing", "overlapped"]  # rotated once per round, for the next caller


class ForwardCounter:
    """A clock whose time is the number of model forwards so far (see the factory below)."""

    forwards = 0

    def __init__(self) -> None:
        self.intervals: list[float] = []

    def mark(self) -> object:
        return float(ForwardCounter.forwards)

    def elapsed_ms(self, start: object, end: object) -> float:
        assert isinstance(start, float)
        assert isinstance(end, float)
        self.intervals.append(end - start)
        return end - start

    def synchronize(self) -> None:
        pass


def counted_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def count(module: nn.Module, args: object) -> None:
        ForwardCounter.forwards += 1

    model.register_forward_pre_hook(count)  # copied with the model to every variant
    return model


def test_run_bench_in_runs_times_each_run_of_consecutive_steps_once() -> None:
    # The CUDA path (device="cuda" times this way, with CUDA events), on the CPU.
    clock = ForwardCounter()
    result = run_bench(counted_mlp, batch_size=4, steps=3, warmup=1, run_length=5, clock=clock)
    # One interval per run (3 variants x 3 runs, training then eval), 5 forwards each: the
    # accuracy check's step after each run is outside them.
    assert clock.intervals == [5.0] * 18
    for table in (result.train_ms, result.eval_ms):
        assert table == {name: {"median": 1.0, "min": 1.0, "max": 1.0} for name in VARIANTS}
    assert result.settings["timing"] == "runs"
    assert result.settings["run_length"] == 5
    assert result.settings["clock"] == "ForwardCounter"
    assert result.sigma_error["snpatch"]["over_steps"] <= 5e-3
    assert result.sigma_error["torch"]["over_steps"] > 0


@pytest.mark.slow
def test_run_bench_times_a_compiled_training_step() -> None:
    result = run_bench(counted_mlp, batch_size=4, steps=2, warmup=1, compile_mode="default")
    compiled = result.compiled
    assert compiled is not None
    assert compiled["mode"] == "default"
    assert compiled["errors"] == {}
    assert set(compiled["train_ms"]) == set(VARIANTS)
    medians = {name: compiled["train_ms"][name]["median"] for name in VARIANTS}
    assert compiled["ratios"]["train_snpatch_vs_torch"] == medians["snpatch"] / medians["torch"]
    assert result.settings["run_length"] == 20  # compiled steps are timed in runs


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_bench_on_cuda_without_a_gpu_is_one_line_and_exit_code_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["bench", "mlp", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    if torch.version.cuda is not None:
        assert err.startswith(
            "snpatch: error: device 'cuda': no CUDA device is available here "
            "(torch.cuda.is_available() is False;"
        )
    monkeypatch.setattr(torch.version, "cuda", None)
    assert main(["bench", "mlp", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snpatch: error: device 'cuda' needs a torch built with CUDA and a GPU")
    assert "is a CPU-only build" in err
    assert len(err.splitlines()) == 1


@needs_cuda_build
def test_bench_ops_reports_ops_per_weight(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "mixture_d", "--ops", "--batch-size", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["normalized_weights"] == 4
    assert report["settings"]["input_shape"] == [4, 2]
    ops = report["ops_per_weight"]
    assert set(ops) == {"train_forward", "eval_forward", "backward"}
    # torch's eval forward of a Linear weight (torch/nn/utils/parametrizations.py): clone u,
    # clone v, mv, vdot, div; training adds the power iteration.
    assert ops["eval_forward"]["torch"] == 5.0
    for name in ("torch", "snpatch"):
        assert ops["train_forward"][name] > ops["eval_forward"][name] > 0
        assert ops["backward"][name] > 0
    assert main(["bench", "mixture_d", "--ops", "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("snpatch bench mixture_d --ops: aten ops per normalized weight")
    assert lines[1].split() == ["torch", "snpatch"]
    assert lines[2].startswith("training forward") and lines[2].split()[-2] == (
        f"{ops['train_forward']['torch']:.1f}"
    )


def test_bench_ops_on_a_cpu_only_torch_says_it_needs_a_cuda_build(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    assert main(["bench", "mlp", "--ops"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "snpatch: error: snpatch bench --ops audits the CUDA code path with fake CUDA tensors: "
        "it needs a torch built with CUDA (no GPU needed)"
    )


def test_bench_ops_times_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "mlp", "--ops", "--device", "cuda", "--run-length", "3"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "snpatch: error: --ops counts ops and times nothing: drop --device, --run-length\n"
    )
