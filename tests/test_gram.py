"""Weights solved exactly from their Gram at every step (issue 14, items 1 and 3).

On an accelerator (``snpatch.engine.on_accelerator``), where no decision may be read on the
host, a matrix whose smaller side is at most ``GRAM_LIMIT_ACCELERATOR`` is stepped from its
Gram ``W W^T`` or ``W^T W`` by repeated squaring: nothing depends on the last step, so a
weight that jumped is held at the same step. The CPU does the same up to
``GRAM_LIMIT_CPU``, and operator mode the operators with at most ``EXACT_OPERATOR_SIZE``
inputs or outputs (on an accelerator: ``GRAM_LIMIT_ACCELERATOR``). The accelerator's path runs
here with the switch turned on.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import snpatch
import snpatch.engine
from tests.conftest import exact_sigma
from tests.test_operator import FEWER, dense_norm
from tests.test_refresh import HELD, _jump, jumps, targets


@pytest.fixture
def accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator's code path, on the CPU."""
    monkeypatch.setattr(snpatch.engine, "on_accelerator", lambda device: True)


@st.composite
def gram_layers(draw: st.DrawFn) -> nn.Module:
    """Layers whose matrix has a smaller side up to 200: several size classes of 64."""
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        return nn.Linear(draw(st.integers(1, 200)), draw(st.integers(1, 200)))
    return nn.Conv2d(
        draw(st.integers(1, 16)),
        draw(st.integers(1, 160)),
        draw(st.integers(1, 3)),
        stride=draw(st.integers(1, 2)),
        dilation=draw(st.integers(1, 2)),
        groups=1,
    )


@given(gram_layers(), jumps, targets, st.integers(0, 2**31 - 1))
def test_on_an_accelerator_a_weight_that_jumps_is_held_at_the_same_step(
    layer: nn.Module, jump: tuple[str, float], target: float, seed: int
) -> None:
    # (a context, not the fixture: hypothesis runs all examples within one function scope)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snpatch.engine, "on_accelerator", lambda device: True)
        snpatch.apply_spectral_norm(layer, lipschitz=target)
        _jump(layer.parametrizations.weight.original, *jump, torch.Generator().manual_seed(seed))
        layer.train()
        _ = layer.weight  # the first training read of the new value steps it
    # Within 1e-3, not exact: where the top two singular values are closer than about
    # 1 / 2^11 (relative), 2^10 powers of G leave them mixed (resnet18's layer4: 3e-4).
    assert exact_sigma(layer)["weight"] == pytest.approx(target, rel=1e-3)


def _vectors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    norm = layer.parametrizations.weight[0]
    return norm._u, norm._v, norm._sigma


@pytest.mark.usefixtures("accelerator")
@pytest.mark.parametrize("shape", [(7, 300), (300, 7), (64, 64), (130, 65)])
def test_the_vectors_are_torchs_unit_singular_pair(shape: tuple[int, int]) -> None:
    """``u``, ``v`` unit, ``u^T W v == sigma``: the state torch's eval and checkpoints read."""
    layer = snpatch.apply_spectral_norm(nn.Linear(shape[1], shape[0]))
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(3.0)  # a new value
    layer.train()
    _ = layer.weight
    u, v, sigma = _vectors(layer)
    weight = layer.parametrizations.weight.original.detach().double()
    exact = torch.linalg.svd(weight)
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(u.double() @ weight @ v.double()) == pytest.approx(float(sigma), rel=1e-6)
    assert float(sigma) == pytest.approx(float(exact.S[0]), rel=1e-6)
    assert abs(float(u.double() @ exact.U[:, 0])) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.usefixtures("accelerator")
def test_a_zero_weight_stays_zero_and_recovers() -> None:
    layer = snpatch.apply_spectral_norm(nn.Linear(80, 70))
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        original.zero_()
    layer.train()
    assert torch.equal(layer.weight, torch.zeros(70, 80))
    u, v, sigma = _vectors(layer)
    assert float(sigma) == 0.0
    assert bool(torch.isfinite(u).all() and torch.isfinite(v).all())
    layer.eval()
    assert torch.equal(layer(torch.randn(3, 80)), layer.bias.detach().expand(3, 70))
    layer.train()
    with torch.no_grad():
        original.copy_(torch.randn(70, 80))
    assert exact_sigma(layer)["weight"] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.usefixtures("accelerator")
