"""Which layers and which of their tensors: eligibility by type and selection by name.

A pattern is a glob (``fnmatch.fnmatchcase``) on the dotted module name, or a regular
expression when it starts with ``re:`` (it must match the whole name). A pattern selects a
layer when it matches the layer's own name or the name of any of its ancestors, so
``"layer1"`` selects every eligible layer inside ``layer1``. A list of patterns is their
union; a callable ``(name, module) -> bool`` is asked about each eligible layer. Exclude
always wins over include.

Which tensors of a layer are normalized is ``weight`` by default (see :func:`default_targets`),
or what ``tensors={LayerType: names}`` says for that type (:class:`TensorNames`): names or
globs (or ``re:`` regular expressions) on the layer's own tensor names, each of which must
match at least one tensor of every selected layer of that type.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Union

from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from ._compat import ConvTransposeNd, packed_in_proj
from .errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NoMatchingLayersError,
    NoMatchingTensorsError,
    SnpatchWarning,
    UnsupportedLayerError,
)

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LINEAR_LIKE_LAYERS",
    "LayerFilter",
    "LayerTarget",
    "Pattern",
    "TensorNames",
    "TensorRules",
    "TensorSpec",
    "check_model",
    "default_targets",
    "eligible_layers",
    "is_linear",
    "linear_like_dim",
    "select_layers",
    "tensor_targets",
]

#: A pattern, a list of patterns, or a predicate on ``(name, module)``.
Pattern = str | Sequence[str] | Callable[[str, nn.Module], bool]

#: Layer types patched when ``layer_types`` is not given (subclasses count).
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MultiheadAttention,
)

#: Linear layers of other libraries, by the qualified name of their class (or of a base
#: class), with the dimension of their weight that holds the outputs (torch's ``dim``).
#: Recognised by name and weight shape, so their library is never imported. Selected when
#: ``layer_types`` is not given.
LINEAR_LIKE_LAYERS: Mapping[str, int] = MappingProxyType(
    {
        # transformers' GPT-2 / GPT / ... projections: weight (in, out), forward x @ W + b.
        "transformers.pytorch_utils.Conv1D": 1,
        "transformers.modeling_utils.Conv1D": 1,  # its home before transformers 4.20
    }
)

#: Layers with a weight of 2 or more dimensions that are lookups, not linear maps of the
#: input: never normalized, and not reported as skipped.
_LOOKUPS: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

_REGEX_PREFIX = "re:"


def check_model(model: object) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``, else raise a ``TypeError``."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentTypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}: {model!r:.80}"
        )
    return model


def linear_like_dim(module: nn.Module) -> int | None:
    """The output dimension of ``module``'s weight if it is one of :data:`LINEAR_LIKE_LAYERS`.

    Its class (or a base class) must have one of those qualified names, and its ``weight``
    must be 2-D, with a 1-D ``bias`` (if any) of the output size. None otherwise.
    """
    for cls in type(module).__mro__:
        dim = LINEAR_LIKE_LAYERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if dim is not None:
            break
    else:
        return None
    weight = module._parameters.get("weight")
    parametrizations = module._modules.get("parametrizations")
    if weight is None and isinstance(parametrizations, nn.ModuleDict):  # patched already
        weight = getattr(parametrizations._modules.get("weight"), "original", None)
    if not isinstance(weight, Tensor) or isinstance(weight, UninitializedParameter):
        return None
    bias = module._parameters.get("bias")
    if weight.dim() != 2 or (bias is not None and tuple(bias.shape) != (weight.shape[dim],)):
        return None
    return dim


def is_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` (or subclass) and for a recognised linear-like layer."""
    return isinstance(module, nn.Linear) or linear_like_dim(module) is not None


def check_layer_types(layer_types: object) -> tuple[type[nn.Module], ...]:
    """Validate ``layer_types`` (None means :data:`DEFAULT_LAYER_TYPES`)."""
    if layer_types is None:
        return DEFAULT_LAYER_TYPES
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    if not isinstance(layer_types, (list, tuple, set, frozenset)):
        raise InvalidArgumentTypeError(
            f"layer_types must be a sequence of nn.Module subclasses, got {layer_types!r}"
        )
    if not layer_types:
        raise InvalidArgumentError("layer_types is empty: it would select no layer")
    for item in layer_types:
        if not (isinstance(item, type) and issubclass(item, nn.Module)):
            raise InvalidArgumentTypeError(
                f"layer_types must hold nn.Module subclasses, got {item!r}"
            )
    return tuple(layer_types)


