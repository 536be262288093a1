"""Watching sigma while training: read it, log it every N steps, or let Lightning log it.

Each patched weight's estimate of sigma (what its forward divides by) lives in a buffer of
its parametrization, so reading it costs nothing but the copy to the host: one GPU sync per
call of :func:`sigma_estimates`, none with ``as_tensors=True``. The exact value,
:func:`exact_sigmas`, is an SVD (or, for operator-normalized convolutions, a Lanczos run
on the operator) per weight: costly, for occasional checks.

Names are those of the weights in the unpatched model (``"conv1.weight"``,
``"attn.in_proj_weight"``, ``"attn.out_proj.weight"``), the keys of its ``state_dict``.

``SigmaMonitor``, a Lightning callback, is built on first use from ``lightning`` (or
``pytorch_lightning``); snpatch never imports Lightning otherwise.
"""

from __future__ import annotations

import functools
import importlib
import numbers
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol, overload

import torch
from torch import Tensor, nn

from .errors import InvalidArgumentError, InvalidArgumentTypeError, MissingDependencyError
from .operator import OperatorNorm, operator_norm
from .parametrization import SpectralNorm
from .patch import _hook, patched_layers
from .report import matrix_sigma
from .select import check_model, select_from

__all__ = ["ScalarWriter", "exact_sigmas", "log_sigmas", "sigma_estimates"]


