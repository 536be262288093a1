"""Guards for models that are already wrapped for distributed training.

``DistributedDataParallel`` collects, when it is constructed, the parameters it averages and
the buffers it broadcasts from rank 0. The iteration state a patch adds afterwards (``u``,
``v``, the block, sigma) would never be broadcast, so the ranks' estimates could drift
apart, and the model's ``state_dict`` would change under DDP's feet. Patching must
therefore happen before wrapping. (Removing and restoring the normalization of a wrapped
model, as :func:`snpatch.exported` does, keeps the same parameters, gradient accumulators
and buffers, and is fine: see tests/test_distributed.py.)
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import WrappedModelError

__all__ = ["check_not_wrapped"]


def check_not_wrapped(layers: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse layers whose parameters belong to a ``DistributedDataParallel`` module.

    Only runs where a default process group exists (no DDP module can exist otherwise);
    then it scans the live objects once for DDP modules.

    Raises:
        WrappedModelError: a layer is inside a DDP-wrapped model (``ddp`` or ``ddp.module``).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    wrapped: set[int] = set()
    for obj in gc.get_objects():
        # type(), not isinstance(): some live objects warn when their __class__ is read.
        if issubclass(type(obj), DistributedDataParallel):
            wrapped.update(id(p) for p in obj.module.parameters())
    if not wrapped:
        return
    for name, layer in layers:
        if any(id(p) in wrapped for p in layer.parameters()):
            raise WrappedModelError(
                f"layer {name!r} ({type(layer).__name__}) belongs to a model already wrapped in "
                "DistributedDataParallel, which would never broadcast the iteration state "
                "patching adds; call apply_spectral_norm(model) before "
                "DistributedDataParallel(model)"
            )
