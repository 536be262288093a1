"""The normalization's backward never writes into a gradient it is given.

Whoever else holds that gradient (a user's hook, ``retain_grad``, ``grad_outputs`` passed to
``torch.autograd.grad``) still sees it as it arrived. (snpatch 0.1 wrote into it when reference
counts said nothing else held it; that trick is gone, see docs/design/engine.md.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import snpatch

# (layer factory, input) pairs: a plain-tensor gradient (conv) and a view gradient (linear).
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
    "linear": (lambda: nn.Linear(5, 4), (2, 5)),
}


def _layer(kind: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    factory, shape = LAYERS[kind]
    return snpatch.apply_spectral_norm(factory()), torch.randn(shape)


def _apply(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The layer's forward with ``weight`` in place of ``layer.weight``."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


@pytest.mark.parametrize("kind", LAYERS)
def test_a_gradient_kept_by_a_hook_is_left_as_it_arrived(kind: str) -> None:
    layer, x = _layer(kind)
    kept: list[tuple[Tensor, Tensor]] = []
    weight = layer.weight
    weight.register_hook(lambda g: kept.append((g, g.clone())))
    _apply(layer, x, weight).square().sum().backward()
    ((held, at_arrival),) = kept
    torch.testing.assert_close(held, at_arrival, rtol=0, atol=0)


@pytest.mark.parametrize("kind", LAYERS)
def test_user_grad_outputs_are_left_unchanged(kind: str) -> None:
    layer, _ = _layer(kind)
    weight = layer.weight
    supplied = torch.linspace(-1, 1, weight.numel()).view_as(weight)
    before = supplied.clone()
    torch.autograd.grad(weight, layer.parametrizations.weight.original, supplied)
    torch.testing.assert_close(supplied, before, rtol=0, atol=0)
