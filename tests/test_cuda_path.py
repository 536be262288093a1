"""The CUDA code path, audited on the CPU with fake CUDA tensors (see snpatch.audit).

A synchronizing op stalls the GPU pipeline once per layer and step; these tests say which
paths are free of them. Those marked xfail are issue 14's open work: strict, so they fail
the day they start passing and must then become plain tests.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import snpatch
from snpatch.audit import (
    SYNCHRONIZING_OPS,
    _Recorder,
    audit_backward,
    audit_forward,
    ops_per_weight,
    synchronizing_ops,
)
from snpatch.operator import ConvSpec, _certified_divisor
from tests.conftest import needs_torchvision, torchvision

# Fake CUDA tensors need a torch built with CUDA (no GPU needed); the CPU-only wheels
# (the torch 2.13 lane of .ci/run) can't make them.
needs_cuda_build = pytest.mark.skipif(
    torch.version.cuda is None, reason="a CPU-only torch build can't make fake CUDA tensors"
)

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), (4, 6)),
    "conv": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, groups=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, groups=4, dilation=1),
            nn.ConvTranspose2d(8, 4, 3, stride=2),
        ),
        (2, 3, 8, 8),
    ),
    # The operator's adjoint of F.pad (index_add) for each non-zero padding mode.
    "padded": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
            nn.Conv2d(4, 4, 3, stride=2, padding=(1, 2), padding_mode="circular"),
            nn.Conv2d(4, 4, 2, padding="same", padding_mode="replicate"),
            # A circulant: tracked per frequency block (FFTs, complex Grams).
            nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
        ),
        (2, 3, 8, 8),
    ),
    "attention": (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), (2, 5, 16)),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 32, 32)),
}


def _names(*names: str) -> list[object]:
    """``names`` for ``parametrize``; resnet18 marked as needing torchvision."""
    return [pytest.param(n, marks=needs_torchvision) if n == "resnet18" else n for n in names]


def _operator(model: nn.Module) -> object:
    return snpatch.apply_spectral_norm(
        model, method="operator", example_inputs=(torch.randn(1, 3, 8, 8),)
    )


@pytest.mark.parametrize("name", _names(*MODELS))
@needs_cuda_build
def test_eval_forward_never_synchronizes(name: str) -> None:
    build, shape = MODELS[name]
    assert synchronizing_ops(build, snpatch.apply_spectral_norm, shape, training=False) == set()


@needs_cuda_build
def test_the_audit_sees_a_synchronizing_op() -> None:
    # The audit itself must be able to fail: a layer that reads a value on the host.
    class ReadsScale(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * float(self.weight.detach().abs().max())

    found = synchronizing_ops(lambda: ReadsScale(4, 4), None, (2, 4), training=False)
    assert found == {"_local_scalar_dense"}


@pytest.mark.parametrize(("shape", "dim"), [((16, 8), 0), ((8, 4, 3, 3), 0), ((4, 8, 3, 3), 1)])
@pytest.mark.parametrize("soft", [False, True])
@needs_cuda_build
def test_backward_of_the_normalization_never_synchronizes(
    shape: tuple[int, ...], dim: int, soft: bool
) -> None:
    ops = audit_backward(shape, dim=dim, soft=soft)
    assert ops.total() > 0
    assert set(ops) & SYNCHRONIZING_OPS == set()


@pytest.mark.parametrize("name", _names("mlp", "resnet18"))
@needs_cuda_build
def test_training_forward_never_synchronizes(name: str) -> None:
    build, shape = MODELS[name]
    assert synchronizing_ops(build, snpatch.apply_spectral_norm, shape, training=True) == set()


@pytest.mark.parametrize("name", ["conv", "padded"])
@needs_cuda_build
def test_operator_mode_eval_forward_never_synchronizes(name: str) -> None:
    build, shape = MODELS[name]
    assert synchronizing_ops(build, _operator, shape, training=False) == set()


@pytest.mark.parametrize("name", ["conv", "padded"])
@needs_cuda_build
def test_operator_mode_training_forward_never_synchronizes(name: str) -> None:
    build, shape = MODELS[name]
    assert synchronizing_ops(build, _operator, shape, training=True) == set()


def _certified(model: nn.Module) -> object:
    return snpatch.apply_spectral_norm(
        model, method="operator", certified=True, example_inputs=(torch.randn(1, 3, 8, 8),)
    )


# Certified mode recomputes its divisor for every new weight value, i.e. in every training
# step and in the eval forward after one: on the device, with no value read on the host.
@pytest.mark.parametrize("training", [True, False])
# padded: every smaller input size is bounded, ~120k ops per forward to audit (slow).
@pytest.mark.parametrize("name", ["mlp", "conv", pytest.param("padded", marks=pytest.mark.slow)])
@needs_cuda_build
def test_certified_forward_never_synchronizes(name: str, training: bool) -> None:
    build, shape = MODELS[name]
    patch = (
        (lambda m: snpatch.apply_spectral_norm(m, certified=True)) if name == "mlp" else _certified
    )
    found = audit_forward(build, patch, shape, training=training)
    assert found["linalg_cholesky_ex"] > 0  # the divisor was computed in this forward
    assert set(found) & SYNCHRONIZING_OPS == set()


# Each way the divisor is bounded: dense matrix (8x8), circular grid (32x32), every input
# size (None), every smaller size of a reflect conv, and its valid-conv fallback (64x64).
@pytest.mark.parametrize(
    ("layer", "size"),
    [
        (nn.Conv2d(3, 4, 3, padding=1), (8, 8)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (32, 32)),
        (nn.Conv2d(4, 4, 3, dilation=2, padding=2), None),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (6, 6)),
        (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), (64, 64)),
        (nn.ConvTranspose2d(4, 4, 3, stride=2), (16, 16)),
    ],
)
@needs_cuda_build
def test_certified_divisor_never_synchronizes(
    layer: nn.Module, size: tuple[int, ...] | None
) -> None:
    spec = ConvSpec.of(layer)
    mode = FakeTensorMode()
    recorder = _Recorder()
    fake = mode.from_tensor(layer.weight.detach())
    with mode:
        weight = fake.cuda()
        with recorder:
            divisor = _certified_divisor(spec, weight, 0, size)
    assert divisor.device.type == "cuda"
    assert recorder.ops["linalg_cholesky_ex"] > 0
    assert set(recorder.ops) & SYNCHRONIZING_OPS == set()


def _torch_spectral_norm(model: nn.Module) -> None:
    for name in snpatch.select_layers(model):
        torch.nn.utils.parametrizations.spectral_norm(model.get_submodule(name))


@needs_torchvision
@needs_cuda_build
def test_training_forward_costs_no_more_ops_per_weight_than_torch() -> None:
    build, shape = MODELS["resnet18"]
    ours = ops_per_weight(build, snpatch.apply_spectral_norm, shape, 21, training=True)
    theirs = ops_per_weight(build, _torch_spectral_norm, shape, 21, training=True)
    assert ours <= theirs


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is built with CUDA")
def test_a_cpu_only_torch_gets_a_clear_error() -> None:
    with pytest.raises(snpatch.MissingDependencyError, match="CPU-only build"):
        audit_backward((4, 4))
