"""Which layers: eligibility by type and selection by name.

A pattern is a glob (``fnmatch.fnmatchcase``) on the dotted module name, or a regular
expression when it starts with ``re:`` (it must match the whole name). A pattern selects a
layer when it matches the layer's own name or the name of any of its ancestors, so
``"layer1"`` selects every eligible layer inside ``layer1``. A list of patterns is their
union; a callable ``(name, module) -> bool`` is asked about each eligible layer. Exclude
always wins over include.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from .errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NoMatchingLayersError,
    SnpatchWarning,
)

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LINEAR_LIKE_LAYERS",
    "LayerFilter",
    "Pattern",
    "check_model",
    "eligible_layers",
    "is_linear",
    "linear_like_dim",
    "select_layers",
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


def _unsupported_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers of no eligible type whose own ``weight`` has 2 or more dimensions.

    Lookups (``nn.Embedding``) are left out: what is left is what a user patching the
    whole model would expect normalized and isn't.
    """
    found = []
    for name, module, is_eligible in _walk(model, "", DEFAULT_LAYER_TYPES, True, set()):
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

    Returns:
        The dotted names, in the order ``model.named_modules()`` gives them.

    Raises:
        TypeError: ``model`` is not a module, or a filter has the wrong type.
        ValueError: a pattern is empty or an invalid regular expression.
        NoMatchingLayersError: an include pattern matches nothing, or nothing is selected.

    Example:
        >>> import torch.nn as nn, snpatch
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        >>> snpatch.select_layers(net, include="0")
        ['0']
    """
    return [name for name, _ in resolve_selection(model, include, exclude, layer_types)]


def resolve_selection(
    model: object, include: object, exclude: object, layer_types: object
) -> list[tuple[str, nn.Module]]:
    module = check_model(model)
    types = check_layer_types(layer_types)
    include_filter = LayerFilter.parse(include, "include")
    exclude_filter = LayerFilter.parse(exclude, "exclude")
    candidates = eligible_layers(module, types, linear_like=layer_types is None)
    # Patching "the whole model" must not leave a layer unnormalized without a word.
    whole_model = include is None and layer_types is None
    unsupported = _unsupported_weights(module) if whole_model else []
    selected = select_from(
        module, candidates, include_filter, exclude_filter, unsupported=unsupported
    )
    _warn_unsupported(unsupported, exclude_filter)
    return selected
