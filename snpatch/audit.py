"""What a patched model asks of a GPU: its CUDA code path, audited on any machine.

A patched model is rebuilt with fake CUDA tensors
(``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and devices, no data and
no GPU) and one forward runs under a ``TorchDispatchMode`` that records every aten op it
dispatches. That is the code path a CUDA device runs, so the record shows how many ops
each normalized weight costs and whether any of them makes the host wait for the device
(:data:`SYNCHRONIZING_OPS`: a device-to-host copy of a value, or a LAPACK-style solver that
checks its result on the host). It needs a torch built with CUDA, not a GPU. The autograd
engine does not run on fake tensors, so the backward of snpatch's normalization is audited
by calling it directly.

    >>> import torch.nn as nn, snpatch
    >>> from snpatch.audit import audit_forward
    >>> from snpatch.audit import synchronizing_ops
    >>> synchronizing_ops(lambda: nn.Linear(8, 8), snpatch.apply_spectral_norm, (2, 8),
    ...                   training=False)
    set()
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._compat import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    TorchDispatchMode,
)
from .engine import scale_of
from .errors import MissingDependencyError
from .parametrization import _Normalize

__all__ = [
    "SYNCHRONIZING_OPS",
    "audit_backward",
    "audit_forward",
    "ops_per_weight",
    "synchronizing_ops",
]

#: aten ops (overload packets) that synchronize a CUDA device with the host: results read
#: on the host (``_local_scalar_dense`` is ``.item()`` / ``float()`` / ``bool()``), outputs
#: whose size depends on data, and solvers whose CUDA kernels check their info on the host
#: (torch/linalg/__init__.py documents svd, eig, eigh, cholesky, inv, solve as such).
SYNCHRONIZING_OPS = frozenset(
    {
        "_linalg_svd",
        "_linalg_eigh",
        "linalg_eig",
        "linalg_cholesky",
        "linalg_inv",
        "linalg_inv_ex",
        "_linalg_solve_ex",
        "linalg_solve",
        "_linalg_check_errors",
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
    }
)


class _Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]  # (torch's class is untyped)
    """Counts the aten ops dispatched while it is active, by name (``aten.mm`` -> ``mm``)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        packet = str(func.overloadpacket)
        if packet.startswith("aten."):
            self.ops[packet.removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def _check_cuda_build() -> None:
    if torch.version.cuda is None:
        raise MissingDependencyError(
            "snpatch.audit needs a torch built with CUDA (no GPU needed) to make fake CUDA "
            f"tensors; torch {torch.__version__} is a CPU-only build"
        )


def _to_fake_cuda(model: nn.Module, mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer of ``model`` by a fake CUDA tensor like it."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                fake = mode.from_tensor(param.detach())
                with mode:
                    module._parameters[name] = nn.Parameter(fake.cuda(), param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                fake = mode.from_tensor(buffer)
                with mode:
                    module._buffers[name] = fake.cuda()


def audit_forward(
    build: Callable[[], nn.Module],
    patch: Callable[[nn.Module], object] | None,
    input_shape: tuple[int, ...],
    *,
    training: bool,
    recorder: _Recorder | None = None,
) -> collections.Counter[str]:
    """The aten ops of one forward of ``build()`` (patched by ``patch``) on fake CUDA tensors.

    The model is built and patched on the CPU (patching may synchronize: it happens once),
    then moved to fake CUDA tensors; in training mode the forward includes the iteration
    step, as a training step on a GPU does.
    """
    _check_cuda_build()
    model = build()
    if patch is not None:
        patch(model)
    model.train(training)
    mode = FakeTensorMode()
    _to_fake_cuda(model, mode)
    recorder = recorder or _Recorder()
    with mode, warnings.catch_warnings():
        # snpatch tells a weight's new values by its storage pointer (never read on the
        # device); fake tensors warn that theirs is meaningless.
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        x = torch.randn(input_shape, device="cuda")
        with recorder:
            model(x)
    return recorder.ops


def ops_per_weight(
    build: Callable[[], nn.Module],
    patch: Callable[[nn.Module], object],
    input_shape: tuple[int, ...],
    weights: int,
    *,
    training: bool,
) -> float:
    """Extra aten ops of a patched forward over the unpatched one, per normalized weight."""
    plain = audit_forward(build, None, input_shape, training=training)
    patched = audit_forward(build, patch, input_shape, training=training)
    return (patched.total() - plain.total()) / weights


def synchronizing_ops(
    build: Callable[[], nn.Module],
    patch: Callable[[nn.Module], object] | None,
    input_shape: tuple[int, ...],
    *,
    training: bool,
) -> set[str]:
    """The :data:`SYNCHRONIZING_OPS` one forward dispatches on fake CUDA tensors.

    A fake tensor has no value to give the host, so the first op that needs one ends the
    forward; it is reported with any found before it.
    """
    recorder = _Recorder()
    try:
        ops = audit_forward(build, patch, input_shape, training=training, recorder=recorder)
    except (DataDependentOutputException, DynamicOutputShapeException):
        ops = recorder.ops
    return set(ops) & SYNCHRONIZING_OPS


class _Context:
    """What :class:`~snpatch.parametrization._Normalize`'s backward reads from its ctx."""

    def __init__(self, saved: tuple[Tensor, ...], options: tuple[object, ...]) -> None:
        self.saved_tensors = saved
        self.options = options


def audit_backward(
    shape: tuple[int, ...], *, dim: int = 0, soft: bool = False
) -> collections.Counter[str]:
    """The aten ops of snpatch's normalization backward for one fake CUDA weight."""
    _check_cuda_build()
    mode = FakeTensorMode()
    recorder = _Recorder()
    with mode:
        weight = torch.randn(shape, device="cuda")
        rows = shape[dim]
        cols = weight.numel() // rows
        u, v = torch.randn(rows, device="cuda"), torch.randn(cols, device="cuda")
        sigma = torch.ones((), device="cuda")
        scale = scale_of(sigma, 1.0, soft, 1e-12)
        ctx = _Context((weight, u, v, sigma, scale), (1.0, soft, 1e-12, dim))
        grad = torch.randn(shape, device="cuda")
        with recorder, torch.no_grad():
            _Normalize.backward(ctx, grad)
    return recorder.ops
