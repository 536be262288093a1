"""The fused backward updates the incoming weight gradient in place only when nothing else sees it.

On CPU, a fresh weight-sized tensor per layer and step costs more (page faults) than the
arithmetic of the backward, so ``_Normalize`` writes ``g * s + c u v^T`` into ``g`` itself
when reference counts show that only it holds ``g``. These tests pin down both halves: the
in-place path is taken in ordinary training, and every way of sharing the gradient (fan-out
to another branch, a user's hook, ``retain_grad``, ``autograd.grad`` capture, user-supplied
``grad_outputs``) gets the out-of-place result, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import snpatch
from snpatch import parametrization

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


def _original(layer: nn.Module) -> Tensor:
    return layer.parametrizations.weight.original  # type: ignore[no-any-return]


@pytest.fixture
def out_of_place(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    def disable() -> None:
        monkeypatch.setattr(parametrization, "_grad_is_private", lambda grad: False)

    return disable


@pytest.mark.parametrize("kind", LAYERS)
def test_training_backward_updates_the_gradient_in_place(kind: str) -> None:
    assert parametrization._private_counts(), "calibration found no private gradient"
    layer, x = _layer(kind)
    arrived: list[int] = []
    weight = layer.weight
    weight.register_hook(lambda g: arrived.append(g.data_ptr()))  # records, keeps nothing
    _apply(layer, x, weight).square().sum().backward()
    grad = _original(layer).grad
    assert grad is not None
    # The gradient that reached the parametrization is the one now in .grad: no new tensor.
    assert arrived == [grad.data_ptr()]


def _shared_cases() -> dict[str, Callable[[nn.Module, Tensor], list[Tensor]]]:
    """Ways to use a layer that let something besides the backward see the weight gradient.

    Each returns the tensors that must come out exactly as without the in-place update.
    """

    def fan_out(layer: nn.Module, x: Tensor) -> list[Tensor]:
        delta = torch.zeros_like(_original(layer), requires_grad=True)
        _apply(layer, x, layer.weight + delta).square().sum().backward()
        return [delta.grad, _original(layer).grad]  # type: ignore[list-item]

    def hook_keeps_it(layer: nn.Module, x: Tensor) -> list[Tensor]:
        kept: list[Tensor] = []
        weight = layer.weight
        weight.register_hook(kept.append)
        _apply(layer, x, weight).square().sum().backward()
        return [kept[0], _original(layer).grad]  # type: ignore[list-item]

    def retain_grad(layer: nn.Module, x: Tensor) -> list[Tensor]:
        weight = layer.weight
        weight.retain_grad()
        _apply(layer, x, weight).square().sum().backward()
        return [weight.grad, _original(layer).grad]  # type: ignore[list-item]

    def autograd_grad_captures_it(layer: nn.Module, x: Tensor) -> list[Tensor]:
        weight = layer.weight
        loss = _apply(layer, x, weight).square().sum()
        return list(torch.autograd.grad(loss, [weight, _original(layer)]))

    def user_grad_outputs(layer: nn.Module, x: Tensor) -> list[Tensor]:
        weight = layer.weight
        supplied = torch.linspace(-1, 1, weight.numel()).view_as(weight)
        before = supplied.clone()
        (grad,) = torch.autograd.grad(weight, _original(layer), supplied)
        torch.testing.assert_close(supplied, before, rtol=0, atol=0)
        return [grad]

    def used_twice(layer: nn.Module, x: Tensor) -> list[Tensor]:
        weight = layer.weight
        (_apply(layer, x, weight) * _apply(layer, 2 * x, weight)).sum().backward()
        return [_original(layer).grad]  # type: ignore[list-item]

    return {
        f.__name__: f
        for f in (
            fan_out,
            hook_keeps_it,
            retain_grad,
            autograd_grad_captures_it,
            user_grad_outputs,
            used_twice,
        )
    }


@pytest.mark.parametrize("case", list(_shared_cases()))
@pytest.mark.parametrize("kind", LAYERS)
def test_shared_gradients_are_never_overwritten(
    kind: str, case: str, out_of_place: Callable[[], None]
) -> None:
    run = _shared_cases()[case]
    layer, x = _layer(kind)
    reference_layer = copy.deepcopy(layer)
    got = run(layer, x)
    out_of_place()
    want = run(reference_layer, x)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_matches_the_out_of_place_backward(out_of_place: Callable[[], None]) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )
    snpatch.apply_spectral_norm(model)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)

    def train(net: nn.Module) -> list[Tensor]:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
        return [p.detach().clone() for p in net.parameters()]

    got = train(model)
    out_of_place()
    want = train(reference)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
