"""``method="operator"`` and certified bounds, checked against dense Jacobians.

The reference is independent of snpatch's functional form: a fresh, unpatched torch layer
with the same constructor arguments and the effective weight, whose Jacobian (float64, the
images of a basis) gives the exact l2 operator norm through
``torch.linalg.matrix_norm(J, 2)``.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import snpatch
from snpatch.audit import SYNCHRONIZING_OPS, _Recorder
from snpatch.operator import ConvSpec, OperatorNorm, _certified_divisor, _conv_bound_up_to

# The costliest properties (training steps; the every-size bound on a fine grid) run a
# third of the profile's examples, so that the CI profile keeps this file near a minute.
FEWER = settings(max_examples=max(10, settings().max_examples // 3))

TRAINED_RTOL = 5e-3  # after one training forward (the acceptance)
TRACKING_RTOL = 1e-2  # after training steps that change the weights

KINDS = {
    "Conv1d": (nn.Conv1d, 1),
    "Conv2d": (nn.Conv2d, 2),
    "Conv3d": (nn.Conv3d, 3),
    "ConvTranspose1d": (nn.ConvTranspose1d, 1),
    "ConvTranspose2d": (nn.ConvTranspose2d, 2),
    "ConvTranspose3d": (nn.ConvTranspose3d, 3),
}
MODES = ["zeros", "reflect", "replicate", "circular"]


def plain_copy(layer: nn.Module) -> nn.Module:
    """An unpatched torch layer with ``layer``'s options and effective weight, float64."""
    assert isinstance(layer, nn.modules.conv._ConvNd)
    kwargs: dict[str, object] = {
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "groups": layer.groups,
        "bias": False,
    }
    if layer.transposed:
        kwargs["output_padding"] = layer.output_padding
    else:
        kwargs["padding_mode"] = layer.padding_mode
    cls = type(layer)
    if snpatch.is_patched(layer):
        cls = cls.__bases__[0]  # the parametrized class derives from the original
    copy_ = cls(layer.in_channels, layer.out_channels, layer.kernel_size, **kwargs).double()
    with torch.no_grad():
        copy_.weight.copy_(layer.weight.detach())
    return copy_


def dense_norm(layer: nn.Module, size: tuple[int, ...]) -> float:
    """Exact l2 operator norm of ``layer`` (bias aside) on inputs of spatial ``size``."""
    reference = plain_copy(layer)
    n = reference.in_channels * math.prod(size)
    # The layer is linear (no bias): its Jacobian's columns are the images of a basis.
    basis = torch.eye(n, dtype=torch.float64).reshape(n, reference.in_channels, *size)
    with torch.no_grad():
        jacobian_t = reference(basis).reshape(n, -1)
    return float(torch.linalg.matrix_norm(jacobian_t, ord=2))


