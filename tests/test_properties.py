"""Property tests: every patched layer's top singular value sits at the target.

The exact value is computed independently (dense ``torch.linalg.matrix_norm(ord=2)`` in
float64) on layers drawn from explicit strategies for kinds, shapes, strides, groups,
dilations, padding modes, targets and weight scales.
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import snpatch
from tests.conftest import exact_sigma

AFTER_PATCH_RTOL = 1e-3  # the foundation's promise right after apply_spectral_norm
TRACKING_RTOL = 5e-3  # the promise during training

KINDS = {
    "Linear": (nn.Linear, 0),
    "Conv1d": (nn.Conv1d, 1),
    "Conv2d": (nn.Conv2d, 2),
    "Conv3d": (nn.Conv3d, 3),
    "ConvTranspose1d": (nn.ConvTranspose1d, 1),
    "ConvTranspose2d": (nn.ConvTranspose2d, 2),
    "ConvTranspose3d": (nn.ConvTranspose3d, 3),
}

targets = st.floats(min_value=0.05, max_value=20.0, allow_nan=False)
log_scales = st.floats(min_value=-3.0, max_value=3.0).map(lambda e: 10.0**e)


@st.composite
def layers(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    kind = draw(st.sampled_from(sorted(KINDS)))
    cls, spatial = KINDS[kind]
    if spatial == 0:
        features_in = draw(st.integers(1, 48))
        features_out = draw(st.integers(1, 48))
        layer = cls(features_in, features_out, bias=draw(st.booleans()))
        x = torch.randn(3, features_in)
    else:
        groups = draw(st.integers(1, 4))
        channels_in = groups * draw(st.integers(1, 4))
        channels_out = groups * draw(st.integers(1, 4))
        kernel = draw(st.integers(1, 4 if spatial < 3 else 2))
        stride = draw(st.integers(1, 3))
        dilation = draw(st.integers(1, 2))
        kwargs: dict[str, object] = {"stride": stride, "dilation": dilation, "groups": groups}
        if "Transpose" in kind:
            if stride > 1 and draw(st.booleans()):
                kwargs["output_padding"] = stride - 1
        else:
            kwargs["padding"] = draw(st.integers(0, 2))
            kwargs["padding_mode"] = draw(
                st.sampled_from(["zeros", "reflect", "replicate", "circular"])
            )
        layer = cls(channels_in, channels_out, kernel, **kwargs)
        size = draw(st.integers(dilation * (kernel - 1) + 3, 9))
        x = torch.randn(2, channels_in, *([size] * spatial))
    with torch.no_grad():
        layer.weight.mul_(draw(log_scales))
    return layer, x


def _relative_errors(layer: nn.Module, target: float) -> list[float]:
    return [abs(sigma / target - 1) for sigma in exact_sigma(layer).values()]


@given(layers(), targets)
def test_hard_mode_is_at_target_after_patching(
    case: tuple[nn.Module, torch.Tensor], target: float
) -> None:
    layer, x = case
    snpatch.apply_spectral_norm(layer, lipschitz=target)
    assert max(_relative_errors(layer.eval(), target)) <= AFTER_PATCH_RTOL
    layer.train()
    layer(x)  # one training forward: one more iteration step, still at target
    assert max(_relative_errors(layer, target)) <= AFTER_PATCH_RTOL


@given(layers(), targets, st.sampled_from(["sgd", "adam"]))
def test_hard_mode_tracks_target_while_training(
    case: tuple[nn.Module, torch.Tensor], target: float, optimizer: str
) -> None:
    layer, x = case
    # A single-element weight has a zero gradient under hard normalization: nothing moves.
    assume(layer.weight.numel() > 1)
    rms = float(layer.weight.detach().pow(2).mean().sqrt())
    snpatch.apply_spectral_norm(layer, lipschitz=target)
    original = layer.parametrizations.weight.original
    start = original.detach().clone()
    # Step sizes scaled to the weights, so that every weight scale visibly moves, by
    # about 1-3% a step (Adam: ~1% of the RMS weight; SGD: 3% of the norm at step 1).
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(layer.parameters(), lr=1.0)
        if optimizer == "sgd"
        else torch.optim.Adam(layer.parameters(), lr=0.01 * rms)
    )
    probe = torch.randn_like(layer(x))
    for step in range(5):
        loss = (layer(x) * probe).sum() + layer(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if optimizer == "sgd" and step == 0:
            grad_norm = float(original.grad.norm())  # type: ignore[union-attr]
            assume(grad_norm > 0)
            opt.param_groups[0]["lr"] = 0.03 * float(start.norm()) / grad_norm
        opt.step()
        layer(x)  # the forward the next step would run: the estimate is refreshed
        assert max(_relative_errors(layer, target)) <= TRACKING_RTOL
    change = (original.detach() - start).norm() / start.norm()
    assert change > 1e-3  # the weights visibly moved


@given(layers(), targets)
def test_soft_mode_never_exceeds_target_and_keeps_small_layers(
    case: tuple[nn.Module, torch.Tensor], target: float
) -> None:
    layer = case[0]
    raw = layer.weight.detach().clone()
    raw_sigma = max(exact_sigma(layer).values())
    snpatch.apply_spectral_norm(layer, lipschitz=target, mode="soft")
    layer.eval()
    effective = max(exact_sigma(layer).values())
    assert effective <= target * (1 + AFTER_PATCH_RTOL)
    if raw_sigma <= target * (1 - AFTER_PATCH_RTOL):
        assert torch.equal(layer.weight, raw)  # already within the bound: untouched
    else:
        assert math.isclose(effective, target, rel_tol=AFTER_PATCH_RTOL)


@given(layers(), targets, targets)
def test_set_lipschitz_retargets_without_losing_state(
    case: tuple[nn.Module, torch.Tensor], first: float, second: float
) -> None:
    layer = case[0]
    snpatch.apply_spectral_norm(layer, lipschitz=first)
    norm = snpatch.spectral_norms(layer)["weight"]
    state = (norm._u.clone(), norm._v.clone(), norm._block.clone())
    snpatch.set_lipschitz(layer, second)
    assert torch.equal(norm._u, state[0])
    assert torch.equal(norm._v, state[1])
    assert torch.equal(norm._block, state[2])
    assert max(_relative_errors(layer.eval(), second)) <= AFTER_PATCH_RTOL


@given(
    sigma=st.one_of(
        st.sampled_from([0.0, -1.0, math.inf, 1e-30]),
        st.floats(min_value=2**-20, max_value=2.0**20, allow_nan=False, width=32),
    ),
    lipschitz=targets,
    soft=st.booleans(),
)
def test_the_scale_is_c_over_sigma(sigma: float, lipschitz: float, soft: bool) -> None:
    # c / sigma (hard) or min(1, c / sigma) (soft), sigma clamped to eps; c at sigma <= 0.
    from snpatch.engine import scale_of

    value = torch.tensor(sigma)
    scale = scale_of(value, lipschitz, soft, 1e-12)
    assert scale.dtype == torch.float32 and scale.shape == ()
    factor = lipschitz / max(float(value), 1e-12) if float(value) > 0 else lipschitz
    expected = torch.tensor(min(factor, 1.0) if soft else factor)  # float32
    torch.testing.assert_close(scale, expected, rtol=3e-7, atol=0)
    if sigma <= 0:
        assert torch.equal(scale, expected)