class ScalarWriter(Protocol):
    """What :func:`log_sigmas` writes to: ``SummaryWriter``-like, or see :data:`TagValueStep`."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any:
        """``torch.utils.tensorboard.SummaryWriter.add_scalar``."""


#: Any callable ``(tag, value, step)``, e.g. ``lambda t, v, s: wandb.log({t: v}, step=s)``.
TagValueStep = Callable[[str, float, int], object]


def _weights(model: nn.Module) -> Iterator[tuple[str, SpectralNorm, Tensor]]:
    """``(weight name, parametrization, original weight)`` of every patched weight."""
    module = check_model(model)
    layers = select_from(module, list(patched_layers(module).items()), None, None, what="patched")
    for layer_name, layer in layers:
        hook = _hook(layer)
        assert hook is not None
        for key, norm, original in hook.norms(layer):
            yield (f"{layer_name}.{key}" if layer_name else key), norm, original


def _estimate(norm: SpectralNorm, original: Tensor) -> Tensor:
    """What ``norm``'s training forward divides by, as it keeps it (no computation).

    A certified layer's divisor is kept for the weight it was computed for; for a weight
    changed since (no forward yet), it is computed here, as the next forward would.
    """
    buffers = norm._buffers
    estimate: Tensor | None
    if isinstance(norm, OperatorNorm):
        if norm.certified:
            estimate = norm._divisor(original.detach())
        elif norm.conv is not None and norm._op_v.numel():  # an input size is known
            # The Ritz value of the last block step; the forward divides by ||A v|| for
            # its top vector v, which equals it to the iteration's accuracy.
            estimate = buffers["_op_sigma"]
        else:
            estimate = buffers["_sigma"]
    else:
        estimate = buffers["_sigma"]
    assert estimate is not None
    return estimate


@overload
def sigma_estimates(
    model: nn.Module, *, as_tensors: Literal[False] = False
) -> dict[str, float]: ...


@overload
def sigma_estimates(model: nn.Module, *, as_tensors: Literal[True]) -> dict[str, Tensor]: ...


def sigma_estimates(
    model: nn.Module, *, as_tensors: bool = False
) -> dict[str, float] | dict[str, Tensor]:
    """Each patched weight's current sigma estimate: what its forward divides by.

    The value is read from the iteration state, as left by the last training forward (or
    by patching, :func:`snpatch.update_sigma`, ``load_state_dict``): no pass over any
    weight. It is the top singular value of the weight viewed as a matrix, the operator
    norm on the recorded input size for ``method="operator"`` convolutions, and the
    certified bound with ``certified=True``. Compare with :func:`exact_sigmas`.

    Args:
        model: a model patched by :func:`snpatch.apply_spectral_norm` (or a module in it).
        as_tensors: return 0-dim tensors on the weights' device instead of floats: no GPU
            sync at all (the values are copied, one kernel per device, so later steps
            don't change them).

    Returns:
        ``{weight name: sigma}`` in model order, e.g. ``{"0.weight": 1.83}``; floats cost
        one sync per device for the whole dict.

    Raises:
        TypeError: ``model`` is not a module.
        NoMatchingLayersError: the model has no patched layer.

    Example:
        >>> import torch.nn as nn, snpatch
        >>> net = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
        >>> list(snpatch.sigma_estimates(net))
        ['0.weight', '1.weight']
    """
    if not isinstance(as_tensors, bool):
        raise InvalidArgumentTypeError(f"as_tensors must be a bool, got {as_tensors!r}")
    estimates = {name: _estimate(norm, original) for name, norm, original in _weights(model)}
    by_device: dict[torch.device, list[str]] = {}
    for name, value in estimates.items():
        by_device.setdefault(value.device, []).append(name)
    tensors: dict[str, Tensor] = {}
    floats: dict[str, float] = {}
    for names in by_device.values():
        stacked = torch.stack([estimates[name] for name in names]).detach()
        if as_tensors:
            tensors.update(zip(names, stacked.unbind(), strict=True))
        else:
            floats.update(zip(names, stacked.tolist(), strict=True))
    if as_tensors:
        return {name: tensors[name] for name in estimates}
    return {name: floats[name] for name in estimates}


def exact_sigmas(model: nn.Module) -> dict[str, float]:
    """The exact value of what each estimate of :func:`sigma_estimates` tracks. Costly.

    The top singular value of each original (unnormalized) weight viewed as a matrix, by a
    float64 SVD; for ``method="operator"`` convolutions with a recorded input size, the
    operator norm on that size (dense SVD for small layers, Lanczos to convergence
    otherwise). That is one full decomposition per weight (seconds for a resnet, more for
    large layers): for checks every few hundred steps, not every step. With
    ``certified=True`` the estimate is a bound, at or above this value.

    Raises:
        TypeError: ``model`` is not a module.
        NoMatchingLayersError: the model has no patched layer.
    """
    out = {}
    with torch.no_grad():
        for name, norm, original in _weights(model):
            size = norm.input_size if isinstance(norm, OperatorNorm) else None
            if isinstance(norm, OperatorNorm) and norm.conv is not None and size is not None:
                out[name] = operator_norm(norm.conv, original, size)
            else:
                out[name] = matrix_sigma(original, norm.dim)
    return out


def _check_count(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentTypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InvalidArgumentError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _scalar_sink(writer: object) -> TagValueStep:
    add_scalar = getattr(writer, "add_scalar", None)
    if callable(add_scalar):
        return add_scalar  # type: ignore[no-any-return]
    if callable(writer):
        return writer
    raise InvalidArgumentTypeError(
        "writer must have add_scalar(tag, value, step) (e.g. torch.utils.tensorboard"
        f".SummaryWriter) or be a callable (tag, value, step), got {type(writer).__name__}"
    )


def log_sigmas(
    model: nn.Module,
    writer: ScalarWriter | TagValueStep,
    step: int,
    *,
    every: int = 1,
    exact: bool = False,
    prefix: str = "sigma/",
) -> dict[str, float] | None:
    """Write each weight's sigma to ``writer`` when ``step`` is a multiple of ``every``.

    On other steps nothing is read and nothing syncs. Call it once per training step.

    Args:
        model: a patched model.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_scalar(tag, value, step)``), or a callable ``(tag, value, step)``.
        step: the global step (int >= 0), also passed to the writer.
        every: write when ``step % every == 0``.
        exact: write :func:`exact_sigmas` (costly) instead of :func:`sigma_estimates`.
        prefix: tag prefix; tags are ``prefix + weight name``, e.g. ``"sigma/conv1.weight"``.

    Returns:
        The values written, or None on a step that wrote nothing.

    Raises:
        TypeError: ``writer`` is neither; ``step`` or ``every`` is not an int.
        ValueError: ``step`` < 0 or ``every`` < 1.

    Example:
        >>> import torch.nn as nn, snpatch
        >>> net = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(4, 4)))
        >>> seen = []
        >>> for step in range(5):
        ...     _ = snpatch.log_sigmas(net, lambda *row: seen.append(row), step, every=2)
        >>> [(tag, step) for tag, _, step in seen]
        [('sigma/0.weight', 0), ('sigma/0.weight', 2), ('sigma/0.weight', 4)]
    """
    sink = _scalar_sink(writer)
    step = _check_count(step, "step", 0)
    every = _check_count(every, "every", 1)
    if not isinstance(prefix, str):
        raise InvalidArgumentTypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if step % every:
        return None
    values = exact_sigmas(model) if exact else sigma_estimates(model)
    for name, value in values.items():
        sink(prefix + name, value, step)
    return values


class _SigmaMonitorHooks:
    """The body of ``SigmaMonitor`` (its base class, Lightning's ``Callback``, is added later)."""

    def __init__(self, every_n_steps: int = 50, *, exact: bool = False, prefix: str = "sigma/"):
        super().__init__()
        self.every_n_steps = _check_count(every_n_steps, "every_n_steps", 1)
        self.exact = bool(exact)
        self.prefix = prefix
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        # With gradient accumulation several batches end on one optimizer step: log it once.
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        if self.exact and not trainer.is_global_zero:
            return  # loggers write on rank 0 only; don't pay for SVDs elsewhere
        values = exact_sigmas(pl_module) if self.exact else sigma_estimates(pl_module)
        metrics = {self.prefix + name: value for name, value in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


@functools.cache
def _sigma_monitor() -> type:
    errors = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            callback = importlib.import_module(package).Callback
        except ImportError as error:
            errors.append(f"{package}: {error}")
            continue
        doc = f"""Lightning callback: log each patched weight's sigma every N optimizer steps.

        Subclass of ``{package}.Callback``. After a training batch whose optimizer step
        (``trainer.global_step``) is a multiple of ``every_n_steps``, it sends
        :func:`snpatch.sigma_estimates` of the LightningModule (or, with ``exact=True``,
        :func:`snpatch.exact_sigmas`, computed on rank 0 only: costly) to every logger of
        the trainer, as ``prefix + weight name``: ``trainer.loggers[i].log_metrics``.

        Args:
            every_n_steps: log when ``global_step % every_n_steps == 0`` (once per step).
            exact: log the exact values instead of the free estimates.
            prefix: metric name prefix.
        """
        return type(
            "SigmaMonitor",
            (_SigmaMonitorHooks, callback),
            {"__module__": __name__, "__qualname__": "SigmaMonitor", "__doc__": doc},
        )
    raise MissingDependencyError(
        "snpatch.monitor.SigmaMonitor is a Lightning callback and needs lightning "
        "(pip install lightning) or pytorch_lightning; " + "; ".join(errors)
    )


def __getattr__(name: str) -> Any:
    # SigmaMonitor subclasses Lightning's Callback: built (and Lightning imported) only
    # when asked for, so that importing snpatch never imports Lightning.
    if name == "SigmaMonitor":
        return _sigma_monitor()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
