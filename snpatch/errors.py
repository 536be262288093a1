"""The exceptions and warnings snpatch raises.

Every error is a :class:`SnpatchError`; the specific ones also subclass the built-in
exception they mean, so ``except ValueError`` keeps working for callers who don't know
snpatch.
"""

from __future__ import annotations

__all__ = [
    "AlreadyPatchedError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "MissingDependencyError",
    "NoMatchingLayersError",
    "NoMatchingTensorsError",
    "ParametrizationRemovedError",
    "SerializationError",
    "SharedWeightError",
    "SnapshotMismatchError",
    "SnpatchError",
    "SnpatchWarning",
    "UnsupportedLayerError",
    "WrappedModelError",
]


class SnpatchError(Exception):
    """Base class of every error snpatch raises on purpose."""


class InvalidArgumentError(SnpatchError, ValueError):
    """An argument has a bad value (e.g. ``lipschitz=0``, an unknown mode, an invalid regex)."""


class InvalidArgumentTypeError(SnpatchError, TypeError):
    """An argument has the wrong type (e.g. a model that is not an ``nn.Module``)."""


class NoMatchingLayersError(SnpatchError, ValueError):
    """An include pattern, or the whole selection, matched no eligible layer."""


class NoMatchingTensorsError(NoMatchingLayersError):
    """A tensor name of ``tensors={LayerType: ...}`` matched no tensor of a selected layer."""


class AlreadyPatchedError(SnpatchError, RuntimeError):
    """A selected layer already carries a spectral normalization (snpatch's or torch's)."""


class UnsupportedLayerError(SnpatchError, TypeError):
    """A selected layer cannot be normalized as it is.

    For example: a lazy layer, a weight that is not 2-D or more, another parametrization.
    """


class ParametrizationRemovedError(SnpatchError, RuntimeError):
    """A patched weight's normalization was removed outside snpatch while its hook stayed.

    For example by ``torch.nn.utils.parametrize.remove_parametrizations``; the message says
    how to finish the removal.
    """


class SharedWeightError(SnpatchError, ValueError):
    """A normalized weight is one tensor with another module's (tied weights) where that
    can't be handled: two patched layers sharing one weight, or a plain checkpoint of an
    architecture that stores the shared tensor once.
    """


class SnapshotMismatchError(SnpatchError, ValueError):
    """A snapshot does not fit the model it is restored into (missing layer, other shape)."""


class SerializationError(SnpatchError, RuntimeError):
    """A patched model was pickled or scripted whole; the message says what works instead."""


class WrappedModelError(SnpatchError, RuntimeError):
    """The model is already wrapped in ``DistributedDataParallel`` or sharded by FSDP2.

    Patch before ``DistributedDataParallel(model)`` or ``fully_shard``; the normalization
    of a sharded model can't be taken off or put back either (gather first).
    """


class MissingDependencyError(SnpatchError, ImportError):
    """An optional package a feature needs is not installed; the message says which one."""


class SnpatchWarning(UserWarning):
    """Something suspicious that does not stop the operation (an exclude that matched nothing)."""
