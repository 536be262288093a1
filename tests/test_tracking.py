"""Where and how often the iteration advances: wherever a weight is read, once per update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snpatch
from tests.conftest import exact_sigma


class ReadsWeightsItself(nn.Module):
    """Reads its children's weights with ``F.linear`` (as torchvision's swin_t does).

    The children's own ``forward`` never runs, so their pre-hooks never fire.
    """

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(12, 24)
        self.proj = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(F.linear(x, self.qkv.weight, self.qkv.bias))
        return F.linear(hidden, self.proj.weight, self.proj.bias)


def _sigma_error(model: nn.Module, lipschitz: float = 1.0) -> float:
    """Worst |sigma(W_eff) / c - 1| over the patched weights, in float64."""
    sigmas = [
        s for layer in snpatch.patched_layers(model).values() for s in exact_sigma(layer).values()
    ]
    return max(abs(s / lipschitz - 1.0) for s in sigmas)


def test_weights_read_outside_their_layer_are_held_at_the_target() -> None:
    torch.manual_seed(0)
    model = snpatch.apply_spectral_norm(ReadsWeightsItself())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 12), torch.randn(32, 3)
    worst = 0.0
    for _ in range(30):
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        worst = max(worst, _sigma_error(model))  # the weights the next forward reads
    assert worst < 5e-3


class CountSteps:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        # Every step of a weight, batched or not, starts with its products (first round).
        step_products = snpatch.SpectralNorm.step_products

        def counting(norm: snpatch.SpectralNorm, weight: torch.Tensor, *, first: bool) -> object:
            self.count += first
            return step_products(norm, weight, first=first)

        monkeypatch.setattr(snpatch.SpectralNorm, "step_products", counting)


@pytest.mark.parametrize("reads", [1, 3])
@pytest.mark.parametrize("outside", [False, True])
def test_each_weight_advances_once_per_update_however_often_it_is_read(
    reads: int, outside: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # D(real), D(fake) and a gradient penalty read the weights three times in one step.
    torch.manual_seed(0)
    model = (
        ReadsWeightsItself()
        if outside
        else nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 3))
    )
    snpatch.apply_spectral_norm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = CountSteps(monkeypatch)
    for _ in range(3):
        steps.count = 0
        loss = sum(model(torch.randn(4, 12)).square().mean() for _ in range(reads))
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        assert steps.count == 2  # one per weight
        optimizer.step()
        optimizer.zero_grad()


def test_a_weight_left_unchanged_is_not_stepped_again(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = snpatch.apply_spectral_norm(nn.Linear(5, 7))
    steps = CountSteps(monkeypatch)
    model(torch.randn(2, 5))
    model(torch.randn(2, 5))
    assert steps.count == 1
    with torch.no_grad():
        model.parametrizations.weight.original.mul_(1.5)  # any in-place update
    model(torch.randn(2, 5))
    assert steps.count == 2
    assert _sigma_error(model) < 1e-5


class DataSGD(torch.optim.Optimizer):
    """Plain SGD that writes through ``.data``: the weight's version counter never moves.

    FSDP2 hands a layer the same unsharded tensor at every forward, refilled from the
    updated shards with its version counter preserved: the same situation.
    """

    def __init__(self, params: object, lr: float) -> None:
        super().__init__(params, {"lr": lr})  # type: ignore[arg-type]

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.data.add_(param.grad, alpha=-group["lr"])


def test_an_optimizer_step_that_keeps_the_version_counter_still_advances() -> None:
    torch.manual_seed(0)
    model = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)))
    optimizer = DataSGD(model.parameters(), lr=0.5)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    versions = [p._version for p in model.parameters()]
    worst = 0.0
    for _ in range(10):
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        model(x)  # the forward that reads the updated weights
        worst = max(worst, _sigma_error(model))
    assert [p._version for p in model.parameters()] == versions  # the premise
    assert worst < 1e-3
