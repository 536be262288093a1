"""Take spectral normalization off for export, put it back exactly, and plain checkpoints.

:func:`remove_spectral_norm` bakes each normalized weight into a plain ``Parameter`` (the
same object the optimizer holds) and returns a :class:`SpectralNormSnapshot` of everything
it took off; :func:`restore_spectral_norm` puts that state back, so training continues
bit for bit as if nothing had happened. :func:`exported` does both around a ``with``
block, and :func:`plain_state_dict` gives the unpatched architecture's checkpoint without
touching the model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._compat import set_state_dict_metadata, state_dict_metadata
from .distributed import check_not_sharded
from .engine import Cohort
from .errors import (
    AlreadyPatchedError,
    InvalidArgumentTypeError,
    SharedWeightError,
    SnapshotMismatchError,
)
from .operator import OperatorNorm
from .parametrization import SpectralNorm
from .patch import (
    TensorSlot,
    _hook,
    checkpoint_adapter,
    install,
    parametrization_list,
    patched_layers,
    spectral_norms,
    tensor_slots,
    uninstall_hooks,
)
from .select import LayerFilter, Pattern, check_model, layer_tensors, select_from

__all__ = [
    "SpectralNormSnapshot",
    "exported",
    "plain_state_dict",
    "remove_spectral_norm",
    "restore_spectral_norm",
]

T_module = TypeVar("T_module", bound=nn.Module)

#: Parametrization classes a snapshot can rebuild, by their ``kind``.
NORM_KINDS: dict[str, type[SpectralNorm]] = {
    SpectralNorm.kind: SpectralNorm,
    OperatorNorm.kind: OperatorNorm,
}

_FORMAT = 1


@dataclass(frozen=True)
class SpectralNormSnapshot:
    """Everything :func:`remove_spectral_norm` took off a model, to put back exactly.

    ``layers`` maps each layer name to its weights (``"weight"``, ``"in_proj_weight"``
    and ``"out_proj.weight"`` for attention, or those ``tensors`` chose), each a record
    with ``kind``, ``config`` (the options), ``buffers`` (the whole iteration state),
    ``original`` (the unnormalized weight values) and, for a tied weight, ``tied`` (the
    name in the model of the tensor it shares). Only tensors and plain Python values:
    ``torch.save`` it and load it back with ``torch.load(path, weights_only=True)``.

    Example:
        >>> import torch.nn as nn, snpatch
        >>> net = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(4, 4)))
        >>> snapshot = snpatch.remove_spectral_norm(net)
        >>> list(snapshot.layers), len(snapshot)
        (['0'], 1)
    """

    layers: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    format: int = _FORMAT

    def __len__(self) -> int:
        return len(self.layers)

    def __bool__(self) -> bool:
        return bool(self.layers)


# torch.load(weights_only=True) rebuilds only allow-listed classes.
torch.serialization.add_safe_globals([SpectralNormSnapshot])


def remove_spectral_norm(
    model: nn.Module,
    include: Pattern | None = None,
    exclude: Pattern | None = None,
) -> SpectralNormSnapshot:
    """Take snpatch's spectral normalization off, keeping the normalized weights.

    For each selected patched layer, the effective weight (as the eval forward computes
    it, without another power-iteration step) is written into the original ``Parameter``
    object, which becomes the plain ``weight`` again; the parametrization and every hook
    snpatch added are removed and the layer gets its original class back. The model's
    ``state_dict`` keys are then those of the never-patched model.

    A tensor that another module of ``model`` also holds (tied weights: a language model's
    output layer and its input embedding) is never changed: that layer gets a new
    ``Parameter`` with the normalized values, the shared one keeps its values for the other
    readers, and :func:`restore_spectral_norm` ties the layer back to it. Readers outside
    ``model`` can't be seen: remove from the model that holds them all.

    Args:
        model: a model patched by :func:`snpatch.apply_spectral_norm`.
        include: pattern(s) or a predicate over the patched layers; None means all.
        exclude: pattern(s) or a predicate removing patched layers.

    Returns:
        The snapshot to give to :func:`restore_spectral_norm`. Empty (and nothing
        changed) when the model has no patched layer.

    Raises:
        NoMatchingLayersError: an include pattern matched no patched layer.
        SharedWeightError: two patched weights are one tensor (tied after patching; patching
            refuses it). Nothing is changed then.
        WrappedModelError: a selected layer is sharded by ``fully_shard``; nothing changed
            (:func:`plain_state_dict` works on a sharded model).

    Example:
        >>> import torch.nn as nn, snpatch
        >>> net = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(4, 4)))
        >>> snapshot = snpatch.remove_spectral_norm(net)
        >>> snpatch.is_patched(net), sorted(net.state_dict())
        (False, ['0.bias', '0.weight'])
    """
    module = check_model(model)
    candidates = list(patched_layers(module).items())
    if not candidates:
        return SpectralNormSnapshot()
    layers = select_from(
        module,
        candidates,
        LayerFilter.parse(include, "include"),
        LayerFilter.parse(exclude, "exclude"),
        what="patched",
    )
    check_not_sharded(layers, "take the spectral normalization off")
    # Everything is computed (and every refusal raised) before the first layer changes.
    slots = tensor_slots(module)
    plans = []
    records: dict[str, dict[str, dict[str, Any]]] = {}
    for name, layer in layers:
        weights = {}
        hook = _hook(layer)
        assert hook is not None
        # A weight whose normalization was removed outside snpatch (torch's
        # remove_parametrizations) is plain already: only the hook is left to take off.
        for key, norm, original in hook.norms(layer, removed_ok=True):
            owner, tensor_name = _owner(layer, key)
            record = {
                "kind": norm.kind,
                "config": norm.config(),
                "buffers": {n: b.detach().clone() for n, b in norm.named_buffers()},
                "original": original.detach().clone(),
            }
            readers = _other_readers(slots, owner, tensor_name, original)
            if readers:
                # Tied weights: the other readers keep the tensor as it is; this layer
                # gets its own copy with the normalized values, and restore ties it back.
                record["tied"] = readers[0].qualified_name
            weights[key] = record
            plans.append(
                (owner, tensor_name, original, norm.effective_weight(original), bool(readers))
            )
        if weights:
            records[name] = weights
    orders = {name: checkpoint_adapter(layer) for name, layer in layers}
    with torch.no_grad():
        for owner, tensor_name, original, effective, tied in plans:
            if tied:
                _unparametrize(owner, tensor_name, _copy_of(original, effective))
            else:
                original.copy_(effective)
                _unparametrize(owner, tensor_name, original)
    for name, layer in layers:
        adapter = orders[name]
        if adapter is not None:
            for path, order in adapter.tensor_order.items():
                _reorder(layer.get_submodule(path) if path else layer, order)
        uninstall_hooks(layer)
    return SpectralNormSnapshot(records)


def restore_spectral_norm(model: T_module, snapshot: SpectralNormSnapshot) -> T_module:
    """Put back exactly the spectral normalization that :func:`remove_spectral_norm` took off.

    The original (unnormalized) weight values go back into the same ``Parameter`` objects,
    and the iteration state, target, mode and options are those of the snapshot, so
    training after remove + restore is bit-for-bit that of a model never removed.
    Anything that kept references to those parameters meanwhile (an ``ExportedProgram``,
    a traced module) sees the unnormalized weights afterwards: export inside
    :func:`exported` instead, which gives the export copies.

    Args:
        model: the model the snapshot was taken from (or one with the same layers).
        snapshot: what :func:`remove_spectral_norm` returned (possibly via ``torch.load``).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``snapshot`` is not a :class:`SpectralNormSnapshot`.
        SnapshotMismatchError: a layer of the snapshot is missing from the model, or its
            weights differ in name, shape or dtype, or a tied weight's partner is missing.
            Nothing is changed then.
        AlreadyPatchedError: a layer of the snapshot is patched again already.
        WrappedModelError: a layer of the snapshot is sharded by ``fully_shard``.
    """
    module = check_model(model)
    if not isinstance(snapshot, SpectralNormSnapshot):
        raise InvalidArgumentTypeError(
            "snapshot must be the SpectralNormSnapshot that remove_spectral_norm returned, "
            f"got {type(snapshot).__name__}"
        )
    if snapshot.format != _FORMAT:
        raise SnapshotMismatchError(
            f"snapshot format {snapshot.format!r} is not supported (this snpatch: {_FORMAT})"
        )
    # Every layer is checked, and its parametrizations built, before the first one changes.
    plans = [_plan_restore(module, name, weights) for name, weights in snapshot.layers.items()]
    check_not_sharded(
        [(name, layer) for name, (layer, _) in zip(snapshot.layers, plans, strict=True)],
        "restore the spectral normalization of",
    )
    cohort = Cohort()
    for layer, targets in plans:
        with torch.no_grad():
            for path, tensor_name, parameter, original, _ in targets:
                parameter.copy_(original)
                owner = layer.get_submodule(path) if path else layer
                # A tied weight's layer held its own copy while removed: tie it back
                # (the same slot, so the parameter order is unchanged).
                if isinstance(parameter, nn.Parameter) and tensor_name in owner._parameters:
                    owner._parameters[tensor_name] = parameter
                elif tensor_name in owner._buffers:
                    owner._buffers[tensor_name] = parameter
        install(
            layer,
            [(path, tensor_name) for path, tensor_name, _, _, _ in targets],
            [norm for _, _, _, _, norm in targets],
            cohort,
        )
        for _, _, _, _, norm in targets:
            norm.train(layer.training)
    return model


@contextmanager
def exported(
    model: T_module,
    include: Pattern | None = None,
    exclude: Pattern | None = None,
) -> Iterator[T_module]:
    """Remove spectral normalization inside a ``with`` block and restore it on exit.

    Restores also when the block raises. Inside, the model is a plain model with the
    normalized weights baked in: export it with ``torch.export``, ONNX or TorchScript, or
    ``torch.save`` it whole. The baked weights inside the block are copies, so an
    ``ExportedProgram`` or a traced module made there (both keep references to the
    model's parameters) stays correct after the block, when the model is patched again.

    Example:
        >>> import torch, torch.nn as nn, snpatch
        >>> net = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(4, 4))).eval()
        >>> with snpatch.exported(net):
        ...     program = torch.export.export(net, (torch.randn(1, 4),))
        >>> snpatch.is_patched(net)
        True
    """
    snapshot = remove_spectral_norm(model, include, exclude)
    # torch.export, torch.jit and torch.save inside the block keep references to the
    # model's Parameter objects, which restore turns back into unnormalized weights: the
    # block sees copies, so what it produced stays correct after exit.
    originals = _swap_in_copies(model, snapshot)
    try:
        yield model
    finally:
        for owner, tensor_name, parameter in originals:
            owner._parameters[tensor_name] = parameter
        restore_spectral_norm(model, snapshot)


def _swap_in_copies(
    model: nn.Module, snapshot: SpectralNormSnapshot
) -> list[tuple[nn.Module, str, nn.Parameter]]:
    swapped = []
    for name, weights in snapshot.layers.items():
        layer = model.get_submodule(name)
        for key in weights:
            owner, tensor_name = _owner(layer, key)
            parameter = owner._parameters.get(tensor_name)
            if isinstance(parameter, nn.Parameter):
                copy = _copy_of(parameter, parameter)
                assert isinstance(copy, nn.Parameter)
                owner._parameters[tensor_name] = copy
                swapped.append((owner, tensor_name, parameter))
    return swapped


def _copy_of(tensor: Tensor, values: Tensor) -> Tensor:
    """A new tensor holding ``values``, a ``Parameter`` (same ``requires_grad``) if ``tensor`` is.

    How a layer gets a weight of its own without changing a tensor that something else
    reads: exported() gives each layer one, and removal gives one to a tied weight's layer.
    """
    copy = values.detach().clone()
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(copy, tensor.requires_grad)
    return copy


def _other_readers(
    slots: Mapping[int, list[TensorSlot]], owner: nn.Module, tensor_name: str, original: Tensor
) -> list[TensorSlot]:
    """The slots of ``original`` other than its own (``owner``'s parametrization).

    Raises:
        SharedWeightError: another snpatch normalization reads it too (refused by
            apply_spectral_norm; possible only if the model was tied after patching).
    """
    own = parametrization_list(owner, tensor_name)
    readers = [slot for slot in slots.get(id(original), []) if slot.module is not own]
    for slot in readers:
        if slot.normalized():
            raise SharedWeightError(
                f"{slot.label()!r} and the weight {tensor_name!r} of {type(owner).__name__} are "
                "one tensor, normalized twice; remove_spectral_norm can't take either off "
                "without changing what the other reads. Nothing was changed"
            )
    return readers


def plain_state_dict(model: nn.Module) -> OrderedDict[str, Tensor]:
    """The ``state_dict`` of the unpatched architecture, with the normalized weights.

    Doesn't change the model. The result loads with ``strict=True`` into the model built
    without snpatch, e.g. to publish a checkpoint for ``resnet18().load_state_dict``: its
    keys, their order and its ``_metadata`` (the per-module versions that versioned
    ``_load_from_state_dict`` methods read) are those of the never-patched model.
    On a model sharded by ``fully_shard`` every rank must call it (it gathers each
    normalized weight); like ``model.state_dict()`` there, it holds ``DTensor`` shards
    (``torch.distributed.checkpoint`` saves them; ``.full_tensor()`` gathers one).

    Raises:
        SharedWeightError: a normalized weight is one tensor with a weight another module
            reads unnormalized (tied weights, e.g. a language model's output layer and its
            input embedding): the unpatched architecture stores them as one tensor, so no
            checkpoint of it holds both values.

    Example:
        >>> import torch.nn as nn, snpatch
        >>> net = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(4, 4)))
        >>> nn.Sequential(nn.Linear(4, 4)).load_state_dict(snpatch.plain_state_dict(net))
        <All keys matched successfully>
    """
    module = check_model(model)
    # First: on a model sharded by fully_shard, state_dict() puts the DTensor shards back
    # in place of full tensors gathered for a forward, so the originals read below are
    # those shards (and the effective weights come out sharded the same way).
    state = module.state_dict()
    slots = tensor_slots(module)
    # "<owner>.parametrizations.<tensor>." -> (owner prefix, tensor, order before patching,
    # effective weight)
    replace: dict[str, tuple[str, str, tuple[str, ...], Tensor]] = {}
    for name, layer in patched_layers(module).items():
        adapter = checkpoint_adapter(layer)
        for key, norm in spectral_norms(layer).items():
            owner, tensor_name = _owner(layer, key)
            original = parametrization_list(owner, tensor_name).original
            readers = _other_readers(slots, owner, tensor_name, original)
            if readers:
                full = ".".join(p for p in (name, key) if p)
                raise SharedWeightError(
                    f"plain_state_dict: the normalized {full!r} is one tensor with "
                    f"{readers[0].label()!r} (tied weights), which reads it unnormalized; the "
                    "unpatched architecture stores both as that one tensor, so no checkpoint "
                    f"of it holds both values. Patch with exclude={name!r}, untie the weights "
                    "before patching (give the layer an nn.Parameter of its own) and load "
                    "into an untied model, or save the whole model inside "
                    "`with snpatch.exported(model):`"
                )
            path, _, _ = key.rpartition(".")
            base = ".".join(p for p in (name, path) if p)
            base = f"{base}." if base else ""
            order = adapter.tensor_order.get(path, ()) if adapter is not None else ()
            replace[f"{base}parametrizations.{tensor_name}."] = (
                base,
                tensor_name,
                order,
                norm.effective_weight(original),
            )
    items: list[tuple[str, Tensor]] = []
    for key, value in state.items():
        patched, rest = _split_patched_key(key)
        if patched not in replace:
            items.append((key, value))
        elif rest == "original":
            base, tensor_name, order, effective = replace[patched]
            items.insert(
                _plain_position(items, base, tensor_name, order), (base + tensor_name, effective)
            )
    plain = OrderedDict(items)
    metadata = state_dict_metadata(state)
    if metadata is not None:
        set_state_dict_metadata(plain, _plain_metadata(metadata, replace))
    return plain


def _plain_metadata(metadata: Mapping[str, Any], replaced: Iterable[str]) -> OrderedDict[str, Any]:
    """``metadata`` without the entries of the parametrizations in ``replaced``.

    ``state_dict()._metadata`` has one entry per module, by its prefix without the final
    dot. For each replaced ``<owner>.parametrizations.<tensor>.`` the entries of that
    parametrization list and its parametrizations go, and so does
    ``<owner>.parametrizations`` once nothing inside it is left. The owner's own entry stays:
    its parametrized class inherits the original class's ``_version``.
    """
    out = OrderedDict(metadata)
    for patched in replaced:
        container = patched.removesuffix(".").rpartition(".")[0]
        for prefix in list(out):
            if f"{prefix}." == patched or prefix.startswith(patched):
                del out[prefix]
        if container in out and not any(p.startswith(f"{container}.") for p in out):
            del out[container]
    return out


def _plain_position(
    items: list[tuple[str, Tensor]], base: str, tensor_name: str, order: tuple[str, ...]
) -> int:
    """Where ``base + tensor_name`` stands among the owner's own keys before patching.

    An owner's own parameters and buffers come first in its part of a ``state_dict``, then
    its children (``parametrizations`` last), so the plain key goes before the first own
    key that followed it before patching, or else after the owner's last own key, or, with
    no own key, before the owner's first child key (another tensor's parametrization).
    """
    rank = {name: i for i, name in enumerate(order)}
    mine = rank.get(tensor_name, len(rank))
    last_own = None
    first_child = None
    for index, (key, _) in enumerate(items):
        if key.startswith(base) and key[len(base) :] in rank:
            if rank[key[len(base) :]] > mine:
                return index
            last_own = index
        elif key.startswith(base) and first_child is None:
            first_child = index
    if last_own is not None:
        return last_own + 1
    return len(items) if first_child is None else first_child


def _split_patched_key(key: str) -> tuple[str, str]:
    """``"a.parametrizations.weight.0._u"`` -> ``("a.parametrizations.weight.", "0._u")``."""
    head, marker, tail = key.partition("parametrizations.")
    if not marker or (head and not head.endswith(".")):
        return "", key
    tensor_name, _, rest = tail.partition(".")
    return f"{head}parametrizations.{tensor_name}.", rest


def _owner(layer: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, tensor_name = key.rpartition(".")
    return (layer.get_submodule(path) if path else layer), tensor_name


def _unparametrize(owner: nn.Module, tensor_name: str, plain: Tensor) -> None:
    """Remove the parametrization of ``owner.<tensor_name>``; ``plain`` becomes the tensor.

    ``plain`` is the parametrization's ``original`` (baked in place) or, for a tied weight,
    a copy of its own.

    Unlike ``torch.nn.utils.parametrize.remove_parametrizations``, this never edits the
    parametrized class, which ``copy.deepcopy`` shares between a module and its copies:
    the module gets the original class back, or a fresh copy of its parametrized class
    without this tensor when other tensors stay parametrized.
    """
    parametrizations = owner.parametrizations
    assert isinstance(parametrizations, nn.ModuleDict)
    cls = type(owner)
    if len(parametrizations) > 1:
        namespace = {
            k: v for k, v in vars(cls).items() if k not in (tensor_name, "__dict__", "__weakref__")
        }
        owner.__class__ = type(cls.__name__, cls.__bases__, namespace)
        del parametrizations[tensor_name]
    else:
        owner.__class__ = cls.__bases__[0]
        del owner._modules["parametrizations"]
    if isinstance(plain, nn.Parameter):
        owner.register_parameter(tensor_name, plain)
    else:
        owner.register_buffer(tensor_name, plain)


def _reorder(owner: nn.Module, order: tuple[str, ...]) -> None:
    """Put ``owner``'s parameters and buffers back in their order before patching."""
    rank = {name: i for i, name in enumerate(order)}

    def key(name: str) -> int:
        return rank.get(name, len(rank))

    parameters = sorted(owner._parameters.items(), key=lambda item: key(item[0]))
    owner._parameters.clear()
    owner._parameters.update(parameters)
    buffers = sorted(owner._buffers.items(), key=lambda item: key(item[0]))
    owner._buffers.clear()
    owner._buffers.update(buffers)


