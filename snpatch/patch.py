"""Apply spectral normalization to a whole model, find it again, and retarget it.

Each selected layer gets a ``torch.nn.utils.parametrize`` parametrization
(:class:`~snpatch.parametrization.SpectralNorm`) on each weight it uses, and one forward
pre-hook (:class:`PowerIterationHook`, also the marker by which patched layers are found)
that advances the power iteration of those weights in training mode. In eval mode a layer
parks the hook outside its hook table where it has nothing to do (see :func:`_park`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm

from ._compat import (
    ConvNd,
    TorchSpectralNorm,
    forward_pre_hook_tables,
    keeping_gradient_accumulators,
    load_state_dict_hook_tables,
    unwrap_hook,
)
from .distributed import check_not_wrapped, gathered
from .engine import Cohort, installed, original_tensor, step_norms
from .errors import (
    AlreadyPatchedError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    ParametrizationRemovedError,
    SerializationError,
    SharedWeightError,
    SnpatchWarning,
    UnsupportedLayerError,
)
from .operator import ConvSpec, OperatorNorm, is_conv
from .parametrization import Mode, SpectralNorm, in_backward_pass, in_functorch_transform
from .select import (
    LayerFilter,
    LayerTarget,
    Pattern,
    TensorRules,
    TensorSpec,
    check_model,
    default_dim,
    default_targets,
    resolve_selection,
    select_from,
    tensor_targets,
)

__all__ = [
    "PowerIterationHook",
    "SpectralNormConfig",
    "apply_spectral_norm",
    "is_patched",
    "patched_layers",
    "set_lipschitz",
    "spectral_norms",
    "update_sigma",
]

T_module = TypeVar("T_module", bound=nn.Module)

Method = Literal["matrix", "operator"]

_MODES = ("hard", "soft")
_METHODS = ("matrix", "operator")


def check_lipschitz(lipschitz: object) -> float:
    """A finite positive real number, as float."""
    if isinstance(lipschitz, bool) or not isinstance(lipschitz, numbers.Real):
        raise InvalidArgumentTypeError(
            f"lipschitz must be a real number, got {type(lipschitz).__name__}: {lipschitz!r}"
        )
    value = float(lipschitz)
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgumentError(f"lipschitz must be finite and > 0, got {lipschitz!r}")
    return value


@dataclass(frozen=True)
class SpectralNormConfig:
    """The options of one spectral normalization, validated once on construction.

    Args:
        lipschitz: target bound ``c`` on each layer's top singular value.
        mode: ``"hard"`` (``W * c / sigma``) or ``"soft"`` (``W / max(1, sigma / c)``).
        n_power_iterations: block power-iteration steps per training forward (>= 0).
        eps: lower bound on ``sigma`` in the division (>= 0).
        method: ``"matrix"`` or ``"operator"`` (convolutions: their operator norm).
        certified: divide by a certified upper bound instead of an estimate.

    Raises:
        ValueError: a value is out of range (the message names it).
        TypeError: a value has the wrong type.
    """

    lipschitz: float = 1.0
    mode: Mode = "hard"
    n_power_iterations: int = 1
    eps: float = 1e-12
    method: Method = "matrix"
    certified: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lipschitz", check_lipschitz(self.lipschitz))
        if self.mode not in _MODES:
            raise InvalidArgumentError(f"mode must be 'hard' or 'soft', got {self.mode!r}")
        n = self.n_power_iterations
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise InvalidArgumentTypeError(
                f"n_power_iterations must be an int, got {type(n).__name__}: {n!r}"
            )
        if n < 0:
            raise InvalidArgumentError(f"n_power_iterations must be >= 0, got {n}")
        object.__setattr__(self, "n_power_iterations", int(n))
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise InvalidArgumentTypeError(
                f"eps must be a real number, got {type(eps).__name__}: {eps!r}"
            )
        if not (math.isfinite(float(eps)) and eps >= 0):
            raise InvalidArgumentError(f"eps must be finite and >= 0, got {eps!r}")
        object.__setattr__(self, "eps", float(eps))
        if self.method not in _METHODS:
            raise InvalidArgumentError(
                f"method must be 'matrix' or 'operator', got {self.method!r}"
            )
        if not isinstance(self.certified, bool):
            raise InvalidArgumentTypeError(
                f"certified must be a bool, got {type(self.certified).__name__}: {self.certified!r}"
            )


def parametrization_list(owner: nn.Module, tensor_name: str) -> parametrize.ParametrizationList:
    """``owner.parametrizations[tensor_name]``, typed."""
    parametrizations = owner.parametrizations
    assert isinstance(parametrizations, nn.ModuleDict)
    found = parametrizations[tensor_name]
    assert isinstance(found, parametrize.ParametrizationList)
    return found


class PowerIterationHook:
    """Forward pre-hook that advances the power iteration of a patched layer's weights.

    It runs where the weights are used: for ``nn.MultiheadAttention`` it is registered on
    the attention module and also advances ``out_proj.weight``, whose ``forward`` the
    attention never calls. Its class marks snpatch's patched layers.

    Args:
        targets: ``(submodule path relative to the layer, tensor name)`` pairs.
    """

    def __init__(self, targets: Sequence[tuple[str, str]], observes: bool = False) -> None:
        self.targets = tuple(targets)
        # Whether a target is an OperatorNorm, which records input sizes in every mode.
        self.observes = observes

    def __call__(self, module: nn.Module, args: tuple[object, ...]) -> None:
        # Advance once per new weight value: not when activation checkpointing
        # recomputes the forward during backward, and not under torch.func transforms,
        # which forbid the in-place update (see in_backward_pass, in_functorch_transform).
        if not (module.training or self.observes):
            return  # the common eval case first: no torch._C query per layer
        if in_backward_pass() or in_functorch_transform():
            return
        norms = list(self.norms(module))
        if self.observes:
            for _, norm, original in norms:
                if isinstance(norm, OperatorNorm):
                    # In eval mode too: the first (or a larger) input size is estimated anew.
                    norm.observe(original, args)
        if not module.training:
            return
        # Compiled: a step at every training forward (see SpectralNorm.advance).
        compiling = torch.compiler.is_compiling()
        for _, norm, original in norms:
            if compiling:
                norm.power_step(original)
            else:
                norm.advance(original)

    def norms(
        self, layer: nn.Module, *, removed_ok: bool = False
    ) -> Iterator[tuple[str, SpectralNorm, Tensor]]:
        """``(tensor path, parametrization, original weight)`` for each target of ``layer``.

        Raises:
            ParametrizationRemovedError: a target's normalization was taken off outside
                snpatch (unless ``removed_ok``, which skips that target).
        """
        for path, tensor_name in self.targets:
            owner = layer.get_submodule(path) if path else layer
            key = f"{path}.{tensor_name}" if path else tensor_name
            found = _normalized(owner, tensor_name)
            if found is None:
                if removed_ok:
                    continue
                raise ParametrizationRemovedError(
                    f"the spectral normalization of {type(layer).__name__}'s {key!r} was "
                    "removed outside snpatch (e.g. by torch.nn.utils.parametrize."
                    "remove_parametrizations), but snpatch's hook is still on the layer: "
                    "call snpatch.remove_spectral_norm(model) to take off the rest, then "
                    "snpatch.apply_spectral_norm to patch again if wanted"
                )
            yield key, *found


def _normalized(owner: nn.Module, tensor_name: str) -> tuple[SpectralNorm, Tensor] | None:
    """snpatch's norm on ``owner``'s ``tensor_name`` and the original tensor, if it is there."""
    found = installed(owner, tensor_name)
    if found is None or not isinstance(found[0], SpectralNorm):
        return None
    return found[0], found[1]


def layer_targets(
    module: nn.Module, tensors: TensorRules | None = None, name: str = ""
) -> list[LayerTarget]:
    """The weights to normalize in ``module`` (named ``name``): by ``tensors``, or the defaults.

    Raises:
        NoMatchingTensorsError: a name of its ``tensors`` entry matches none of its tensors.
    """
    names = tensors.rule_for(module) if tensors is not None else None
    if names is None:
        return default_targets(module)
    return tensor_targets(name, module, names)


@dataclass(frozen=True)
class TensorSlot:
    """One place where a module holds a tensor: ``module._parameters[name]`` or ``_buffers``."""

    qualified_name: str
    module: nn.Module
    name: str

    def label(self) -> str:
        """The name users know: ``a.weight`` for ``a.parametrizations.weight.original``."""
        head, marker, tail = self.qualified_name.rpartition("parametrizations.")
        if marker and isinstance(self.module, parametrize.ParametrizationList):
            return f"{head}{tail.removesuffix('.original')}"
        return self.qualified_name

    def normalized(self) -> bool:
        """Whether this is the original of a weight that snpatch normalizes."""
        return (
            isinstance(self.module, parametrize.ParametrizationList)
            and self.name == "original"
            and any(isinstance(p, SpectralNorm) for p in self.module)
        )


def tensor_slots(model: nn.Module) -> dict[int, list[TensorSlot]]:
    """Every parameter and buffer slot of ``model``, by the ``id`` of the tensor it holds.

    Each module is visited once (a module used twice is one reader), so a tensor with two
    slots is read by two modules: tied weights, e.g. a language model's output layer and
    its input embedding.
    """
    slots: dict[int, list[TensorSlot]] = {}
    for prefix, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    qualified = f"{prefix}.{name}" if prefix else name
                    slots.setdefault(id(tensor), []).append(TensorSlot(qualified, module, name))
    return slots


def _check_not_shared(model: nn.Module, weights: Sequence[tuple[str, Tensor]]) -> None:
    """Refuse two selected weights that are one tensor, or one already normalized.

    snpatch normalizes a tensor through one layer: a second parametrization of the same
    tensor could not be removed without changing what the first one reads.
    """
    slots = tensor_slots(model)
    seen: dict[int, str] = {}
    for label, weight in weights:
        if id(weight) in seen:
            raise SharedWeightError(
                f"{seen[id(weight)]!r} and {label!r} are one tensor (tied weights); snpatch "
                "normalizes a shared tensor through one layer only: exclude one of them"
            )
        seen[id(weight)] = label
        for slot in slots.get(id(weight), []):
            if slot.normalized():
                raise SharedWeightError(
                    f"{label!r} is the same tensor as {slot.label()!r} (tied weights), which "
                    "is spectrally normalized already; snpatch normalizes a shared tensor "
                    "through one layer only: exclude this layer"
                )


def _existing_normalization(owner: nn.Module, tensor_name: str) -> str | None:
    """Which spectral normalization already acts on ``owner.<tensor_name>``, if any."""
    if parametrize.is_parametrized(owner, tensor_name):
        for parametrization in parametrization_list(owner, tensor_name):
            if isinstance(parametrization, SpectralNorm):
                return "snpatch"
            if isinstance(parametrization, TorchSpectralNorm):
                return "torch.nn.utils.parametrizations.spectral_norm"
    for hook in forward_pre_hook_tables(owner)[0].values():
        if isinstance(hook, _LegacySpectralNorm) and hook.name == tensor_name:
            return "torch.nn.utils.spectral_norm"
    return None


def _check_target(layer_name: str, layer: nn.Module, target: LayerTarget) -> Tensor:
    """Every reason not to patch this weight, raised before anything changes."""
    full = f"{layer_name}.{target.path}" if target.path else layer_name
    label = (
        f"layer {full!r} ({type(layer).__name__})"
        if full
        else f"the model ({type(layer).__name__})"
    )
    owner = layer.get_submodule(target.path) if target.path else layer
    existing = _existing_normalization(owner, target.tensor_name)
    if existing is not None:
        raise AlreadyPatchedError(
            f"{label} already has spectral normalization ({existing}) on "
            f"{target.tensor_name!r}; remove it first or exclude this layer"
        )
    if parametrize.is_parametrized(owner, target.tensor_name):
        kinds = [type(p).__name__ for p in parametrization_list(owner, target.tensor_name)]
        raise UnsupportedLayerError(
            f"{label} already has a parametrization on {target.tensor_name!r} "
            f"({', '.join(kinds)}); "
            "snpatch only normalizes plain weights"
        )
    weight = getattr(owner, target.tensor_name, None)
    if isinstance(weight, UninitializedParameter):
        raise UnsupportedLayerError(
            f"{label} is a lazy layer whose {target.tensor_name!r} is not initialized yet; "
            "run one forward pass through the model before patching"
        )
    if not isinstance(weight, Tensor):
        raise UnsupportedLayerError(
            f"{label} has no tensor {target.tensor_name!r} to normalize "
            f"(got {type(weight).__name__})"
        )
    if weight.dim() < 2:
        raise UnsupportedLayerError(
            f"{label} has a {weight.dim()}-D {target.tensor_name!r} "
            f"of shape {tuple(weight.shape)}; "
            "spectral normalization needs a weight with at least 2 dimensions"
        )
    if not weight.is_floating_point():
        raise UnsupportedLayerError(
            f"{label} has a {weight.dtype} {target.tensor_name!r}; only floating-point weights "
            "can be normalized"
        )
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        raise InvalidArgumentError(
            f"{label} has non-finite values (NaN or inf) in {target.tensor_name!r}"
        )
    return weight


def apply_spectral_norm(
    model: T_module,
    include: Pattern | None = None,
    exclude: Pattern | None = None,
    *,
    lipschitz: float = 1.0,
    mode: Mode = "hard",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    layer_types: Sequence[type[nn.Module]] | None = None,
    method: Method = "matrix",
    certified: bool = False,
    example_inputs: Sequence[object] | None = None,
    tensors: Mapping[type[nn.Module], TensorSpec] | None = None,
) -> T_module:
    """Put spectral normalization on the matching layers of ``model``, in place.

    Each selected ``Linear``, ``Conv*d``, ``ConvTranspose*d`` (and subclasses) gets its
    ``weight`` reparametrized as ``weight * lipschitz / sigma`` (``mode="hard"``) or
    ``weight / max(1, sigma / lipschitz)`` (``mode="soft"``), where ``sigma`` is the top
    singular value of the weight viewed as a matrix. ``nn.MultiheadAttention`` gets the
    same on ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``out_proj.weight``, and so
    do the linear layers of :data:`snpatch.LINEAR_LIKE_LAYERS` (transformers' ``Conv1D``,
    with ``dim=1``). Patching the whole model (``include`` and ``layer_types`` None) warns
    with a :class:`~snpatch.SnpatchWarning` naming each other layer with a weight of 2 or
    more dimensions that stays unnormalized (``nn.Embedding`` aside); an exclude name
    pattern matching such a layer silences it.

    ``tensors`` normalizes other tensors than these, as torch's
    ``spectral_norm(module, name=..., dim=...)`` does: ``tensors={nn.LSTM: "weight_*",
    nn.Embedding: "weight", MyLayer: snpatch.TensorNames("kernel", dim=1)}``. A layer follows
    the entry of its own class or else of its nearest base class in it; every type in it is
    eligible (in addition to ``layer_types``), selected by ``include``/``exclude`` as any
    layer, and everything below holds for its tensors as for ``weight``.

    The original weight stays the same ``Parameter`` object (at
    ``layer.parametrizations.weight.original``), so an optimizer built before keeps
    working, and the ``state_dict`` layout is that of
    ``torch.nn.utils.parametrizations.spectral_norm``. The estimate of ``sigma`` starts
    converged (within 0.1% of the exact value) and is tracked by a block power iteration
    in each training-mode forward; eval mode changes no state.

    Args:
        model: any ``nn.Module``.
        include: pattern(s) or a predicate selecting layers (see :mod:`snpatch.select`);
            None selects every eligible layer.
        exclude: pattern(s) or a predicate removing layers; exclude wins over include.
        lipschitz: target bound on each layer's top singular value (finite, > 0).
        mode: ``"hard"`` or ``"soft"``.
        n_power_iterations: block power-iteration steps per training forward (>= 0).
        eps: lower bound on ``sigma`` in the division (>= 0).
        layer_types: eligible layer classes (default :data:`snpatch.DEFAULT_LAYER_TYPES` and
            the layers of :data:`snpatch.LINEAR_LIKE_LAYERS`).
        method: ``"matrix"`` (the kernel viewed as a matrix, torch's convention) or
            ``"operator"``: convolutions are divided by their l2 operator norm on the
            largest input size they have received (see :class:`snpatch.OperatorNorm`);
            other layers as with ``"matrix"``.
        certified: divide by a certified upper bound (:func:`snpatch.lipschitz_bound`) so
            that each layer's Lipschitz constant is guaranteed <= ``lipschitz``; needs
            ``method="operator"`` when convolutions are selected.
        example_inputs: positional arguments for one forward of ``model``, run before
            patching in eval mode under ``no_grad`` (training flags restored) to record
            each convolution's input size for ``method="operator"``.
        tensors: per layer type, which of its tensors to normalize: a name, a glob
            (``"weight_hh_l*"``), a ``re:`` regular expression, a list of them, or
            :class:`snpatch.TensorNames` with a ``dim`` (default: 0, or 1 for
            ``ConvTranspose*d``, as torch's). Names match the layer's own parameters and
            buffers (and ``out_proj.weight`` of an attention); each must match one of
            every selected layer of that type. A type that no layer of the model follows
            gives a :class:`~snpatch.SnpatchWarning`.

    Returns:
        ``model`` itself, patched.

    Raises:
        TypeError: ``model`` is not a module, or an argument has the wrong type.
        ValueError: an argument value is out of range, or a layer's weight is not finite.
        NoMatchingLayersError: an include pattern matched nothing, or nothing is selected.
        NoMatchingTensorsError: a name in ``tensors`` matches no tensor of a selected layer
            of its type (the message lists the tensors it has, the closest first).
        AlreadyPatchedError: a selected layer already has spectral normalization.
        UnsupportedLayerError: a selected layer is lazy or has no usable weight.
        SharedWeightError: two selected layers share one weight tensor, or a selected
            layer's weight is already normalized through another layer (tied weights).
        WrappedModelError: the model is already wrapped in ``DistributedDataParallel`` or
            sharded by ``fully_shard`` (patch first, then wrap or shard).

    On any error the model is left exactly as it was.

    Example:
        >>> import torch, torchvision, snpatch
        >>> model = torchvision.models.resnet18(weights=None)
        >>> model = snpatch.apply_spectral_norm(model, exclude="fc", lipschitz=2.0)
        >>> len(snpatch.patched_layers(model))
        20
    """
    config = SpectralNormConfig(lipschitz, mode, n_power_iterations, eps, method, certified)
    rules = TensorRules.parse(tensors)
    layers = resolve_selection(model, include, exclude, layer_types, rules)
    check_not_wrapped(layers)
    plans = []
    for name, layer in layers:
        targets = layer_targets(layer, rules, name)
        plans.append((layer, targets, [_check_target(name, layer, t) for t in targets]))
        if config.certified and config.method == "matrix" and is_conv(layer):
            raise InvalidArgumentError(
                f"certified=True bounds a convolution's operator norm, but layer {name!r} "
                f"({type(layer).__name__}) would be normalized by its matrix norm; "
                "pass method='operator'"
            )
        if config.method == "operator" and is_conv(layer):
            dim = default_dim(layer, "weight")
            if any(t.key == "weight" and t.dim != dim for t in targets):
                raise InvalidArgumentError(
                    f"method='operator' normalizes layer {name!r} ({type(layer).__name__}) by "
                    f"its convolution, whose outputs are on dim {dim} of 'weight'; leave "
                    "TensorNames(dim=None) for it, or pass method='matrix'"
                )
    _check_not_shared(
        model,
        [
            (".".join(p for p in (name, t.path, t.tensor_name) if p), weight)
            for (name, _), (_, targets, weights) in zip(layers, plans, strict=True)
            for t, weight in zip(targets, weights, strict=True)
        ],
    )
    sizes = record_input_sizes(model, layers, example_inputs)
    # Everything that can fail is computed before the model is touched.
    built = [
        (
            layer,
            targets,
            [
                _build(weight, target, config, layer, sizes.get(id(layer)))
                for weight, target in zip(weights, targets, strict=True)
            ],
        )
        for layer, targets, weights in plans
    ]
    cohort = Cohort()
    for layer, targets, norms in built:
        install(layer, [(t.path, t.tensor_name) for t in targets], norms, cohort)
    return model


def _with_eval_cache(tensor_name: str, parametrized: property) -> property:
    """``parametrized`` (torch's property for the tensor), serving the eval cache directly.

    ``torch.nn.utils.parametrize`` computes the tensor through two module calls on every
    access, which costs several times a small layer's whole eval forward. While
    :meth:`SpectralNorm.cached_weight` has a valid cached weight, this returns it without
    them; otherwise (training, gradients needed, a stale cache, another parametrization
    stacked on top) it is torch's property unchanged.
    """
    compute = parametrized.fget
    assert compute is not None

    def get(module: nn.Module) -> Tensor:
        parametrizations = module._modules["parametrizations"]._modules[tensor_name]  # type: ignore[union-attr]
        assert isinstance(parametrizations, parametrize.ParametrizationList)
        stack = parametrizations._modules
        if len(stack) == 1:
            norm = stack["0"]
            # Every eval access comes here, so the cheapest tests go first.
            if isinstance(norm, SpectralNorm) and norm._cache is not None and not norm.training:
                cached = norm.cached_weight(original_tensor(parametrizations))
                if cached is not None:
                    return cached
        return compute(module)  # type: ignore[no-any-return]

    return property(get, parametrized.fset, parametrized.fdel, parametrized.__doc__)


def install(
    layer: nn.Module,
    targets: Sequence[tuple[str, str]],
    norms: Sequence[nn.Module],
    cohort: Cohort,
) -> None:
    """Register ``norms`` on the ``(path, tensor name)`` targets of ``layer``, and its hooks.

    The one place that changes a layer into a patched one (used by apply and restore).
    ``cohort`` gets the norms: the weights patched (or restored) together step together.
    """
    adapter = CheckpointAdapter()
    for (path, tensor_name), norm in zip(targets, norms, strict=True):
        owner = layer.get_submodule(path) if path else layer
        adapter.tensor_order.setdefault(path, (*owner._parameters, *owner._buffers))
        with keeping_gradient_accumulators():
            parametrize.register_parametrization(owner, tensor_name, norm, unsafe=True)
        # torch made this class for ``owner`` alone; its default message for pickling
        # doesn't say what to do with a spectrally normalized model.
        cls = type(owner)
        cls.__getstate__ = _refuse_pickling  # type: ignore[method-assign]
        setattr(cls, tensor_name, _with_eval_cache(tensor_name, getattr(cls, tensor_name)))
        if isinstance(norm, SpectralNorm):
            cohort.add(owner, tensor_name, norm)
    observes = any(isinstance(norm, OperatorNorm) for norm in norms)
    layer.register_forward_pre_hook(PowerIterationHook(targets, observes))
    layer.register_load_state_dict_pre_hook(adapter.before_load)  # type: ignore[no-untyped-call]
    layer.register_load_state_dict_post_hook(adapter.after_load)  # type: ignore[no-untyped-call]
    if not observes and any(not path for path, _ in targets):
        # The layer's class is torch's, made for this layer alone when it was parametrized.
        cls = type(layer)
        base: type[nn.Module] = cls.__mro__[1]
        cls.train = _parking_train(base.train)  # type: ignore[method-assign,assignment]
        if not layer.training:
            _park(layer)


#: Where a layer in eval mode keeps its :class:`PowerIterationHook` (see :func:`_park`).
_PARKED = "_snpatch_parked_hook"


def _parking_train(train: Callable[[nn.Module, bool], nn.Module]) -> Callable[..., nn.Module]:
    """The class's ``train``, then the pre-hook parked in eval mode and put back in training."""

    def parking_train(self: nn.Module, mode: bool = True) -> nn.Module:
        result = train(self, mode)
        if self.training:
            _unpark(self)
        else:
            _park(self)
        return result

    return parking_train


def _park(layer: nn.Module) -> None:
    """Take the pre-hook out of the hook table while the layer is in eval mode.

    In eval mode the hook does nothing (matrix mode: no input sizes to observe), but a
    module with any forward pre-hook takes ``nn.Module.__call__``'s general path, several
    microseconds a call (``snpatch bench mlp``, 8 ``Linear(512, 512)`` at batch 1: eval
    1.248x the unpatched model with the hook, 1.168x parked). Only a hook alone in its
    table is parked: with others there the general path is taken anyway. Parked, it stays
    the layer's marker (:func:`_hook`).
    """
    hooks, with_kwargs = forward_pre_hook_tables(layer)
    if len(hooks) != 1:
        return
    key, hook = next(iter(hooks.items()))
    if isinstance(hook, PowerIterationHook) and not hook.observes and key not in with_kwargs:
        del hooks[key]
        layer.__dict__[_PARKED] = (key, hook)


def _unpark(layer: nn.Module) -> None:
    """Put a parked pre-hook back (training mode), where it would have been.

    It was alone, so it goes before the hooks registered since, except those registered
    with kwargs: ``fully_shard`` registers its unsharding pre-hook with kwargs and
    ``prepend=True``, and the step must see the unsharded weight.
    """
    parked = layer.__dict__.pop(_PARKED, None)
    if parked is None:
        return
    key, hook = parked
    hooks, with_kwargs = forward_pre_hook_tables(layer)
    entries = list(hooks.items())
    hooks.clear()
    hooks.update([e for e in entries if e[0] in with_kwargs])
    hooks[key] = hook
    hooks.update([e for e in entries if e[0] not in with_kwargs])


def uninstall_hooks(layer: nn.Module) -> None:
    """Remove the hooks :func:`install` added to ``layer`` (found by their classes)."""
    layer.__dict__.pop(_PARKED, None)
    for hooks in forward_pre_hook_tables(layer):
        for key in [k for k, hook in hooks.items() if isinstance(hook, PowerIterationHook)]:
            del hooks[key]
    for hooks in load_state_dict_hook_tables(layer):
        for key in [k for k, hook in hooks.items() if _adapter_of(hook) is not None]:
            del hooks[key]


def checkpoint_adapter(layer: nn.Module) -> CheckpointAdapter | None:
    """The :class:`CheckpointAdapter` that :func:`install` registered on ``layer``, if any."""
    for hook in load_state_dict_hook_tables(layer)[1].values():
        adapter = _adapter_of(hook)
        if adapter is not None:
            return adapter
    return None


def _adapter_of(hook: object) -> CheckpointAdapter | None:
    method = unwrap_hook(hook)  # both are bound methods
    owner = getattr(method, "__self__", None)
    return owner if isinstance(owner, CheckpointAdapter) else None


def _refuse_pickling(self: nn.Module) -> object:
    raise SerializationError(
        f"can't pickle {type(self).__name__}: it carries a torch.nn.utils.parametrize "
        "parametrization (snpatch's spectral normalization), which torch only serializes "
        "through state_dict(). Save model.state_dict() (it loads back into a patched model), "
        "snpatch.plain_state_dict(model) (loads into the unpatched architecture), or call "
        "torch.save(model) inside `with snpatch.exported(model):`"
    )


class CheckpointAdapter:
    """``load_state_dict`` hooks of a patched layer: accept other layouts, then re-fit.

    Before loading, per weight of the layer, it renames the keys of an unpatched
    checkpoint (``weight``) and of the legacy ``torch.nn.utils.spectral_norm``
    (``weight_orig``, ``weight_u``, ``weight_v``) to the patched layout. Its own layout
    (torch's ``parametrizations.spectral_norm`` layout) needs nothing. Keys in none of these
    forms are left alone, so ``strict=True`` reports them as torch would.

    After loading, each weight whose ``u``/``v`` came from the checkpoint keeps them (eval
    outputs are exactly those saved) and only the tracked block is re-fitted; a weight
    loaded without them is re-estimated to full accuracy. So is a non-zero weight whose
    loaded vectors give ``u^T W v <= 0`` (vectors never iterated for this weight, as in a
    legacy ``torch.nn.utils.spectral_norm`` model saved before any training forward): torch
    divides by that value, which flips the weight's sign and bounds nothing; snpatch warns
    (:class:`~snpatch.SnpatchWarning`) and normalizes the loaded weight properly instead.
    """

    def __init__(self) -> None:
        self.pending: set[str] = set()
        self.prefix = ""  # the layer's state_dict prefix in the last load (for messages)
        # Each owner's parameter and buffer names before patching, by path in the layer:
        # removal puts ``weight`` back in its place (parameters() and state_dict order).
        self.tensor_order: dict[str, tuple[str, ...]] = {}

    def before_load(
        self,
        layer: nn.Module,
        state_dict: dict[str, Tensor],
        prefix: str,
        *args: object,
    ) -> None:
        hook = _hook(layer)
        if hook is None:
            return
        self.prefix = prefix
        for key, norm, _ in hook.norms(layer):
            saved = norm.state_dict(keep_vars=True).keys()  # its persistent buffers
            path, _, tensor_name = key.rpartition(".")
            base = f"{prefix}{path}." if path else prefix
            patched = f"{base}parametrizations.{tensor_name}."
            if f"{patched}original" in state_dict:
                # A checkpoint of the other method (matrix <-> operator) lacks the derived
                # state of this one: placeholders now, re-estimated after loading.
                missing = [
                    name for name in saved - {"_u", "_v"} if f"{patched}0.{name}" not in state_dict
                ]
                for name in missing:
                    state_dict[f"{patched}0.{name}"] = getattr(norm, name)
                if missing:
                    self.pending.add(key)
                continue
            if f"{base}{tensor_name}" in state_dict:
                state_dict[f"{patched}original"] = state_dict.pop(f"{base}{tensor_name}")
                # Placeholders for strict=True; after_load re-estimates them.
                for name in saved:
                    state_dict.setdefault(f"{patched}0.{name}", getattr(norm, name))
                self.pending.add(key)
            elif f"{base}{tensor_name}_orig" in state_dict:
                state_dict[f"{patched}original"] = state_dict.pop(f"{base}{tensor_name}_orig")
                legacy = [f"{base}{tensor_name}_u", f"{base}{tensor_name}_v"]
                if all(k in state_dict for k in legacy) and norm.kind == "matrix":
                    state_dict[f"{patched}0._u"] = state_dict.pop(legacy[0])
                    state_dict[f"{patched}0._v"] = state_dict.pop(legacy[1])
                else:
                    for name in saved:
                        state_dict.setdefault(f"{patched}0.{name}", getattr(norm, name))
                    for k in legacy:
                        state_dict.pop(k, None)
                    self.pending.add(key)

    def after_load(self, layer: nn.Module, incompatible_keys: object) -> None:
        hook = _hook(layer)
        pending, self.pending = self.pending, set()
        if hook is None:
            return
        for key, norm, original in hook.norms(layer):
            if key in pending:
                norm.converge(original)
                continue
            divisor = _loaded_divisor(norm, original)
            if divisor is not None and divisor <= 0 and bool(original.detach().ne(0).any()):
                norm.converge(original)
                warnings.warn(
                    f"load_state_dict: the checkpoint's u and v for {self.prefix + key!r} give "
                    f"u^T W v = {divisor:.4g} <= 0: they were never iterated for this weight "
                    "(e.g. a torch.nn.utils.spectral_norm model saved before any training "
                    "forward). torch divides the weight by that value, which flips its sign "
                    "and bounds nothing; snpatch re-estimated u and v for the loaded weight "
                    "instead, so eval outputs differ from those of the saved model",
                    SnpatchWarning,
                    stacklevel=2,
                )
            else:
                norm.refit_block(original)


def _loaded_divisor(norm: SpectralNorm, original: Tensor) -> float | None:
    """``u^T W v``, torch's divisor, for the loaded vectors (None for operator norms)."""
    if isinstance(norm, OperatorNorm) and (norm.certified or norm.input_size is not None):
        return None
    # A DTensor under fully_shard: every rank gathers.
    return float(norm._torch_estimate(gathered(original)))


def _build(
    weight: Tensor,
    target: LayerTarget,
    config: SpectralNormConfig,
    layer: nn.Module,
    input_size: tuple[int, ...] | None,
) -> SpectralNorm:
    # The operator norm is that of the convolution: only its kernel (``tensors`` may name others).
    operator = config.method == "operator" and is_conv(layer) and target.key == "weight"
    options = {
        "dim": target.dim,
        "lipschitz": config.lipschitz,
        "mode": config.mode,
        "n_power_iterations": config.n_power_iterations,
        "eps": config.eps,
    }
    if operator or config.certified:
        return OperatorNorm(
            weight,
            conv=ConvSpec.of(layer) if operator else None,
            certified=config.certified,
            input_size=input_size if operator else None,
            **options,  # type: ignore[arg-type]
        )
    return SpectralNorm(weight, **options)  # type: ignore[arg-type]


def record_input_sizes(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    example_inputs: Sequence[object] | None,
) -> dict[int, tuple[int, ...]]:
    """Spatial input size of each convolution in ``layers`` (by ``id``) for one forward.

    The forward runs in eval mode under ``no_grad``; every module's training flag is
    restored and the hooks are removed, whatever happens. A layer called several times
    gets the elementwise largest size.
    """
    if example_inputs is None:
        return {}
    if isinstance(example_inputs, Tensor) or not isinstance(example_inputs, (tuple, list)):
        raise InvalidArgumentTypeError(
            "example_inputs must be a tuple of positional arguments for model(...), got "
            f"{type(example_inputs).__name__}; for a single tensor x pass (x,)"
        )
    sizes: dict[int, tuple[int, ...]] = {}

    def record(module: nn.Module, args: tuple[object, ...]) -> None:
        if args and isinstance(args[0], Tensor) and isinstance(module, ConvNd):
            size = tuple(args[0].shape[-len(module.kernel_size) :])
            old = sizes.get(id(module), size)
            sizes[id(module)] = tuple(max(a, b) for a, b in zip(size, old, strict=True))

    flags = {module: module.training for module in model.modules()}
    handles = [layer.register_forward_pre_hook(record) for _, layer in layers if is_conv(layer)]
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    except Exception as error:
        raise InvalidArgumentError(
            f"example_inputs: the model's forward failed ({type(error).__name__}: {error})"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
    return sizes


def _hook(module: nn.Module) -> PowerIterationHook | None:
    for hook in forward_pre_hook_tables(module)[0].values():
        if isinstance(hook, PowerIterationHook):
            return hook
    parked = module.__dict__.get(_PARKED)
    return None if parked is None else parked[1]


def patched_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` that carry snpatch's spectral normalization, by name.

    A patched ``nn.MultiheadAttention`` is one entry (its ``out_proj`` is part of it).

    Example:
        >>> import torch.nn as nn, snpatch
        >>> net = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        >>> list(snpatch.patched_layers(net))
        ['0']
    """
    check_model(model)
    return {name: module for name, module in model.named_modules() if _hook(module) is not None}


def spectral_norms(layer: nn.Module) -> dict[str, SpectralNorm]:
    """The :class:`SpectralNorm` parametrizations of one patched layer, by tensor path.

    Keys are the tensor names: ``"weight"``, ``"in_proj_weight"`` and ``"out_proj.weight"``
    for attention, or those ``tensors`` chose (``"weight_ih_l0"``, ...).
    Empty for a layer snpatch did not patch.
    """
    hook = _hook(layer)
    if hook is None:
        return {}
    return {key: norm for key, norm, _ in hook.norms(layer)}


def is_patched(module: nn.Module) -> bool:
    """True if ``module`` or any submodule carries snpatch's spectral normalization."""
    check_model(module)
    return any(isinstance(sub, SpectralNorm) or _hook(sub) is not None for sub in module.modules())


def set_lipschitz(
    model: T_module,
    lipschitz: float,
    include: Pattern | None = None,
    exclude: Pattern | None = None,
) -> T_module:
    """Change the target bound of already-patched layers, keeping their iteration state.

    Args:
        model: a model patched by :func:`apply_spectral_norm`.
        lipschitz: the new target (finite, > 0).
        include: pattern(s) or a predicate over the patched layers; None means all.
        exclude: pattern(s) or a predicate removing patched layers.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``lipschitz`` is out of range.
        NoMatchingLayersError: no patched layer is selected.
    """
    value = check_lipschitz(lipschitz)
    module = check_model(model)
    layers = select_from(
        module,
        list(patched_layers(module).items()),
        LayerFilter.parse(include, "include"),
        LayerFilter.parse(exclude, "exclude"),
        what="patched",
    )
    for _, layer in layers:
        for norm in spectral_norms(layer).values():
            norm.lipschitz = value
    return model


def update_sigma(model: T_module, steps: int | None = None) -> T_module:
    """Bring the sigma estimate of every patched layer up to date with its current weights.

    The power iteration normally advances once for each new value of a weight, at the first
    training-mode read of it. Call this where the weights change without one: after
    ``AveragedModel.update_parameters`` (EMA, SWA), whose copy of the iteration state is
    otherwise stale (or, with ``use_buffers=True``, averaged into non-unit vectors); after
    editing weights through ``.data`` (which bypasses the version counter that tells a new
    value); before computing per-sample gradients with ``torch.func``, where a training
    forward cannot update the state.

    Args:
        model: a model (or a module containing layers) patched by :func:`apply_spectral_norm`.
        steps: None re-estimates exactly, as :func:`apply_spectral_norm` does (an
            eigendecomposition per weight); an int >= 1 advances the iteration that many
            steps, as that many weight updates would (cheap; enough when the weights moved
            a little).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a module, or ``steps`` is not an int.
        ValueError: ``steps`` < 1.
        NoMatchingLayersError: the model has no patched layer.

    Example:
        >>> import torch, torch.nn as nn, snpatch
        >>> net = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(4, 4)))
        >>> ema = torch.optim.swa_utils.AveragedModel(net)
        >>> ema = snpatch.update_sigma(ema)
    """
    module = check_model(model)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral)):
        raise InvalidArgumentTypeError(
            f"steps must be an int or None, got {type(steps).__name__}: {steps!r}"
        )
    if steps is not None and steps < 1:
        raise InvalidArgumentError(f"steps must be >= 1 (or None for exact), got {steps}")
    layers = select_from(module, list(patched_layers(module).items()), None, None, what="patched")
    pending: list[tuple[SpectralNorm, Tensor]] = []
    for _, layer in layers:
        hook = _hook(layer)
        assert hook is not None
        for _, norm, original in hook.norms(layer):
            if steps is None:
                norm.converge(original)
            else:
                # (sharded by fully_shard: every rank calls this)
                pending.append((norm, gathered(original)))
    # Batched together, as a training step batches them: the same results, to the bit.
    for _ in range(steps or 0):
        step_norms(pending)
    return model
