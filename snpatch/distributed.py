"""Guards and helpers for models wrapped or sharded for distributed training.

``DistributedDataParallel`` collects, when it is constructed, the parameters it averages and
the buffers it broadcasts from rank 0. The iteration state a patch adds afterwards (``u``,
``v``, the block, sigma) would never be broadcast, so the ranks' estimates could drift
apart, and the model's ``state_dict`` would change under DDP's feet. Patching must
therefore happen before wrapping. (Removing and restoring the normalization of a wrapped
model, as :func:`snpatch.exported` does, keeps the same parameters, gradient accumulators
and buffers, and is fine: see tests/test_distributed.py.)

FSDP2 (``torch.distributed.fsdp.fully_shard``) replaces each parameter it manages by a
``DTensor`` shard and, before each forward, puts the all-gathered full tensor in its place
(on the module that holds it: for a patched weight, the parametrization's ``original``).
snpatch's pre-hook runs after that all-gather, so the iteration always sees the full
weight, identical on every rank, and its state stays plain replicated tensors. Patching a
sharded model, or taking the normalization off one, would move the weight away from where
FSDP puts it: both are refused. Outside a forward, :func:`gathered` gives the full weight
(a collective: every rank must call it) and :func:`sharded_like` shards a result again.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .errors import WrappedModelError


def _loaded_class(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` is imported already, else None.

    No DTensor or FSDP module can exist before the torch module defining it is imported,
    and importing ``torch.distributed.tensor`` and ``torch.distributed.fsdp`` costs about a
    second, more than the rest of ``import snpatch``: snpatch never imports them itself.
    """
    found = sys.modules.get(module)
    cls = getattr(found, name, None)
    return cls if isinstance(cls, type) else None


__all__ = ["check_not_sharded", "check_not_wrapped", "gathered", "is_sharded", "sharded_like"]


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard, as ``fully_shard`` keeps parameters)."""
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)


def gathered(tensor: Tensor) -> Tensor:
    """The full tensor of a ``DTensor`` (a collective: every rank must call), else ``tensor``."""
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    if dtensor is not None and isinstance(tensor, dtensor):
        full: Tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        return full
    return tensor


def sharded_like(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` (the same full value on every rank) placed as the ``DTensor`` ``like`` is.

    Each rank keeps its own part; nothing is communicated. ``tensor`` itself when ``like``
    is a plain tensor.
    """
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    if dtensor is None or not isinstance(like, dtensor):
        return tensor
    from torch.distributed.tensor import distribute_tensor  # imported already: like is one

    placed: Tensor = distribute_tensor(
        tensor,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )
    return placed


def _wrapped_parameters() -> tuple[set[int], set[int]]:
    """``id``s of the parameters of every live DDP module and every ``fully_shard`` module."""
    ddp: set[int] = set()
    fsdp: set[int] = set()
    fsdp_module = _loaded_class("torch.distributed.fsdp", "FSDPModule")
    for obj in gc.get_objects():
        # type(), not isinstance(): some live objects warn when their __class__ is read.
        cls = type(obj)
        if issubclass(cls, DistributedDataParallel):
            ddp.update(id(p) for p in obj.module.parameters())
        elif fsdp_module is not None and issubclass(cls, fsdp_module):
            assert isinstance(obj, nn.Module)
            fsdp.update(id(p) for p in obj.parameters())
    return ddp, fsdp


def _label(name: str, layer: nn.Module) -> str:
    return (
        f"layer {name!r} ({type(layer).__name__})"
        if name
        else f"the model ({type(layer).__name__})"
    )


def _sharded(layer: nn.Module, fsdp: set[int]) -> bool:
    # A DTensor parameter is sharded whoever did it; a plain one may be the full tensor
    # FSDP put in place of its shard between a forward and the backward.
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    return any(
        (dtensor is not None and isinstance(p, dtensor)) or id(p) in fsdp
        for p in layer.parameters()
    )


def check_not_wrapped(layers: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse layers whose parameters belong to a DDP module or are sharded by ``fully_shard``.

    Only runs where a default process group exists (no DDP or FSDP module can exist
    otherwise); then it scans the live objects once for DDP and FSDP modules.

    Raises:
        WrappedModelError: a layer is inside a DDP-wrapped model (``ddp`` or ``ddp.module``),
            or its parameters are sharded (``fully_shard`` on it or on a module above it).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    ddp, fsdp = _wrapped_parameters()
    for name, layer in layers:
        if any(id(p) in ddp for p in layer.parameters()):
            raise WrappedModelError(
                f"{_label(name, layer)} belongs to a model already wrapped in "
                "DistributedDataParallel, which would never broadcast the iteration state "
                "patching adds; call apply_spectral_norm(model) before "
                "DistributedDataParallel(model)"
            )
        if _sharded(layer, fsdp):
            raise WrappedModelError(
                f"{_label(name, layer)} has parameters already sharded by fully_shard "
                "(FSDP2), which keeps swapping them for DTensor shards and gathered copies "
                "where the normalization would not see them; call apply_spectral_norm(model) "
                "before fully_shard"
            )


def check_not_sharded(layers: Sequence[tuple[str, nn.Module]], action: str) -> None:
    """Refuse to ``action`` (take off or put back the normalization) on sharded layers.

    Raises:
        WrappedModelError: a layer's parameters are sharded by ``fully_shard``; nothing
            has changed.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    _, fsdp = _wrapped_parameters()
    for name, layer in layers:
        if _sharded(layer, fsdp):
            raise WrappedModelError(
                f"can't {action} {_label(name, layer)}: its parameters are sharded by "
                "fully_shard (FSDP2), which would keep gathering the weight where the plain "
                "layer no longer reads it. Gather first: load get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True)) (torch.distributed.checkpoint"
                ".state_dict) into an unsharded patched copy and export that; "
                "snpatch.plain_state_dict(model) works on the sharded model (on every rank)"
            )