def _ancestry(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]``; the root (``""``) is only its own."""
    if not name:
        return [""]
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


@dataclass(frozen=True)
class _NamePattern:
    """One string pattern, compiled once."""

    text: str
    regex: re.Pattern[str] | None

    @classmethod
    def parse(cls, text: str, field: str) -> _NamePattern:
        if not text:
            raise InvalidArgumentError(f"{field} holds an empty pattern ''")
        if text.startswith(_REGEX_PREFIX):
            try:
                return cls(text, re.compile(text[len(_REGEX_PREFIX) :]))
            except re.error as error:
                raise InvalidArgumentError(
                    f"{field} pattern {text!r} is not a valid regular expression: {error}"
                ) from error
        return cls(text, None)

    def matches(self, name: str) -> bool:
        for candidate in _ancestry(name):
            if self.regex is not None:
                if self.regex.fullmatch(candidate):
                    return True
            elif fnmatch.fnmatchcase(candidate, self.text):
                return True
        return False

    def matches_whole(self, name: str) -> bool:
        """Whether the pattern matches ``name`` itself (no ancestors: a tensor name)."""
        if self.regex is not None:
            return self.regex.fullmatch(name) is not None
        return fnmatch.fnmatchcase(name, self.text)

    def describe(self) -> str:
        return repr(self.text)


@dataclass(frozen=True)
class _Predicate:
    """A user callable ``(name, module) -> bool``."""

    function: Callable[[str, nn.Module], bool]

    def describe(self) -> str:
        return f"callable {getattr(self.function, '__qualname__', repr(self.function))}"


@dataclass(frozen=True)
class LayerFilter:
    """A parsed, validated ``include`` or ``exclude`` argument."""

    field: str
    patterns: tuple[_NamePattern | _Predicate, ...]

    @classmethod
    def parse(cls, value: object, field: str) -> LayerFilter | None:
        """Validate ``value`` (None, a string, a list of strings or a callable)."""
        if value is None:
            return None
        if isinstance(value, str):
            return cls(field, (_NamePattern.parse(value, field),))
        if callable(value) and not isinstance(value, nn.Module):
            return cls(field, (_Predicate(value),))
        if isinstance(value, (list, tuple, set, frozenset)):
            patterns = []
            for item in value:
                if not isinstance(item, str):
                    raise InvalidArgumentTypeError(
                        f"{field} must hold strings, got {type(item).__name__}: {item!r}"
                    )
                patterns.append(_NamePattern.parse(item, field))
            if not patterns:
                raise InvalidArgumentError(
                    f"{field} is an empty list; pass None to "
                    + ("select all" if field == "include" else "exclude nothing")
                )
            return cls(field, tuple(patterns))
        raise InvalidArgumentTypeError(
            f"{field} must be None, a string, a list of strings or a callable "
            f"(name, module) -> bool, got {type(value).__name__}: {value!r:.80}"
        )

    def describe(self) -> str:
        return ", ".join(pattern.describe() for pattern in self.patterns)

    def matching(self, layers: Sequence[tuple[str, nn.Module]]) -> list[list[str]]:
        """For each pattern, the names of the layers it matches."""
        hits: list[list[str]] = []
        for pattern in self.patterns:
            if isinstance(pattern, _NamePattern):
                hits.append([name for name, _ in layers if pattern.matches(name)])
            else:
                hits.append([name for name, module in layers if pattern.function(name, module)])
        return hits


@dataclass(frozen=True)
class LayerTarget:
    """One weight to normalize: ``owner.<tensor_name>`` inside the layer at ``path``."""

    path: str
    tensor_name: str
    dim: int

    @property
    def key(self) -> str:
        """The tensor's name in the layer: ``"weight"``, ``"out_proj.weight"``."""
        return f"{self.path}.{self.tensor_name}" if self.path else self.tensor_name