def _find_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SnapshotMismatchError(
            f"the snapshot has layer {name!r}, which the model doesn't have"
        ) from None


def _tied_tensor(
    model: nn.Module, label: str, key: str, tied: str, current: Tensor | None
) -> Tensor:
    """The tensor a tied weight shares (at ``tied`` in ``model``), checked against ``current``."""
    path, _, name = tied.rpartition(".")
    try:
        holder = model.get_submodule(path)
    except AttributeError:
        holder = None
    shared = None if holder is None else holder._parameters.get(name, holder._buffers.get(name))
    if not isinstance(shared, Tensor) or (
        isinstance(current, Tensor)
        and (shared.shape != current.shape or shared.dtype != current.dtype)
    ):
        raise SnapshotMismatchError(
            f"{label}: {key!r} was tied to {tied!r}, which the model doesn't have "
            f"as a tensor of the same shape and dtype"
        )
    return shared


def _plan_restore(
    model: nn.Module, name: str, weights: Mapping[str, Mapping[str, Any]]
) -> tuple[nn.Module, list[tuple[str, str, Tensor, Tensor, SpectralNorm]]]:
    """Check one layer of a snapshot against the model and build its parametrizations."""
    layer = _find_layer(model, name)
    label = (
        f"layer {name!r} ({type(layer).__name__})"
        if name
        else f"the model ({type(layer).__name__})"
    )
    if spectral_norms(layer):
        raise AlreadyPatchedError(f"{label} has spectral normalization already; nothing restored")
    # The snapshot says which tensors were normalized (the defaults or ``tensors``'s).
    available = layer_tensors(layer)
    unknown = sorted(set(weights) - set(available))
    if unknown:
        raise SnapshotMismatchError(
            f"the snapshot has weights {sorted(weights)} for {label}, which has no "
            f"{', '.join(repr(k) for k in unknown)}; its tensors: "
            + ", ".join(repr(k) for k in available)
        )
    plan = []
    for key, record in weights.items():
        owner, tensor_name = _owner(layer, key)
        parameter = owner._parameters.get(tensor_name, owner._buffers.get(tensor_name))
        original = record["original"]
        if record.get("tied") is not None:
            parameter = _tied_tensor(model, label, key, record["tied"], parameter)
        if parametrize.is_parametrized(owner, tensor_name) or not isinstance(parameter, Tensor):
            raise SnapshotMismatchError(
                f"{label} has no plain tensor {key!r} to restore into "
                f"(found {type(getattr(owner, tensor_name, None)).__name__})"
            )
        if parameter.shape != original.shape or parameter.dtype != original.dtype:
            raise SnapshotMismatchError(
                f"{label}: {key!r} is {parameter.dtype} {tuple(parameter.shape)} in the model "
                f"but {original.dtype} {tuple(original.shape)} in the snapshot"
            )
        kind = NORM_KINDS.get(record["kind"])
        if kind is None:
            raise SnapshotMismatchError(
                f"{label}: unknown normalization kind {record['kind']!r} in the snapshot"
            )
        buffers = {n: b.to(parameter.device, copy=True) for n, b in record["buffers"].items()}
        norm = kind.from_config(record["config"], buffers)
        path, _, _ = key.rpartition(".")
        plan.append((path, tensor_name, parameter, original, norm))
    return layer, plan
