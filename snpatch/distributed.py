"""Guards for models that are already wrapped for distributed training.

``DistributedDataParallel`` hooks the gradient accumulator of each parameter when it is
constructed. Registering a parametrization afterwards replaces those accumulators
(``torch.nn.utils.parametrize`` re-sets the weight in place), so DDP would stop averaging
the weights' gradients: an error on the second step, or, with ``find_unused_parameters=True``,
replicas that silently drift apart. Patching must therefore happen before wrapping.
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
                "DistributedDataParallel, whose gradient hooks patching would detach; call "
                "apply_spectral_norm(model) before DistributedDataParallel(model)"
            )