def test_layers_with_their_own_options_in_one_step_keep_them() -> None:
    """One cohort, Grams of one size class: each layer its own bound and mode."""
    model = nn.Sequential(nn.Linear(40, 50), nn.Linear(50, 60), nn.Linear(60, 30))
    snpatch.apply_spectral_norm(model, include=["0"], lipschitz=2.0)
    snpatch.apply_spectral_norm(model, include=["1"], lipschitz=0.5)
    snpatch.apply_spectral_norm(model, include=["2"], lipschitz=3.0, mode="soft")
    with torch.no_grad():
        model[2].parametrizations.weight.original.mul_(0.01)  # below the soft bound
    model.train()
    model(torch.randn(4, 40))
    sigmas = [exact_sigma(layer)["weight"] for layer in model]
    below = float(torch.linalg.matrix_norm(model[2].parametrizations.weight.original.detach(), 2))
    assert sigmas[:2] == [pytest.approx(2.0, rel=1e-5), pytest.approx(0.5, rel=1e-5)]
    assert sigmas[2] == pytest.approx(below, rel=1e-5)


@pytest.mark.usefixtures("accelerator")
def test_more_power_iterations_add_no_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first round is exact: ``n_power_iterations > 1`` costs one Gram, not several."""
    layer = snpatch.apply_spectral_norm(nn.Linear(90, 100), n_power_iterations=4)
    grams: list[int] = []
    step = snpatch.engine.gram_step

    def counting(items: list[snpatch.engine.GramProducts]) -> None:
        grams.append(len(items))
        step(items)

    monkeypatch.setattr(snpatch.engine, "gram_step", counting)
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(2.0)
    layer.train()
    _ = layer.weight
    assert grams == [1]
    assert exact_sigma(layer)["weight"] == pytest.approx(1.0, rel=1e-5)


def test_the_cpu_steps_a_matrix_over_its_limit_with_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU's Gram limit is lower (flops are its cost): above it the block step runs."""
    calls: list[str] = []
    for name in ("gram_step", "_ritz_of"):
        original = getattr(snpatch.engine, name)
        monkeypatch.setattr(
            snpatch.engine, name, lambda items, f=original, n=name: calls.append(n) or f(items)
        )
    small = snpatch.apply_spectral_norm(nn.Linear(200, snpatch.engine.GRAM_LIMIT_CPU))
    large = snpatch.apply_spectral_norm(nn.Linear(200, snpatch.engine.GRAM_LIMIT_CPU + 1))
    for layer, expected in ((small, "gram_step"), (large, "_ritz_of")):
        calls.clear()
        with torch.no_grad():
            layer.parametrizations.weight.original.mul_(2.0)
        layer.train()
        _ = layer.weight
        assert calls == [expected]


@settings(FEWER, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # (no shrinking)
@given(
    st.sampled_from(["zeros", "reflect", "replicate"]),
    st.integers(1, 2),
    st.integers(4, 8),
    jumps,
    targets,
    st.integers(0, 2**31 - 1),
)
def test_on_an_accelerator_an_operator_that_jumps_is_held_at_the_same_step(
    padding_mode: str, stride: int, side: int, jump: tuple[str, float], target: float, seed: int
) -> None:
    """Operator mode: up to ``GRAM_LIMIT_ACCELERATOR`` inputs or outputs solved exactly."""
    torch.manual_seed(seed)
    layer = nn.Conv2d(8, 10, 3, stride=stride, padding=1, padding_mode=padding_mode)
    x = torch.randn(2, 8, side, side)  # 128 to 512 inputs
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snpatch.engine, "on_accelerator", lambda device: True)
        snpatch.apply_spectral_norm(layer, lipschitz=target, method="operator")
        layer(x)
        original = layer.parametrizations.weight.original
        _jump(original, *jump, torch.Generator().manual_seed(seed))
        layer(x)
    assert math.isclose(dense_norm(layer, (side, side)), target, rel_tol=1e-3)


def test_a_model_trained_on_an_accelerator_is_held_on_the_cpu() -> None:
    """Over the CPU's limit the block is not used on an accelerator: it is stale on return."""
    torch.manual_seed(0)
    layer = snpatch.apply_spectral_norm(nn.Linear(120, 100))
    original = layer.parametrizations.weight.original
    generator = torch.Generator().manual_seed(1)
    layer.train()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snpatch.engine, "on_accelerator", lambda device: True)
        for _ in range(3):  # moves that leave the block fitted at patch time behind
            _jump(original, "new", 1.0, generator)
            _ = layer.weight
            assert exact_sigma(layer)["weight"] == pytest.approx(1.0, rel=1e-3)
    _jump(original, "new", 1.0, generator)  # back on the CPU (model.cpu()): the block step
    _ = layer.weight
    assert exact_sigma(layer)["weight"] == pytest.approx(1.0, rel=HELD)