@dataclass(frozen=True)
class TensorNames:
    """Which tensors of a layer type to normalize, and which of their dimensions are outputs.

    A value of :func:`~snpatch.apply_spectral_norm`'s ``tensors={LayerType: ...}``, where
    ``dim`` matters; a plain string or list of strings there means ``TensorNames(it)``.

    Args:
        names: a tensor name, or several (their union). Each is an exact name, a glob
            (``fnmatch.fnmatchcase``: ``"weight_*_l*"``) or, after ``re:``, a regular
            expression that must match the whole name. They name the layer's own
            parameters and buffers (torch's ``spectral_norm(module, name)``), and for
            ``nn.MultiheadAttention`` also ``out_proj.weight``. Each must match at least
            one tensor of every selected layer of the type.
        dim: the dimension of each tensor that holds the outputs (torch's ``dim``: the rows
            of the matrix whose top singular value is taken). None: torch's default, 0 or
            1 for ``ConvTranspose*d`` (and 1 for the ``weight`` of a
            :data:`LINEAR_LIKE_LAYERS` layer).

    Raises:
        TypeError: ``names`` is not a string or a list of strings, or ``dim`` not an int.
        ValueError: ``names`` is empty, or holds an empty name or invalid regular expression.

    Example:
        >>> import torch.nn as nn, snpatch
        >>> snpatch.TensorNames(["weight_ih_l*", "weight_hh_l*"])
        TensorNames(names=('weight_ih_l*', 'weight_hh_l*'), dim=None)
    """

    names: str | Sequence[str]
    dim: int | None = None

    def __post_init__(self) -> None:
        names = (self.names,) if isinstance(self.names, str) else self.names
        if not isinstance(names, (list, tuple)):
            raise InvalidArgumentTypeError(
                "tensors: names must be a string or a list of strings, got "
                f"{type(self.names).__name__}: {self.names!r:.80}"
            )
        if not names:
            raise InvalidArgumentError("tensors: a list of tensor names is empty")
        for item in names:
            if not isinstance(item, str):
                raise InvalidArgumentTypeError(
                    f"tensors: names must be strings, got {type(item).__name__}: {item!r:.80}"
                )
            _NamePattern.parse(item, "tensors")
        object.__setattr__(self, "names", tuple(names))
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int)):
            raise InvalidArgumentTypeError(
                f"tensors: dim must be an int or None, got {type(self.dim).__name__}: "
                f"{self.dim!r:.80}"
            )

    def patterns(self) -> tuple[_NamePattern, ...]:
        return tuple(_NamePattern.parse(name, "tensors") for name in self.names)