@st.composite
def conv_layers(draw: st.DrawFn, max_inputs: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """A small convolution of any kind and an input size it accepts."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    cls, ndim = KINDS[kind]
    groups = draw(st.integers(1, 2))
    channels_in = groups * draw(st.integers(1, 3))
    channels_out = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3 if ndim < 3 else 2))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    extent = dilation * (kernel - 1) + 1
    kwargs: dict[str, object] = {"stride": stride, "dilation": dilation, "groups": groups}
    if "Transpose" in kind:
        kwargs["padding"] = draw(st.integers(0, (extent - 1) // 2))
        if stride > 1 and draw(st.booleans()):
            kwargs["output_padding"] = draw(st.integers(1, stride - 1))
        low = 1
    else:
        padding = draw(st.integers(0, 2))
        kwargs["padding"] = padding
        kwargs["padding_mode"] = draw(st.sampled_from(MODES))
        low = max(extent - 2 * padding, padding + 1, 1)
    largest = int((max_inputs / channels_in) ** (1 / ndim))
    assume(largest >= low)
    size = tuple(draw(st.integers(low, min(largest, 7))) for _ in range(ndim))
    layer = cls(channels_in, channels_out, kernel, **kwargs)
    with torch.no_grad():
        layer.weight.mul_(draw(st.floats(0.1, 10.0)))
    return layer, size


def _input(layer: nn.Module, size: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, layer.in_channels, *size)  # type: ignore[arg-type]


targets = st.floats(min_value=0.1, max_value=10.0)


@given(conv_layers(), targets)
def test_one_training_forward_puts_the_operator_norm_at_target(
    case: tuple[nn.Module, tuple[int, ...]], target: float
) -> None:
    layer, size = case
    snpatch.apply_spectral_norm(layer, lipschitz=target, method="operator")
    layer(_input(layer, size))
    assert math.isclose(dense_norm(layer, size), target, rel_tol=TRAINED_RTOL)
    layer.eval()  # eval divides by the same estimate: the same weight
    assert math.isclose(dense_norm(layer, size), target, rel_tol=TRAINED_RTOL)


@FEWER
@given(conv_layers(max_inputs=100), targets)
def test_operator_norm_tracks_the_target_while_training(
    case: tuple[nn.Module, tuple[int, ...]], target: float
) -> None:
    layer, size = case
    assume(layer.weight.numel() > 1)
    snpatch.apply_spectral_norm(layer, lipschitz=target, method="operator")
    x = _input(layer, size)
    original = layer.parametrizations.weight.original
    start = original.detach().clone()
    # Adam at ~1% of the RMS weight per step: the weights visibly move.
    rms = float(start.pow(2).mean().sqrt())
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01 * rms)
    probe = torch.randn_like(layer(x))
    for _ in range(4):
        loss = (layer(x) * probe).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer(x)
    assume(float((original.detach() - start).norm() / start.norm()) > 1e-3)
    assert math.isclose(dense_norm(layer, size), target, rel_tol=TRACKING_RTOL)


@FEWER
@given(conv_layers())
def test_certified_bound_is_never_below_the_dense_norm(
    case: tuple[nn.Module, tuple[int, ...]],
) -> None:
    layer, size = case
    exact = dense_norm(layer, size)
    assert snpatch.lipschitz_bound(layer, (layer.in_channels, *size)) >= exact * (1 - 1e-9)  # type: ignore[arg-type]
    assert snpatch.lipschitz_bound(layer) >= exact * (1 - 1e-9)


@pytest.mark.parametrize(
    ("padding_mode", "size", "slack"),
    [("zeros", 16, 0.03), ("circular", 16, 1e-4)],
)
def test_certified_bound_is_tight_for_3x3(padding_mode: str, size: int, slack: float) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1, padding_mode=padding_mode)
    spec = snpatch.operator.ConvSpec.of(conv)
    exact = snpatch.operator.operator_norm(spec, conv.weight, (size, size))
    bound = snpatch.lipschitz_bound(conv, (8, size, size))
    assert exact <= bound <= exact * (1 + slack)


def test_strided_bound_uses_the_polyphase_form() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    exact = dense_norm(conv, (12, 12))
    # Bounding the stride-1 convolution instead would be ~40% above.
    assert exact <= snpatch.lipschitz_bound(conv, (4, 12, 12)) <= exact * 1.05


def test_constant_kernel_matrix_norm_is_far_from_operator_norm() -> None:
    conv = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    snpatch.apply_spectral_norm(conv)  # torch's convention: the kernel as a 1x25 matrix
    assert dense_norm(conv, (16, 16)) > 4.0
    other = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        other.weight.fill_(1.0)
    snpatch.apply_spectral_norm(other, method="operator")
    other(torch.randn(1, 1, 16, 16))
    assert math.isclose(dense_norm(other, (16, 16)), 1.0, rel_tol=TRAINED_RTOL)


def test_larger_inputs_re_estimate_and_smaller_keep() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    snpatch.apply_spectral_norm(conv, method="operator")
    norm = snpatch.spectral_norms(conv)["weight"]
    assert isinstance(norm, OperatorNorm)
    assert norm.input_size is None
    conv.eval()(torch.randn(1, 3, 4, 4))  # eval records the size too
    assert norm.input_size == (4, 4)
    conv.train()(torch.randn(1, 3, 7, 5))
    assert norm.input_size == (7, 5)
    assert math.isclose(dense_norm(conv, (7, 5)), 1.0, rel_tol=TRAINED_RTOL)
    conv(torch.randn(1, 3, 3, 6))  # elementwise largest
    assert norm.input_size == (7, 6)
    conv(torch.randn(2, 3, 5, 5))
    assert norm.input_size == (7, 6)
    assert dense_norm(conv, (5, 5)) <= 1.0 + TRAINED_RTOL  # zero padding: smaller is lower


def test_before_any_input_the_weight_is_normalized_by_its_matrix_norm() -> None:
    conv = nn.Conv2d(3, 5, 3)
    snpatch.apply_spectral_norm(conv, method="operator", lipschitz=2.0)
    matrix = conv.weight.detach().flatten(1).double()
    assert math.isclose(float(torch.linalg.matrix_norm(matrix, ord=2)), 2.0, rel_tol=1e-3)


def test_example_inputs_record_sizes_without_changing_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv1d(4, 2, 1))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    model[1].eval()
    stats = model[1].running_mean.clone()
    snpatch.apply_spectral_norm(model, method="operator", example_inputs=(torch.randn(2, 3, 6, 6),))
    assert model[0].training
    assert not model[1].training
    assert torch.equal(model[1].running_mean, stats)
    norm = snpatch.spectral_norms(model[0])["weight"]
    assert isinstance(norm, OperatorNorm)
    assert norm.input_size == (6, 6)
    model.eval()
    assert math.isclose(dense_norm(model[0], (6, 6)), 1.0, rel_tol=TRAINED_RTOL)


def test_bad_example_inputs_leave_the_model_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    keys = list(model.state_dict())
    with pytest.raises(snpatch.InvalidArgumentError, match="the model's forward failed"):
        snpatch.apply_spectral_norm(
            model, method="operator", example_inputs=(torch.randn(1, 5, 8, 8),)
        )
    with pytest.raises(snpatch.InvalidArgumentTypeError, match=r"pass \(x,\)"):
        snpatch.apply_spectral_norm(
            model, method="operator", example_inputs=torch.randn(1, 3, 8, 8)
        )  # type: ignore[arg-type]
    with pytest.raises(snpatch.InvalidArgumentError, match="method must be"):
        snpatch.apply_spectral_norm(model, method="spectral")  # type: ignore[arg-type]
    with pytest.raises(snpatch.InvalidArgumentError, match="pass method='operator'"):
        snpatch.apply_spectral_norm(model, certified=True)
    assert not snpatch.is_patched(model)
    assert list(model.state_dict()) == keys
    assert model[0].training


def test_linear_layers_keep_the_matrix_parametrization() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Conv1d(3, 3, 3))
    snpatch.apply_spectral_norm(model, method="operator")
    assert type(snpatch.spectral_norms(model[0])["weight"]) is snpatch.SpectralNorm
    assert isinstance(snpatch.spectral_norms(model[1])["weight"], OperatorNorm)


def test_certified_layers_never_exceed_the_target() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(64, 3)
    )
    snpatch.apply_spectral_norm(model, method="operator", certified=True, lipschitz=1.5)
    conv = model[0]
    # No size yet: a bound for every size.
    for size in (3, 4, 5):
        assert dense_norm(conv, (size, size)) <= 1.5
    x = torch.randn(4, 2, 4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = model(x).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model(x)
        assert dense_norm(conv, (4, 4)) <= 1.5
        linear = model[2].weight.detach().double()
        assert float(torch.linalg.matrix_norm(linear, ord=2)) <= 1.5


def test_gradients_flow_through_the_operator_norm() -> None:
    torch.manual_seed(4)
    conv = nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular").double()
    snpatch.apply_spectral_norm(
        conv, method="operator", example_inputs=(torch.randn(1, 2, 6).double(),)
    )
    conv.eval()
    norm = snpatch.spectral_norms(conv)["weight"]
    weight = conv.parametrizations.weight.original.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: norm(w), (weight,))
    assert torch.autograd.gradgradcheck(lambda w: norm(w), (weight,))


def test_state_dict_save_load_deepcopy_and_dtype() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2)
    )
    snpatch.apply_spectral_norm(model, method="operator")
    x = torch.randn(2, 3, 5, 5)
    model(x)
    keys = {k for k in model.state_dict() if "parametrizations" in k}
    assert keys == {
        f"{i}.parametrizations.weight.{name}"
        for i in (0, 2)
        for name in ("original", "0._u", "0._v", "0._input_size", "0._op_v")
    }
    model.eval()
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2)
    )
    snpatch.apply_spectral_norm(fresh, method="operator")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    assert snpatch.spectral_norms(fresh[0])["weight"].input_size == (5, 5)  # type: ignore[attr-defined]
    torch.testing.assert_close(fresh(x), expected)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), expected)
    wide = copy.deepcopy(model).double()
    torch.testing.assert_close(wide(x.double()).float(), expected, rtol=1e-4, atol=1e-5)


def test_config_rebuilds_the_parametrization_without_estimating() -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="replicate")
    snpatch.apply_spectral_norm(
        conv, method="operator", certified=True, example_inputs=(torch.randn(1, 3, 6, 6),)
    )
    norm = snpatch.spectral_norms(conv)["weight"]
    assert isinstance(norm, OperatorNorm)
    config = norm.config()
    assert all(isinstance(v, (int, float, str, tuple, type(None))) for v in config.values())
    weight = conv.parametrizations.weight.original
    buffers = {name: buffer.clone() for name, buffer in norm.named_buffers()}
    calls: list[int] = []
    original_lanczos = snpatch.operator.lanczos_top
    rng = torch.get_rng_state()
    try:
        snpatch.operator.lanczos_top = lambda *a, **k: calls.append(1) or original_lanczos(*a, **k)  # type: ignore[assignment]
        rebuilt = OperatorNorm.from_config(config, buffers)
    finally:
        snpatch.operator.lanczos_top = original_lanczos
    assert not calls
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn
    assert rebuilt.config() == config
    for name, buffer in norm.named_buffers():
        assert torch.equal(rebuilt.get_buffer(name), buffer)
    assert rebuilt.input_size == norm.input_size
    norm.eval()
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(weight), norm(weight))


# --- issue 13: inference mode, rank-deficient operators, certified for any forward ------


@pytest.mark.parametrize("certified", [False, True])
@pytest.mark.parametrize("first", [6, 9], ids=["same-size", "larger"])
def test_state_recorded_under_inference_mode_keeps_training(certified: bool, first: int) -> None:
    # Lightning's trainer.validate() / predict() before fit: the first forward runs under
    # torch.inference_mode, in eval mode; training must go on from the state it recorded.
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    snpatch.apply_spectral_norm(conv, method="operator", certified=certified)
    norm = snpatch.spectral_norms(conv)["weight"]
    assert isinstance(norm, OperatorNorm)
    conv.eval()
    with torch.inference_mode():
        conv(torch.randn(1, 3, 6, 6))
    assert norm.input_size == (6, 6)
    assert not any(buffer.is_inference() for buffer in norm.buffers())
    conv.train()
    conv(torch.randn(2, 3, first, first)).sum().backward()
    conv.eval()
    with torch.inference_mode():  # a first larger input under inference mode, after training
        conv(torch.randn(1, 3, 11, 11))
    assert norm.input_size == (11, 11)
    conv.train()
    conv(torch.randn(2, 3, 11, 11)).sum().backward()
    exact = dense_norm(conv, (11, 11))
    assert exact <= 1.0 if certified else math.isclose(exact, 1.0, rel_tol=TRAINED_RTOL)


def _rank_deficient() -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Layers whose operator has rank below both of its dimensions, and an input size."""
    torch.manual_seed(8)
    # Kernel extent below the stride, with padding: some inputs are never read.
    skipping = nn.Conv2d(2, 4, (1, 4), stride=(2, 1), padding=(1, 3), bias=False)  # the issue's
    constant = nn.Conv1d(2, 2, 2, stride=2, padding=2, bias=False)
    grouped = nn.Conv1d(18, 24, 1, stride=3, groups=3, bias=False)
    with torch.no_grad():
        constant.weight.fill_(0.5)
        grouped.weight.fill_(1.0)
    return [(skipping, (4, 4)), (constant, (9,)), (grouped, (20,))]


def _dense_matrix(layer: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    reference = plain_copy(layer)
    n = reference.in_channels * math.prod(size)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, reference.in_channels, *size)
    with torch.no_grad():
        return reference(basis).reshape(n, -1)


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lanczos_never_exceeds_the_norm_of_a_rank_deficient_operator(
    index: int, dtype: torch.dtype
) -> None:
    layer, size = _rank_deficient()[index]
    matrix = _dense_matrix(layer, size)
    assert int(torch.linalg.matrix_rank(matrix)) < min(matrix.shape)  # what the case is for
    exact = float(torch.linalg.matrix_norm(matrix, ord=2))
    spec = snpatch.operator.ConvSpec.of(layer)
    apply, adjoint, n = snpatch.operator.linear_maps(spec, layer.weight.detach().to(dtype), size)
    steps = min(n, matrix.shape[1])  # as many steps as the smaller dimension, as operator mode
    rtol = 1e-9 if dtype == torch.float64 else 1e-5
    for seed in range(10):
        start = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        value, basis = snpatch.parametrization.lanczos_top(apply, adjoint, steps, 4, start)
        assert exact * (1 - 1e-4) <= value <= exact * (1 + rtol)
        torch.testing.assert_close(basis.mT @ basis, torch.eye(4, dtype=dtype))


def test_operator_norm_of_a_constant_grouped_strided_conv() -> None:
    conv = nn.Conv1d(18, 24, 1, stride=3, groups=3, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    value = snpatch.operator.operator_norm(snpatch.operator.ConvSpec.of(conv), conv.weight, (89,))
    assert math.isclose(value, math.sqrt(48.0), rel_tol=1e-9)  # 6.93; Lanczos gave 7.52
    assert math.isclose(value, dense_norm(conv, (89,)), rel_tol=1e-9)


@pytest.mark.parametrize("index", range(3))
def test_rank_deficient_layers_sit_at_their_target(index: int) -> None:
    layer, size = _rank_deficient()[index]
    x = torch.randn(2, layer.in_channels, *size)  # type: ignore[arg-type]
    snpatch.apply_spectral_norm(layer, method="operator", example_inputs=(x,))
    assert math.isclose(dense_norm(layer, size), 1.0, rel_tol=TRAINED_RTOL)
    layer(x)
    assert math.isclose(dense_norm(layer, size), 1.0, rel_tol=TRAINED_RTOL)


def _certified_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, padding=1, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(64, 3),
    )


def _certified_norms(model: nn.Module) -> list[float]:
    linear = model[4].weight.detach().double()
    return [
        dense_norm(model[0], (8, 8)),
        dense_norm(model[2], (8, 8)),
        float(torch.linalg.matrix_norm(linear, ord=2)),
    ]


def test_certified_holds_for_the_eval_weight_after_each_optimizer_step() -> None:
    torch.manual_seed(9)
    x = torch.randn(8, 3, 8, 8)
    model = _certified_net()
    snpatch.apply_spectral_norm(
        model, method="operator", certified=True, lipschitz=0.8, example_inputs=(x,)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        model.train()
        loss = model(x).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()  # no training forward since the step: the eval weight is the new one
        assert max(_certified_norms(model)) <= 0.8


def test_certified_model_loads_with_the_eval_outputs_it_was_saved_with() -> None:
    torch.manual_seed(10)
    x = torch.randn(8, 3, 8, 8)
    model = _certified_net()
    snpatch.apply_spectral_norm(model, method="operator", certified=True, example_inputs=(x,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(x).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _certified_net()
    snpatch.apply_spectral_norm(fresh, method="operator", certified=True, example_inputs=(x,))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize(("value", "lipschitz"), [(3.0, 1.0), (3.0, 0.7), (0.3, 0.7), (1.0, 0.7)])
def test_certified_divisor_is_rounded_up(value: float, lipschitz: float) -> None:
    # A rank-1 operator: the float64 bound is exact, so rounding it to nearest float32
    # (the state's dtype) put the layer 1 ulp above its target (1.000000067 for 3.0).
    conv = nn.Conv1d(1, 1, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(value)
    snpatch.apply_spectral_norm(
        conv,
        method="operator",
        certified=True,
        lipschitz=lipschitz,
        example_inputs=(torch.randn(1, 1, 2),),
    )
    for mode in (True, False):
        conv.train(mode)
        assert dense_norm(conv, (2,)) <= lipschitz


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_certified_holds_in_every_weight_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(11)
    worst = 0.0
    for _ in range(5):
        conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        snpatch.apply_spectral_norm(
            conv, method="operator", certified=True, example_inputs=(torch.randn(1, 3, 6, 6),)
        )
        conv.to(dtype).eval()
        worst = max(worst, dense_norm(conv, (6, 6)))
    assert worst <= 1.0


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
@pytest.mark.parametrize("budget", [None, 0.0], ids=["every-size", "structural"])
def test_certified_non_zero_padding_holds_at_every_smaller_size(
    mode: str, budget: float | None
) -> None:
    torch.manual_seed(12)
    original = snpatch.operator._UP_TO_BUDGET
    worst = 0.0
    try:
        if budget is not None:
            snpatch.operator._UP_TO_BUDGET = budget  # the path for layers too big to enumerate
        for stride in (1, 2):
            conv = nn.Conv2d(2, 3, 3, stride=stride, padding=1, padding_mode=mode)
            snpatch.apply_spectral_norm(
                conv, method="operator", certified=True, example_inputs=(torch.randn(1, 2, 8, 8),)
            )
            conv.eval()
            for m in range(2, 9):
                for size in ((m, m), (m, 8)):
                    worst = max(worst, dense_norm(conv, size))
    finally:
        snpatch.operator._UP_TO_BUDGET = original
    assert worst <= 1.0


@FEWER
@given(conv_layers(max_inputs=100), st.data())
def test_bound_up_to_a_size_holds_at_every_smaller_size(
    case: tuple[nn.Module, tuple[int, ...]], data: st.DataObject
) -> None:
    layer, size = case
    spec = snpatch.operator.ConvSpec.of(layer)
    extent = [d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation, strict=True)]
    pads = spec.total_padding()
    # A smaller size the layer accepts (reflect needs more input than padding).
    low = [
        max(1, e - p, (p // 2 + 1) if spec.padding_mode == "reflect" else 1)
        for e, p in zip(extent, pads, strict=True)
    ]
    assume(all(lo <= n for lo, n in zip(low, size, strict=True)))
    smaller = tuple(data.draw(st.integers(lo, n)) for lo, n in zip(low, size, strict=True))
    assume(min(spec.output_size(smaller, layer.weight)) >= 1)
    exact = dense_norm(layer, smaller)
    assert snpatch.operator.conv_bound_up_to(spec, layer.weight, size) >= exact * (1 - 1e-9)
    original = snpatch.operator._UP_TO_BUDGET
    try:
        snpatch.operator._UP_TO_BUDGET = 0.0
        assert snpatch.operator.conv_bound_up_to(spec, layer.weight, size) >= exact * (1 - 1e-9)
    finally:
        snpatch.operator._UP_TO_BUDGET = original


@st.composite
def adjoint_cases(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...], int]:
    """A float64 convolution of any kind and options, an input size it accepts, a seed.

    Per-dimension kernels, strides, dilations and paddings (``"same"``'s padding is uneven
    for an even extent), every padding mode, an ``output_padding`` up to the stride or the
    dilation (whichever is larger), odd and even sizes.
    """
    kind = draw(st.sampled_from(sorted(KINDS)))
    cls, ndim = KINDS[kind]
    transposed = "Transpose" in kind
    groups = draw(st.integers(1, 2))
    channels_in = groups * draw(st.integers(1, 2))
    channels_out = groups * draw(st.integers(1, 2))

    def per_dim(values: st.SearchStrategy[int]) -> tuple[int, ...]:
        return tuple(draw(st.lists(values, min_size=ndim, max_size=ndim)))

    padding: tuple[int, ...] | str = "ints"
    if not transposed:
        padding = draw(st.sampled_from(["ints", "valid", "same"]))
    kernel = per_dim(st.integers(1, 3 if ndim < 3 else 2))
    stride = (1,) * ndim if padding == "same" else per_dim(st.integers(1, 3))
    dilation = per_dim(st.integers(1, 2))
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    kwargs: dict[str, object] = {
        "stride": stride,
        "dilation": dilation,
        "groups": groups,
        "bias": False,
    }
    if padding == "ints":
        padding = per_dim(st.integers(0, 2))
        pads = [(p, p) for p in padding]
    else:
        pads = [
            ((e - 1) // 2, e - 1 - (e - 1) // 2) if padding == "same" else (0, 0) for e in extent
        ]
    kwargs["padding"] = padding
    # The smallest size each dimension accepts.
    low = [1] * ndim
    if transposed:
        output_padding = tuple(
            draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)
        )
        kwargs["output_padding"] = output_padding
        # Output (n - 1) s - 2 p + extent + output_padding >= 1.
        low = [
            max(1, 1 - (e + o - 2 * p[0] - 1) // s)
            for e, o, p, s in zip(extent, output_padding, pads, stride, strict=True)
        ]
    else:
        mode = draw(st.sampled_from(MODES))
        kwargs["padding_mode"] = mode
        low = [
            max(1, e - sum(p), max(p) + 1 if mode == "reflect" else max(p))
            for e, p in zip(extent, pads, strict=True)
        ]
    size = tuple(draw(st.integers(lo, lo + (4 if ndim < 3 else 2))) for lo in low)
    layer = cls(channels_in, channels_out, kernel, **kwargs).double()
    return layer, size, draw(st.integers(0, 2**32 - 1))


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")
@given(adjoint_cases())
def test_the_explicit_adjoint_is_the_adjoint_of_the_layer(
    case: tuple[nn.Module, tuple[int, ...], int],
) -> None:
    layer, size, seed = case
    spec = snpatch.operator.ConvSpec.of(layer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    weight = layer.weight.detach()
    x = torch.randn(2, spec.in_channels, *size, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        ax = layer(x)
    y = torch.randn(ax.shape, generator=generator, dtype=torch.float64)
    aty = spec.adjoint(y, weight, size)
    assert aty.shape == x.shape
    # <A x, y> == <x, A^T y>, relative to the Cauchy-Schwarz scale of the two sides.
    gap = torch.vdot(ax.flatten(), y.flatten()) - torch.vdot(x.flatten(), aty.flatten())
    assert float(gap.abs()) <= 1e-10 * float(ax.norm() * y.norm() + x.norm() * aty.norm())
    # And it is autograd's pullback of torch's own layer.
    _, pullback = torch.func.vjp(lambda v: layer(v), x)
    torch.testing.assert_close(aty, pullback(y)[0], rtol=1e-10, atol=1e-12)


# --- issue 14: the certified divisor on the device, with no host synchronization -------

# Measured on 800 random Grams and 135 random layers (scratch comparison against the
# host computation it replaced): within 1e-5 of lambda_max, never above the old bound.
CERTIFIED_TIGHT = 1e-5


def _sync_free(compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` on real tensors, asserting it dispatches no synchronizing op."""
    recorder = _Recorder()
    with recorder:
        value = compute()
    assert set(recorder.ops) & SYNCHRONIZING_OPS == set()
    return value


@FEWER
@given(conv_layers())
def test_device_certified_bound_is_above_the_dense_norm_and_tight(
    case: tuple[nn.Module, tuple[int, ...]],
) -> None:
    layer, size = case
    spec = ConvSpec.of(layer)
    weight = layer.weight.detach()
    exact = dense_norm(layer, size)
    bound = float(_sync_free(lambda: _conv_bound_up_to(spec, weight, size)))
    assert bound >= exact * (1 - 1e-9)
    if spec.transposed or spec.padding_mode == "zeros":  # the dense matrix on ``size``
        assert bound <= exact * (1 + CERTIFIED_TIGHT)
    divisor = float(_sync_free(lambda: _certified_divisor(spec, weight, 0, size)))
    assert divisor >= bound


@given(
    st.integers(1, 96),
    st.integers(1, 96),
    st.floats(1e-3, 1e3),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_device_certified_matrix_bound_is_above_the_norm_and_tight(
    rows: int, cols: int, scale: float, dtype: torch.dtype
) -> None:
    weight = (torch.randn(rows, cols) * scale).to(dtype)
    exact = float(torch.linalg.matrix_norm(weight.double(), ord=2))
    divisor = _sync_free(lambda: _certified_divisor(None, weight, 0, None))
    assert divisor.dtype == torch.float64
    value = float(divisor)
    rounding = torch.finfo(dtype).eps * float(weight.double().norm())
    assert exact <= value <= (exact * (1 + CERTIFIED_TIGHT) + rounding) * (1 + 1e-6)


def test_device_certified_bound_of_a_zero_weight_is_zero() -> None:
    assert float(_certified_divisor(None, torch.zeros(4, 3), 0, None)) == 0.0
    spec = ConvSpec.of(nn.Conv2d(2, 2, 3, padding=1))
    assert float(_certified_divisor(spec, torch.zeros(2, 2, 3, 3), 0, (16, 16))) == 0.0
