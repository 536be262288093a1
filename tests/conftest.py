"""Shared fixtures: hypothesis profiles, the model zoo, exact singular values."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from snpatch.parametrization import weight_to_matrix
from snpatch.patch import layer_targets

try:
    import torchvision
except ImportError:  # the torch 2.13 lane of .ci/run: no torchvision is built for that torch
    torchvision = None

#: A test that builds torchvision models; skipped, with this reason, where it is missing.
needs_torchvision = pytest.mark.needs_torchvision
NO_TORCHVISION = "needs torchvision, which is not installed (e.g. the torch 2.13 lane of .ci/run)"
#: The marks of a test on torchvision models: they are also the larger models, so slow.
VISION_MARKS = [needs_torchvision, pytest.mark.slow]


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Doctests that import torchvision count as marked; without it, skip what needs it."""
    skip = pytest.mark.skip(reason=NO_TORCHVISION)
    for item in items:
        doctest = getattr(item, "dtest", None)  # a doctest item of snpatch/
        if doctest is not None and "torchvision" in doctest.docstring:
            for mark in VISION_MARKS:
                item.add_marker(mark)
        if torchvision is None and item.get_closest_marker("needs_torchvision"):
            item.add_marker(skip)
        # Fake CUDA tensors (snpatch.audit) need a CUDA build of torch, not a GPU.
        if (
            doctest is not None
            and doctest.name.startswith("snpatch.audit")
            and not torch.version.cuda
        ):
            item.add_marker(pytest.mark.skip(reason="a CPU-only torch build"))


settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile(  # make test-fast: deterministic, as ci
    "fast",
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def first_output(out: object) -> torch.Tensor:
    """A model's output tensor (attention-like modules return a tuple)."""
    return out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index, return-value]


def exact_sigma(layer: nn.Module) -> dict[str, float]:
    """Top singular value of each (effective) weight of a layer, via dense SVD in float64."""
    out = {}
    with torch.no_grad():
        for target in layer_targets(layer):
            owner = layer.get_submodule(target.path) if target.path else layer
            weight = getattr(owner, target.tensor_name).double()
            matrix = weight_to_matrix(weight, target.dim)
            key = f"{target.path}.{target.tensor_name}" if target.path else target.tensor_name
            out[key] = float(torch.linalg.matrix_norm(matrix, ord=2))
    return out


class Nested(nn.Module):
    """Nested containers: ModuleDict, ModuleList, Sequential, a shared submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU()) for _ in range(2)]
        )
        self.heads = nn.ModuleDict({"cls": nn.Linear(8, 5), "aux": nn.Linear(8, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = x.mean((2, 3))
        return self.heads["cls"](x) + self.heads["aux"](x).sum(1, keepdim=True)


class Attention(nn.Module):
    def __init__(self, same_dim: bool = True) -> None:
        super().__init__()
        kdim = None if same_dim else 6
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.kv = nn.Linear(8, 8 if same_dim else 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.kv(x)
        return self.attn(x, kv, kv, need_weights=False)[0]


def _zoo() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    return {
        "mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), (4, 6)),
        "conv1d": (
            lambda: nn.Sequential(
                nn.Conv1d(3, 6, 5, stride=2), nn.ReLU(), nn.Conv1d(6, 4, 3, dilation=2)
            ),
            (2, 3, 20),
        ),
        "conv2d_strided_dilated": (
            lambda: nn.Sequential(
                nn.Conv2d(3, 6, 3, stride=2, dilation=2, padding=2, padding_mode="reflect"),
                nn.Tanh(),
                nn.Conv2d(6, 4, 1),
            ),
            (2, 3, 12, 12),
        ),
        "conv3d": (
            lambda: nn.Conv3d(2, 4, (2, 3, 3), padding=1, padding_mode="circular"),
            (1, 2, 5, 6, 6),
        ),
        "grouped_depthwise": (
            lambda: nn.Sequential(
                nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8)
            ),
            (2, 4, 9, 9),
        ),
        "conv_transpose": (
            lambda: nn.Sequential(
                nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1),
                nn.ReLU(),
                nn.ConvTranspose1d(6, 2, 2, groups=2),
            ),
            (2, 4, 7),
        ),
        "conv_transpose2d": (
            lambda: nn.Sequential(
                nn.ConvTranspose2d(3, 4, 3, stride=2, dilation=2),
                nn.ReLU(),
                nn.ConvTranspose2d(4, 2, 2, groups=2),
            ),
            (2, 3, 5, 5),
        ),
        "conv_transpose3d": (
            lambda: nn.ConvTranspose3d(4, 2, (1, 2, 2), stride=(1, 2, 2), groups=2),
            (1, 4, 2, 3, 3),
        ),
        "nested": (Nested, (2, 3, 8, 8)),
        "attention": (Attention, (2, 5, 8)),
        "attention_kdim": (lambda: Attention(same_dim=False), (2, 5, 8)),
        "transformer_layer": (
            lambda: nn.TransformerEncoderLayer(
                8, 2, dim_feedforward=16, dropout=0.0, batch_first=True
            ),
            (2, 5, 8),
        ),
        "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
        "mobilenet_v3_small": (
            lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
            (2, 3, 32, 32),
        ),
        "squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(num_classes=10), (2, 3, 48, 48)),
        "vit_tiny": (
            lambda: torchvision.models.VisionTransformer(
                image_size=16,
                patch_size=8,
                num_layers=1,
                num_heads=2,
                hidden_dim=16,
                mlp_dim=32,
                num_classes=4,
            ),
            (2, 3, 16, 16),
        ),
    }


ZOO = _zoo()
#: The zoo's torchvision models.
VISION_MODELS = frozenset({"resnet18", "mobilenet_v3_small", "squeezenet1_1", "vit_tiny"})


def zoo_params(names: list[str]) -> list[object]:
    """``names`` for ``parametrize``, the torchvision models with :data:`VISION_MARKS`."""
    return [pytest.param(n, marks=VISION_MARKS) if n in VISION_MODELS else n for n in names]


@pytest.fixture(params=zoo_params(sorted(ZOO)))
def zoo_case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor]:
    factory, shape = ZOO[request.param]
    torch.manual_seed(0)
    return request.param, factory(), torch.randn(shape)


def run_torchrun(script: Path, *, timeout: float = 240) -> str:
    """Run ``script`` as ``torchrun --standalone --nproc_per_node=2`` does; return its stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    process = subprocess.Popen(
        [*command, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a timeout can kill the workers too
    )
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, err[-3000:]
    return out