#: What ``tensors={LayerType: ...}`` maps a layer type to.
TensorSpec = Union[str, Sequence[str], TensorNames]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class TensorRules:
    """A parsed, validated ``tensors`` argument: per layer type, which tensors to normalize.

    A layer follows the entry of the first class in its MRO that has one (its own class
    before a base class); the types of the entries are eligible layer types too.
    """

    rules: tuple[tuple[type[nn.Module], TensorNames], ...]

    @classmethod
    def parse(cls, value: object) -> TensorRules | None:
        """Validate ``value``: None, or a mapping from ``nn.Module`` subclasses to names."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise InvalidArgumentTypeError(
                "tensors must be a dict {layer type: tensor names}, e.g. "
                "{nn.LSTM: ['weight_ih_l*', 'weight_hh_l*']}, got "
                f"{type(value).__name__}: {value!r:.80}"
            )
        if not value:
            raise InvalidArgumentError("tensors is an empty dict; pass None for the defaults")
        rules = []
        for layer_type, spec in value.items():
            if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
                raise InvalidArgumentTypeError(
                    f"tensors: keys must be nn.Module subclasses, got {layer_type!r:.80}"
                )
            if isinstance(spec, TensorNames):
                names = spec
            elif isinstance(spec, (str, list, tuple)):
                names = TensorNames(spec)
            else:
                raise InvalidArgumentTypeError(
                    f"tensors[{layer_type.__name__}] must be a tensor name, a list of them or "
                    f"snpatch.TensorNames(names, dim=...), got {type(spec).__name__}: "
                    f"{spec!r:.80}"
                )
            rules.append((layer_type, names))
        return cls(tuple(rules))

    def types(self) -> tuple[type[nn.Module], ...]:
        return tuple(layer_type for layer_type, _ in self.rules)

    def rule_for(self, module: nn.Module) -> TensorNames | None:
        """The entry ``module`` follows (see the class), or None: its default tensors."""
        by_type = dict(self.rules)
        for cls in type(module).__mro__:
            if cls in by_type:
                return by_type[cls]
        return None

    def warn_unused(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        """Warn naming each entry that none of ``layers`` (the eligible ones) follows."""
        used = {id(self.rule_for(module)) for _, module in layers}
        for layer_type, names in self.rules:
            if id(names) not in used:
                warnings.warn(
                    f"tensors[{layer_type.__name__}] applies to no layer of the model",
                    SnpatchWarning,
                    stacklevel=4,
                )


def default_dim(module: nn.Module, tensor_name: str) -> int:
    """torch's ``dim`` for ``module``'s tensor: 0, 1 for ``ConvTranspose*d`` and linear-likes."""
    dim = linear_like_dim(module) if tensor_name == "weight" else None
    if dim is None:
        dim = 1 if isinstance(module, ConvTransposeNd) else 0
    return dim


def default_targets(module: nn.Module) -> list[LayerTarget]:
    """The weights snpatch normalizes in ``module`` when ``tensors`` says nothing about it.

    ``weight``, and for ``nn.MultiheadAttention`` its in-projection(s) and ``out_proj.weight``.
    """
    if isinstance(module, nn.MultiheadAttention):
        names = (
            ["in_proj_weight"]
            if packed_in_proj(module)
            else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        )
        return [LayerTarget("", name, 0) for name in names] + [LayerTarget("out_proj", "weight", 0)]
    return [LayerTarget("", "weight", default_dim(module, "weight"))]


def layer_tensors(layer: nn.Module) -> dict[str, Tensor]:
    """The tensors ``tensors`` names can match in ``layer``, by name, in the layer's order.

    Its own parameters and buffers (a parametrized one under its plain name, with its
    original), and for ``nn.MultiheadAttention`` those of ``out_proj`` (``out_proj.weight``),
    which belongs to it (see :func:`eligible_layers`).
    """
    owners = [("", layer)]
    if isinstance(layer, nn.MultiheadAttention):
        owners.append(("out_proj.", layer.out_proj))
    found: dict[str, Tensor] = {}
    for prefix, owner in owners:
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    found[prefix + name] = tensor
        parametrizations = owner._modules.get("parametrizations")
        if parametrize.is_parametrized(owner) and isinstance(parametrizations, nn.ModuleDict):
            for name, stack in parametrizations.items():
                original = getattr(stack, "original", None)
                if isinstance(original, Tensor):
                    found[prefix + name] = original
    return found


def tensor_targets(layer_name: str, layer: nn.Module, names: TensorNames) -> list[LayerTarget]:
    """The tensors of ``layer`` that ``names`` selects (in the layer's order), with their dim.

    Raises:
        NoMatchingTensorsError: a name matches no tensor of the layer (the message lists the
            tensors it has, the closest first).
        UnsupportedLayerError: a name selects a tensor of fewer than 2 dimensions.
        InvalidArgumentError: ``dim`` is out of range for a selected tensor.
    """
    available = layer_tensors(layer)
    label = _layer_label(layer_name, layer)
    chosen: dict[str, _NamePattern] = {}
    for pattern in names.patterns():
        hits = [name for name in available if pattern.matches_whole(name)]
        if not hits:
            close = _closest(pattern.text, list(available))
            raise NoMatchingTensorsError(
                f"tensors: {pattern.describe()} matches no tensor of {label}; it has "
                + (", ".join(repr(n) for n in available) or "no tensors")
                + (f" (closest: {', '.join(repr(n) for n in close)})" if close else "")
            )
        for hit in hits:
            chosen.setdefault(hit, pattern)
    targets = []
    for key, tensor in available.items():
        selector = chosen.get(key)
        if selector is None:
            continue
        ndim = tensor.dim()
        if ndim < 2:
            hint = "" if selector.text == key else "; narrow the pattern to the weight matrices"
            raise UnsupportedLayerError(
                f"tensors: {selector.describe()} selects {label}'s {ndim}-D {key!r} of shape "
                f"{tuple(tensor.shape)}; spectral normalization needs a tensor with at least "
                f"2 dimensions{hint}"
            )
        path, _, tensor_name = key.rpartition(".")
        dim = default_dim(layer, tensor_name) if names.dim is None else names.dim
        if not -ndim <= dim < ndim:
            raise InvalidArgumentError(
                f"tensors: dim={dim} is out of range for {label}'s {key!r} of shape "
                f"{tuple(tensor.shape)} (expected -{ndim} <= dim < {ndim})"
            )
        targets.append(LayerTarget(path, tensor_name, dim % ndim))
    return targets


def _layer_label(name: str, layer: nn.Module) -> str:
    return (
        f"layer {name!r} ({type(layer).__name__})"
        if name
        else f"the model ({type(layer).__name__})"
    )


def eligible_layers(
    model: nn.Module, layer_types: tuple[type[nn.Module], ...], *, linear_like: bool = False
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` whose type is in ``layer_types``.

    With ``linear_like``, the layers of :data:`LINEAR_LIKE_LAYERS` too. Each module is
    listed once (under its first name). The insides of an ``nn.MultiheadAttention`` (its
    ``out_proj``) belong to it and are never listed on their own, and parametrization
    containers are never walked.
    """
    return [
        (name, module)
        for name, module, is_eligible in _walk(model, "", layer_types, linear_like, set())
        if is_eligible
    ]


def _walk(
    module: nn.Module,
    name: str,
    layer_types: tuple[type[nn.Module], ...],
    linear_like: bool,
    seen: set[int],
) -> Iterator[tuple[str, nn.Module, bool]]:
    if id(module) in seen:
        return
    seen.add(id(module))
    eligible = isinstance(module, layer_types) or (
        linear_like and linear_like_dim(module) is not None
    )
    yield name, module, eligible
    if isinstance(module, nn.MultiheadAttention):
        # Its forward never calls out_proj.forward: out_proj is only ever patched as part
        # of the attention (a pre-hook on out_proj would never run).
        return
    for child_name, child in module._modules.items():
        if child is None:
            continue
        if child_name == "parametrizations" and parametrize.is_parametrized(module):
            continue
        child_path = f"{name}.{child_name}" if name else child_name
        yield from _walk(child, child_path, layer_types, linear_like, seen)


def _unsupported_weights(
    model: nn.Module, layer_types: tuple[type[nn.Module], ...]
) -> list[tuple[str, nn.Module]]:
    """Layers of no eligible type whose own ``weight`` has 2 or more dimensions.

    Lookups (``nn.Embedding``) are left out: what is left is what a user patching the
    whole model would expect normalized and isn't.
    """
    found = []
    for name, module, is_eligible in _walk(model, "", layer_types, True, set()):
        weight = module._parameters.get("weight")
        if (
            is_eligible
            or isinstance(module, _LOOKUPS)
            or not isinstance(weight, Tensor)
            or isinstance(weight, UninitializedParameter)
            or weight.dim() < 2
            or not weight.is_floating_point()
        ):
            continue
        found.append((name, module))
    return found


def _silences(pattern: _NamePattern | _Predicate, layers: Sequence[tuple[str, nn.Module]]) -> bool:
    # Only name patterns: a predicate is asked about eligible layers alone.
    return isinstance(pattern, _NamePattern) and any(pattern.matches(name) for name, _ in layers)


def _warn_unsupported(
    unsupported: Sequence[tuple[str, nn.Module]], exclude: LayerFilter | None
) -> None:
    """Warn naming the ``unsupported`` layers that no exclude name pattern matches."""
    skipped = [
        (name, module)
        for name, module in unsupported
        if exclude is None or not any(_silences(p, [(name, module)]) for p in exclude.patterns)
    ]
    if not skipped:
        return
    listed = ", ".join(
        f"{name or '(model)'!r} ({type(module).__name__}, weight "
        f"{'x'.join(str(n) for n in module._parameters['weight'].shape)})"  # type: ignore[union-attr]
        for name, module in skipped[:5]
    )
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    warnings.warn(
        f"{len(skipped)} layer(s) with a weight of 2 or more dimensions are of no supported "
        f"type and stay unnormalized: {listed}{more}. Pass layer_types=[...] to normalize "
        "them (their weight as a matrix with dim=0), or exclude=[...] to silence this",
        SnpatchWarning,
        stacklevel=4,
    )


def _closest(pattern: str, names: Sequence[str]) -> list[str]:
    probe = pattern[len(_REGEX_PREFIX) :] if pattern.startswith(_REGEX_PREFIX) else pattern
    return difflib.get_close_matches(probe, names, n=3, cutoff=0.3)


def select_from(
    model: nn.Module,
    candidates: Sequence[tuple[str, nn.Module]],
    include: LayerFilter | None,
    exclude: LayerFilter | None,
    *,
    what: str = "eligible",
    unsupported: Sequence[tuple[str, nn.Module]] = (),
) -> list[tuple[str, nn.Module]]:
    """Apply validated include/exclude filters to ``candidates`` (in model order).

    An exclude name pattern that matches only ``unsupported`` layers (which it silences,
    see :func:`_warn_unsupported`) is not reported as matching nothing.

    Raises:
        NoMatchingLayersError: an include pattern matches no candidate, or nothing is left.
    """
    selected = list(candidates)
    if include is not None:
        chosen: set[str] = set()
        for pattern, hits in zip(include.patterns, include.matching(candidates), strict=True):
            if not hits:
                message = f"include {pattern.describe()} matched no {what} layer"
                if isinstance(pattern, _NamePattern):
                    every_name = [name for name, _ in model.named_modules() if name]
                    close = _closest(pattern.text, every_name)
                    if close:
                        message += f"; closest names: {', '.join(repr(n) for n in close)}"
                if not candidates:
                    message += f" (the model has no {what} layers)"
                raise NoMatchingLayersError(message)
            chosen.update(hits)
        selected = [(name, module) for name, module in selected if name in chosen]
    if exclude is not None:
        dropped: set[str] = set()
        for pattern, hits in zip(exclude.patterns, exclude.matching(candidates), strict=True):
            if not hits and not _silences(pattern, unsupported):
                warnings.warn(
                    f"exclude {pattern.describe()} matched no {what} layer",
                    SnpatchWarning,
                    stacklevel=4,
                )
            dropped.update(hits)
        selected = [(name, module) for name, module in selected if name not in dropped]
    if not selected:
        if not candidates:
            raise NoMatchingLayersError(f"the model ({type(model).__name__}) has no {what} layers")
        raise NoMatchingLayersError(
            f"include={include.describe() if include else None} and "
            f"exclude={exclude.describe() if exclude else None} leave no {what} layer selected"
        )
    return selected


def select_layers(
    model: nn.Module,
    include: Pattern | None = None,
    exclude: Pattern | None = None,
    *,
    layer_types: Sequence[type[nn.Module]] | None = None,
    tensors: Mapping[type[nn.Module], TensorSpec] | None = None,
) -> list[str]:
    """The names of the layers :func:`~snpatch.apply_spectral_norm` would patch (a dry run).

    Nothing is changed. Layers that are already patched are listed too (applying would
    refuse them).

    Args:
        model: any ``nn.Module``.
        include: pattern(s) or a predicate selecting layers; None selects every eligible one.
        exclude: pattern(s) or a predicate removing layers from the selection.
        layer_types: eligible layer classes (default :data:`DEFAULT_LAYER_TYPES` and the
            layers of :data:`LINEAR_LIKE_LAYERS`).
        tensors: which tensors to normalize per layer type (see
            :func:`~snpatch.apply_spectral_norm`); its types are eligible too, and each
            selected layer's names are checked as applying would.

    Returns:
        The dotted names, in the order ``model.named_modules()`` gives them.

    Raises:
        TypeError: ``model`` is not a module, or a filter has the wrong type.
        ValueError: a pattern is empty or an invalid regular expression.
        NoMatchingLayersError: an include pattern matches nothing, or nothing is selected.
        NoMatchingTensorsError: a name of ``tensors`` matches no tensor of a selected layer.

    Example:
        >>> import torch.nn as nn, snpatch
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        >>> snpatch.select_layers(net, include="0")
        ['0']
    """
    rules = TensorRules.parse(tensors)
    layers = resolve_selection(model, include, exclude, layer_types, rules)
    if rules is not None:
        for name, layer in layers:
            names = rules.rule_for(layer)
            if names is not None:
                tensor_targets(name, layer, names)
    return [name for name, _ in layers]


def resolve_selection(
    model: object,
    include: object,
    exclude: object,
    layer_types: object,
    tensors: TensorRules | None = None,
) -> list[tuple[str, nn.Module]]:
    module = check_model(model)
    types = check_layer_types(layer_types)
    include_filter = LayerFilter.parse(include, "include")
    exclude_filter = LayerFilter.parse(exclude, "exclude")
    # The types ``tensors`` names are eligible whatever ``layer_types`` says.
    extra = tuple(t for t in tensors.types() if t not in types) if tensors is not None else ()
    candidates = eligible_layers(module, types + extra, linear_like=layer_types is None)
    if tensors is not None:
        tensors.warn_unused(candidates)
    # Patching "the whole model" must not leave a layer unnormalized without a word.
    whole_model = include is None and layer_types is None
    unsupported = _unsupported_weights(module, types + extra) if whole_model else []
    selected = select_from(
        module, candidates, include_filter, exclude_filter, unsupported=unsupported
    )
    _warn_unsupported(unsupported, exclude_filter)
    return selected
