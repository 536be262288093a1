"""Watching sigma: estimates, exact values, the writer helper, the Lightning callback."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import snpatch
from snpatch import monitor
from tests.conftest import Attention, first_output


class Net(nn.Module):
    """A conv, attention (two normalized tensors) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.attn = Attention()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)  # (batch, length, 8)
        return self.head(self.attn(h).mean(1))


WEIGHTS = ["conv.weight", "attn.attn.in_proj_weight", "attn.attn.out_proj.weight", "attn.kv.weight"]
WEIGHTS.append("head.weight")


def _train(model: nn.Module, x: torch.Tensor, steps: int, lr: float = 1e-2) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = first_output(model(x)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _divisor(model: nn.Module, name: str) -> float:
    """What the training forward divides ``name`` by, from its input and output weights."""
    path, _, tensor = name.rpartition(".")
    owner = model.get_submodule(path)
    original = owner.parametrizations[tensor].original
    norm = owner.parametrizations[tensor][0]
    effective = getattr(owner, tensor)  # training mode: the last step's estimate
    return float(norm.lipschitz * original.detach().norm() / effective.detach().norm())


def _dense_operator_norm(conv: nn.Conv1d, weight: torch.Tensor, length: int) -> float:
    plain = nn.Conv1d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    plain = plain.double()
    with torch.no_grad():
        plain.weight.copy_(weight)
        plain.bias.zero_()
        basis = torch.eye(conv.in_channels * length, dtype=torch.float64)
        jacobian = plain(basis.reshape(-1, conv.in_channels, length)).flatten(1)
    return float(torch.linalg.matrix_norm(jacobian, ord=2))


def test_estimates_are_what_each_forward_divides_by_and_track_the_exact_values() -> None:
    model = snpatch.apply_spectral_norm(Net(), lipschitz=2.0)
    x = torch.randn(4, 3, 6)
    _train(model, x, 5)
    with torch.no_grad():
        model(x)  # a training forward: the estimates are now for the current weights
    estimates = snpatch.sigma_estimates(model)
    # The names of the unpatched model's weights, in model order.
    assert list(estimates) == WEIGHTS
    assert set(estimates) <= set(snpatch.plain_state_dict(model))
    assert all(type(value) is float for value in estimates.values())
    for name, value in estimates.items():
        assert value == pytest.approx(_divisor(model, name), rel=1e-5), name
    exact = snpatch.exact_sigmas(model)
    assert list(exact) == WEIGHTS
    for name, value in exact.items():
        path, _, tensor = name.rpartition(".")
        original = model.get_submodule(path).parametrizations[tensor].original.detach()
        matrix = original.double().flatten(1)
        assert value == pytest.approx(float(torch.linalg.matrix_norm(matrix, ord=2)), rel=1e-12)
        # Adam moved the weights ~1% a step: one block step a forward keeps up (README: 0.5%).
        assert estimates[name] == pytest.approx(value, rel=5e-3), name
    assert snpatch.sigma_estimates(model.attn) == {
        "attn.in_proj_weight": estimates["attn.attn.in_proj_weight"],
        "attn.out_proj.weight": estimates["attn.attn.out_proj.weight"],
        "kv.weight": estimates["attn.kv.weight"],
    }


def test_operator_and_certified_estimates() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 7)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 3))
    certified = copy.deepcopy(model)
    snpatch.apply_spectral_norm(model, method="operator", example_inputs=(x,))
    snpatch.apply_spectral_norm(certified, method="operator", certified=True)
    _train(model, x, 3)
    _train(certified, x, 3)
    with torch.no_grad():
        model(x), certified(x)  # estimates for the current weights
    estimates, exact = snpatch.sigma_estimates(model), snpatch.exact_sigmas(model)
    lengths = {"0.weight": 7, "2.weight": 7}
    for name in ("0.weight", "2.weight"):
        layer = model.get_submodule(name.split(".")[0])
        original = layer.parametrizations.weight.original.detach().double()
        dense = _dense_operator_norm(layer, original, lengths[name])
        assert exact[name] == pytest.approx(dense, rel=1e-9)
        # The operator norm, not the kernel matrix's norm, is what is tracked and divided by.
        assert estimates[name] == pytest.approx(dense, rel=5e-3)
        assert estimates[name] == pytest.approx(_divisor(model, name), rel=1e-4)
    # Certified: the estimate is the bound the forward divides by, never below the exact value.
    bounds, exact = snpatch.sigma_estimates(certified), snpatch.exact_sigmas(certified)
    for name, bound in bounds.items():
        assert bound == pytest.approx(_divisor(certified, name), rel=1e-5)
        assert bound >= exact[name] * (1 - 1e-9)


