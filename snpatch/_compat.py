"""Every private torch API snpatch uses, in one place (torch >= 2.11, < 3).

Each entry says why snpatch needs it. All of them are the same in torch 2.11 and 2.14 (checked
on both), so none is version-gated yet; a torch that changes one gets its gate here.
``tests/test_compat.py`` fails if a private API is used anywhere else in the package.

nn.Module's own storage (``_parameters``, ``_buffers``, ``_modules``) and the methods a
subclass overrides (``_apply``, ``_load_from_state_dict``) are used directly: they are the
protocol torch's own ``parametrize.py`` and ``prune.py`` are written against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.nn.utils import parametrizations, parametrize
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "ConvNd",
    "ConvTransposeNd",
    "DataDependentOutputException",
    "DynamicOutputShapeException",
    "FakeTensorMode",
    "TorchDispatchMode",
    "TorchSpectralNorm",
    "conv_pad",
    "foreach_copy_",
    "forward_pre_hook_tables",
    "functorch_transforms_active",
    "in_autograd_backward",
    "jit_tracing",
    "keeping_gradient_accumulators",
    "load_state_dict_hook_tables",
    "packed_in_proj",
    "set_state_dict_metadata",
    "state_dict_metadata",
    "unwrap_hook",
    "version_counter",
]

# snpatch.audit: the CUDA code path run on a CPU-only machine (fake CUDA tensors) and the
# aten ops it dispatches counted; torch has no public equivalent.
FakeTensorMode = FakeTensorMode
TorchDispatchMode = TorchDispatchMode
DataDependentOutputException = DataDependentOutputException
DynamicOutputShapeException = DynamicOutputShapeException

#: The base of every ``Conv*d`` and ``ConvTranspose*d`` (lazy ones and subclasses too): an
#: isinstance that gives the layer's attributes (``in_channels``, ``padding``, ...) a type.
ConvNd = nn.modules.conv._ConvNd
#: The transposed ones, whose weight is ``(in, out/groups, ...)``: spectral ``dim=1``.
ConvTransposeNd = nn.modules.conv._ConvTransposeNd
#: torch's ``parametrizations.spectral_norm`` parametrization: found on a weight, snpatch
#: refuses to normalize it twice.
TorchSpectralNorm = parametrizations._SpectralNorm

#: ``torch.jit.is_tracing`` (public, but missing from torch's type stubs): a traced graph must
#: compute the normalized weight, not hold a cached constant.
jit_tracing: Callable[[], bool] = torch.jit.is_tracing  # type: ignore[attr-defined]

#: True inside a ``torch.func`` transform (no public query): buffers captured from
#: outside must not be updated there, so the iteration does not step.
functorch_transforms_active: Callable[[], bool] = torch._C._are_functorch_transforms_active


def in_autograd_backward() -> bool:
    """True while the autograd engine runs a backward (no public query).

    A forward there is activation checkpointing's recomputation, which must not step the
    iteration a second time.
    """
    return bool(torch._C._current_graph_task_id() != -1)


def foreach_copy_(targets: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """``t.copy_(v)`` for each pair in one fused launch (a batch's state writes)."""
    torch._foreach_copy_(list(targets), list(values))


def version_counter(tensor: Tensor) -> int:
    """``tensor._version``: bumped by every in-place write, read without touching the data.

    Tells a weight's new value (and validates the eval cache) with no device sync. Raises
    ``RuntimeError`` for an inference tensor, which has none.
    """
    return tensor._version


def conv_pad(layer: ConvNd) -> tuple[int, ...]:
    """The ``F.pad`` amounts (last dim first) a conv's own forward uses for its padding mode.

    Includes the split of ``padding="same"`` when the total is odd, which the public
    ``padding`` attribute does not say.
    """
    return tuple(int(p) for p in layer._reversed_padding_repeated_twice)


def packed_in_proj(attention: nn.MultiheadAttention) -> bool:
    """Whether ``attention`` packs q, k, v in one ``in_proj_weight`` (else three weights).

    Its own flag: reading ``in_proj_weight`` instead would run a parametrization on it.
    """
    return bool(attention._qkv_same_embed_dim)


def forward_pre_hook_tables(module: nn.Module) -> tuple[MutableMapping[int, Any], ...]:
    """``module``'s forward pre-hooks (without and with kwargs), by handle id.

    snpatch finds its own hooks there by their class (and torch's legacy ``spectral_norm``,
    which is a forward pre-hook), and deletes them on removal.
    """
    return (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs)


def load_state_dict_hook_tables(module: nn.Module) -> tuple[MutableMapping[int, Any], ...]:
    """``module``'s ``load_state_dict`` pre- and post-hooks, by handle id (as above)."""
    return (module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks)


def unwrap_hook(hook: object) -> object:
    """The callable registered, from a table entry: torch wraps pre-hooks in ``_WrappedHook``."""
    return getattr(hook, "hook", hook)


def state_dict_metadata(state: object) -> Any:
    """``state_dict()._metadata`` (each module's ``version``), or None."""
    return getattr(state, "_metadata", None)


def set_state_dict_metadata(state: object, metadata: object) -> None:
    """Attach ``metadata`` to a state dict, as ``nn.Module.state_dict`` does."""
    state._metadata = metadata  # type: ignore[attr-defined]


@contextlib.contextmanager
def keeping_gradient_accumulators() -> Iterator[None]:
    """Let torch's ``register_parametrization`` skip ``original.set_(original)``.

    It sets the original tensor to ``right_inverse(original)``, which for snpatch's norms is
    the tensor itself; but ``set_`` even with itself gives the parameter a new gradient
    accumulator, and the hooks DistributedDataParallel put on the old one stop firing: after
    ``exported()`` or remove + restore on a wrapped model, DDP no longer averages (or even
    sees) those weights' gradients. Any other ``set_`` goes through unchanged. Done by
    replacing ``parametrize._maybe_set`` (what it calls) for the duration.
    """
    maybe_set = getattr(parametrize, "_maybe_set", None)
    if maybe_set is None:  # a torch without it: nothing to keep
        yield
        return

    def set_unless_same(dest: Tensor, src: Tensor) -> None:
        if dest is not src:
            maybe_set(dest, src)

    parametrize._maybe_set = set_unless_same
    try:
        yield
    finally:
        parametrize._maybe_set = maybe_set