def test_tensors_are_copies_and_read_without_a_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    model = snpatch.apply_spectral_norm(Net())
    x = torch.randn(4, 3, 6)
    _train(model, x, 1)
    floats = snpatch.sigma_estimates(model)

    def sync(*args: object) -> object:
        raise AssertionError("a device-to-host copy")

    with monkeypatch.context() as patched:
        for method in ("item", "tolist", "__float__", "cpu", "numpy"):
            patched.setattr(torch.Tensor, method, sync)
        tensors = snpatch.sigma_estimates(model, as_tensors=True)
    assert list(tensors) == list(floats)
    for name, value in tensors.items():
        assert value.shape == () and not value.requires_grad
        assert value.item() == floats[name]
    _train(model, x, 2)
    assert {name: value.item() for name, value in tensors.items()} == floats
    assert snpatch.sigma_estimates(model) != floats


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_tensors_never_sync_and_floats_sync_once() -> None:
    model = snpatch.apply_spectral_norm(Net()).cuda()
    x = torch.randn(4, 3, 6, device="cuda")
    _train(model, x, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        tensors = snpatch.sigma_estimates(model, as_tensors=True)
        assert snpatch.log_sigmas(model, _Writer(), 1, every=2) is None  # not a logging step
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert {value.device.type for value in tensors.values()} == {"cuda"}
    assert snpatch.sigma_estimates(model) == {k: v.item() for k, v in tensors.items()}


def test_floats_cost_one_copy_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # One device, two dtypes: a single device-to-host copy for the whole dict.
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    snpatch.apply_spectral_norm(model)
    calls = []
    original = torch.Tensor.tolist

    def counting(self: torch.Tensor) -> object:
        calls.append(self.dtype)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    values = snpatch.sigma_estimates(model)
    assert list(values) == ["0.weight", "1.weight"]
    assert len(calls) == 1  # same device: one copy
    exact = snpatch.exact_sigmas(model)
    assert values == pytest.approx(exact, rel=1e-5)


class _Writer:
    """``torch.utils.tensorboard.SummaryWriter``'s ``add_scalar``, recorded."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int | None]] = []

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        self.rows.append((tag, scalar_value, global_step))


def test_log_sigmas_writes_every_n_steps_to_a_writer_or_a_callable() -> None:
    model = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    writer, rows = _Writer(), []
    written = {}
    for step in range(7):
        _train(model, x, 1)
        out = snpatch.log_sigmas(model, writer, step, every=3)
        snpatch.log_sigmas(model, lambda *row: rows.append(row), step, every=3, prefix="sn.")
        assert (out is None) == (step % 3 != 0)
        if out is not None:
            assert out == snpatch.sigma_estimates(model)
            written[step] = out
    assert writer.rows == [
        (f"sigma/{name}", value, step)
        for step, out in written.items()
        for name, value in out.items()
    ]
    assert [(tag, step) for tag, _, step in rows] == [
        (tag, step) for step in (0, 3, 6) for tag in ("sn.0.weight", "sn.1.weight")
    ]
    exact = snpatch.log_sigmas(model, writer, 9, exact=True)
    assert exact == snpatch.exact_sigmas(model)


def test_log_sigmas_to_a_tensorboard_summary_writer(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = snpatch.apply_spectral_norm(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()))
    with SummaryWriter(tmp_path) as writer:
        for step in range(4):
            _train(model, torch.randn(2, 2, 5, 5), 1)
            snpatch.log_sigmas(model, writer, step, every=2)
            if step == 2:
                expected = snpatch.sigma_estimates(model)["0.weight"]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Scalars("sigma/0.weight")
    assert [event.step for event in scalars] == [0, 2]
    assert scalars[1].value == pytest.approx(expected, rel=1e-6)


# --- the Lightning callback ----------------------------------------------------------------


class _Logger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((metrics, step))


@pytest.fixture
def fresh_monitor_class() -> object:
    monitor._sigma_monitor.cache_clear()
    yield
    monitor._sigma_monitor.cache_clear()


@pytest.mark.usefixtures("fresh_monitor_class")
def test_sigma_monitor_with_a_stub_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    class Callback:
        pass

    stub = types.ModuleType("lightning.pytorch")
    stub.Callback = Callback  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning", types.ModuleType("lightning"))
    monkeypatch.setitem(sys.modules, "lightning.pytorch", stub)
    cls = snpatch.monitor.SigmaMonitor
    assert issubclass(cls, Callback) and cls.__name__ == "SigmaMonitor"
    assert cls is snpatch.monitor.SigmaMonitor
    callback = cls(every_n_steps=2)
    model = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(3, 4)))
    loggers = [_Logger(), _Logger()]
    trainer = types.SimpleNamespace(global_step=0, loggers=loggers, is_global_zero=True)
    # Two batches per optimizer step (gradient accumulation): each step is logged once.
    expected = []
    for step in (0, 0, 1, 1, 2, 2, 3, 3, 4, 4):
        trainer.global_step = step
        _train(model, torch.randn(2, 3), 1)
        before = len(loggers[0].logged)
        callback.on_train_batch_end(trainer, model, None, None, 0)
        if len(loggers[0].logged) > before:
            expected.append(({"sigma/0.weight": snpatch.sigma_estimates(model)["0.weight"]}, step))
    assert [step for _, step in expected] == [0, 2, 4]
    for logger in loggers:
        assert logger.logged == expected
    exact = cls(every_n_steps=1, exact=True, prefix="sv/")
    trainer.is_global_zero = False
    exact.on_train_batch_end(trainer, model, None, None, 0)
    assert len(loggers[0].logged) == 3  # exact values are computed on rank 0 only
    trainer.is_global_zero, trainer.global_step = True, 5
    exact.on_train_batch_end(trainer, model, None, None, 0)
    assert loggers[0].logged[-1] == ({"sv/0.weight": snpatch.exact_sigmas(model)["0.weight"]}, 5)


@pytest.mark.usefixtures("fresh_monitor_class")
def test_sigma_monitor_without_lightning_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(snpatch.MissingDependencyError, match="pip install lightning"):
        _ = snpatch.monitor.SigmaMonitor
    with pytest.raises(ImportError):
        from snpatch.monitor import SigmaMonitor  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'SigmaMonitr'"):
        _ = snpatch.monitor.SigmaMonitr  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # Lightning's own chatter (no GPU, few workers, ...)
@pytest.mark.usefixtures("fresh_monitor_class")
def test_sigma_monitor_in_a_real_lightning_trainer(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning.pytorch")

    class Module(lightning.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 1)))

        def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Recorder(lightning.loggers.Logger):  # type: ignore[misc, name-defined]
        name, version = "recorder", 0

        def __init__(self) -> None:
            super().__init__()
            self.logged: list[tuple[dict[str, float], int]] = []

        @property
        def experiment(self) -> None:
            return None

        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            self.logged.append((dict(metrics), step))

        def log_hyperparams(self, *args: object, **kwargs: object) -> None:
            pass

    data = torch.utils.data.TensorDataset(torch.randn(32, 3))
    recorder = Recorder()
    trainer = lightning.Trainer(
        max_steps=6,
        logger=recorder,
        callbacks=[snpatch.monitor.SigmaMonitor(every_n_steps=2)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    sigma = [
        (metrics, step) for metrics, step in recorder.logged if "sigma/net.0.weight" in metrics
    ]
    assert [step for _, step in sigma] == [2, 4, 6]
    assert set(sigma[-1][0]) == {"sigma/net.0.weight", "sigma/net.1.weight"}
    final = snpatch.sigma_estimates(module)
    assert sigma[-1][0]["sigma/net.1.weight"] == final["net.1.weight"]
    assert all(math.isfinite(v) for metrics, _ in sigma for v in metrics.values())


@pytest.mark.slow
def test_importing_snpatch_imports_no_optional_package() -> None:
    code = (
        "import sys, snpatch, snpatch.monitor, snpatch.cli\n"
        "optional = {'lightning', 'pytorch_lightning', 'matplotlib', 'tensorboard'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & optional))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.strip() == "[]"
