"""Every bad input: a clear, specific error naming the offending value, and an untouched model."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils import spectral_norm as legacy_spectral_norm

import snpatch
from snpatch import (
    AlreadyPatchedError,
    NoMatchingLayersError,
    NoMatchingTensorsError,
    SharedWeightError,
    SnpatchError,
    UnsupportedLayerError,
)


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))


def _snapshot(model: nn.Module) -> tuple[type, list[str], dict[str, torch.Tensor], int]:
    return (
        type(model),
        [type(m).__name__ for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        sum(len(m._forward_pre_hooks) for m in model.modules()),
    )


def _assert_unchanged(model: nn.Module, before: Any) -> None:
    after = _snapshot(model)
    assert after[0] is before[0]
    assert after[1] == before[1]
    assert after[2].keys() == before[2].keys()
    for key in before[2]:
        assert torch.equal(after[2][key], before[2][key]), key
    assert after[3] == before[3]
    assert not snpatch.is_patched(model)


BAD_ARGUMENTS = [
    ({"lipschitz": 0.0}, ValueError, "lipschitz.*0.0"),
    ({"lipschitz": -1}, ValueError, "lipschitz.*-1"),
    ({"lipschitz": math.nan}, ValueError, "lipschitz.*nan"),
    ({"lipschitz": math.inf}, ValueError, "lipschitz.*inf"),
    ({"lipschitz": "1"}, TypeError, "lipschitz.*str"),
    ({"lipschitz": True}, TypeError, "lipschitz.*bool"),
    ({"mode": "medium"}, ValueError, "mode.*'medium'"),
    ({"n_power_iterations": -1}, ValueError, "n_power_iterations.*-1"),
    ({"n_power_iterations": 1.5}, TypeError, "n_power_iterations.*1.5"),
    ({"eps": -1e-3}, ValueError, "eps.*-0.001"),
    ({"eps": math.nan}, ValueError, "eps.*nan"),
    ({"include": ""}, ValueError, "include.*empty pattern"),
    ({"include": []}, ValueError, "include is an empty list"),
    ({"include": 3}, TypeError, "include.*int: 3"),
    ({"include": ["0", 3]}, TypeError, "include must hold strings.*3"),
    ({"exclude": "re:("}, ValueError, "exclude pattern 're:\\(' is not a valid regular expression"),
    ({"include": "nothing"}, NoMatchingLayersError, "'nothing'"),
    ({"exclude": "*"}, NoMatchingLayersError, "leave no eligible layer"),
    ({"layer_types": []}, ValueError, "layer_types is empty"),
    ({"layer_types": [int]}, TypeError, "layer_types.*int"),
    ({"layer_types": "Linear"}, TypeError, "layer_types.*'Linear'"),
    ({"layer_types": [nn.BatchNorm1d]}, NoMatchingLayersError, "no eligible layers"),
    ({"tensors": "weight"}, TypeError, "tensors must be a dict.*str: 'weight'"),
    ({"tensors": {}}, ValueError, "tensors is an empty dict"),
    ({"tensors": {"Linear": "weight"}}, TypeError, "keys must be nn.Module subclasses.*'Linear'"),
    ({"tensors": {nn.Linear: 3}}, TypeError, r"tensors\[Linear\] must be a tensor name.*int: 3"),
    ({"tensors": {nn.Linear: []}}, ValueError, "a list of tensor names is empty"),
    ({"tensors": {nn.Linear: [""]}}, ValueError, "tensors holds an empty pattern ''"),
    ({"tensors": {nn.Linear: ["weight", 3]}}, TypeError, "names must be strings.*int: 3"),
    ({"tensors": {nn.Linear: "re:("}}, ValueError, "tensors pattern 're:\\(' is not a valid"),
    (
        {"tensors": {nn.Linear: "kernel"}},
        NoMatchingTensorsError,
        r"'kernel' matches no tensor of layer '3' \(Linear\); it has 'weight', 'bias'",
    ),
    (
        {"tensors": {nn.Conv2d: snpatch.TensorNames("weight", dim=4)}},
        ValueError,
        r"dim=4 is out of range for layer '0' \(Conv2d\)'s 'weight' of shape \(4, 3, 3, 3\)",
    ),
    ({"tensors": {nn.Linear: "bias"}}, UnsupportedLayerError, r"'bias' selects .* 1-D 'bias'"),
    (
        {"tensors": {nn.Conv2d: snpatch.TensorNames("weight", dim=1)}, "method": "operator"},
        ValueError,
        r"method='operator' normalizes layer '0' \(Conv2d\) by its convolution.*dim 0",
    ),
    (
        {"tensors": {nn.Linear: "*"}},
        UnsupportedLayerError,
        "1-D 'bias' of shape \\(2,\\).*narrow the pattern to the weight matrices",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    model = _model()
    before = _snapshot(model)
    with pytest.raises(error, match=message) as info:
        snpatch.apply_spectral_norm(model, **kwargs)
    assert isinstance(info.value, SnpatchError)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("model", [None, "resnet18", torch.zeros(3), nn.Linear])
def test_model_must_be_a_module(model: object) -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        snpatch.apply_spectral_norm(model)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        snpatch.select_layers(model)  # type: ignore[arg-type]


def test_an_unknown_tensor_name_changes_nothing_and_lists_the_layers_tensors() -> None:
    model = nn.Sequential(nn.LSTM(3, 4), nn.GRU(4, 4, bidirectional=True), nn.Linear(8, 2))
    before = _snapshot(model)
    tensors = {nn.RNNBase: "weight_*", nn.GRU: ["weight_hh_l0", "weight_hh_reverse"]}
    with pytest.raises(NoMatchingTensorsError) as info:
        snpatch.apply_spectral_norm(model, tensors=tensors)
    message = str(info.value)
    assert message.startswith(
        "tensors: 'weight_hh_reverse' matches no tensor of layer '1' (GRU); it has "
        "'weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0', 'weight_ih_l0_reverse', "
        "'weight_hh_l0_reverse', 'bias_ih_l0_reverse', 'bias_hh_l0_reverse' (closest: "
        "'weight_hh_l0_reverse'"
    ), message
    assert isinstance(info.value, NoMatchingLayersError)
    assert isinstance(info.value, ValueError)
    _assert_unchanged(model, before)  # layer '0' was fine, yet nothing was patched


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"names": 3}, TypeError, "names must be a string or a list of strings, got int: 3"),
        ({"names": ()}, ValueError, "a list of tensor names is empty"),
        ({"names": "w", "dim": True}, TypeError, "dim must be an int or None, got bool: True"),
        ({"names": "w", "dim": "0"}, TypeError, "dim must be an int or None, got str: '0'"),
    ],
)
def test_tensor_names_are_validated_on_construction(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        snpatch.TensorNames(**kwargs)
    assert isinstance(info.value, SnpatchError)


def test_patching_twice_names_the_layer() -> None:
    model = snpatch.apply_spectral_norm(_model())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AlreadyPatchedError, match="layer '0'.*snpatch"):
        snpatch.apply_spectral_norm(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert len(model[0]._forward_pre_hooks) == 1


def test_torch_parametrizations_spectral_norm_is_detected() -> None:
    model = _model()
    parametrizations.spectral_norm(model[3])
    before = model.state_dict().keys()
    with pytest.raises(AlreadyPatchedError, match="layer '3'.*parametrizations.spectral_norm"):
        snpatch.apply_spectral_norm(model)
    assert model.state_dict().keys() == before
    assert not snpatch.is_patched(model)
    snpatch.apply_spectral_norm(model, exclude="3")  # the rest can still be patched


def test_legacy_spectral_norm_is_detected() -> None:
    model = _model()
    legacy_spectral_norm(model[0])
    with pytest.raises(AlreadyPatchedError, match="layer '0'.*torch.nn.utils.spectral_norm"):
        snpatch.apply_spectral_norm(model)
    assert not snpatch.is_patched(model)


def test_other_parametrization_is_refused() -> None:
    model = _model()
    parametrizations.weight_norm(model[3])
    with pytest.raises(UnsupportedLayerError, match="layer '3'.*_WeightNorm"):
        snpatch.apply_spectral_norm(model)
    assert not snpatch.is_patched(model)
    assert parametrize.is_parametrized(model[3], "weight")


def test_lazy_layer_names_layer_and_says_run_a_forward() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    conv_weight = model[0].weight.detach().clone()
    with pytest.raises(SnpatchError, match="layer '2'.*lazy.*run one forward"):
        snpatch.apply_spectral_norm(model)
    assert not snpatch.is_patched(model)
    assert type(model[0]) is nn.Conv2d
    assert torch.equal(model[0].weight, conv_weight)
    model(torch.randn(1, 3, 3, 3))
    snpatch.apply_spectral_norm(model)  # initialized: fine now
    assert list(snpatch.patched_layers(model)) == ["0", "2"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_names_layer(bad: float) -> None:
    model = _model()
    with torch.no_grad():
        model[3].weight[0, 0] = bad
    before = _snapshot(model)
    with pytest.raises(ValueError, match="layer '3'.*non-finite"):
        snpatch.apply_spectral_norm(model)
    # The first layer was fine, but nothing was patched.
    assert not snpatch.is_patched(model)
    assert [type(m).__name__ for m in model.modules()] == before[1]


def test_one_dimensional_weight_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(UnsupportedLayerError, match="layer '1'.*1-D 'weight'"):
        snpatch.apply_spectral_norm(model, layer_types=[nn.Linear, nn.LayerNorm])
    assert not snpatch.is_patched(model)


def test_layer_without_weight_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(UnsupportedLayerError, match="layer '1'.*no tensor 'weight'"):
        snpatch.apply_spectral_norm(model, layer_types=[nn.Linear, nn.ReLU])
    assert not snpatch.is_patched(model)


def test_integer_weight_is_refused() -> None:
    layer = nn.Linear(3, 3)
    layer.weight = nn.Parameter(torch.ones(3, 3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(UnsupportedLayerError, match="torch.int64"):
        snpatch.apply_spectral_norm(layer)


def test_set_lipschitz_bad_inputs() -> None:
    model = snpatch.apply_spectral_norm(_model(), include="0")
    with pytest.raises(ValueError, match="lipschitz.*-2"):
        snpatch.set_lipschitz(model, -2)
    with pytest.raises(NoMatchingLayersError, match="include '3' matched no patched layer"):
        snpatch.set_lipschitz(model, 2.0, include="3")
    with pytest.raises(NoMatchingLayersError, match="no patched layers"):
        snpatch.set_lipschitz(_model(), 2.0)
    assert snpatch.spectral_norms(model[0])["weight"].lipschitz == 1.0


def test_errors_subclass_the_builtins_they_mean() -> None:
    assert issubclass(NoMatchingLayersError, ValueError)
    assert issubclass(AlreadyPatchedError, RuntimeError)
    assert issubclass(UnsupportedLayerError, TypeError)
    assert issubclass(SharedWeightError, ValueError)
    for error in (
        NoMatchingLayersError,
        AlreadyPatchedError,
        UnsupportedLayerError,
        SharedWeightError,
    ):
        assert issubclass(error, SnpatchError)


def test_two_selected_layers_sharing_one_weight_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    before = _snapshot(model)
    with pytest.raises(SharedWeightError, match=r"'0.weight' and '2.weight' are one tensor"):
        snpatch.apply_spectral_norm(model)
    _assert_unchanged(model, before)
    snpatch.apply_spectral_norm(model, exclude="2")  # one of them: fine


def test_a_layer_sharing_an_already_normalized_weight_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    snpatch.apply_spectral_norm(model, include="0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SharedWeightError, match=r"'2.weight' is the same tensor as '0.weight'"):
        snpatch.apply_spectral_norm(model, include="2")
    assert list(snpatch.patched_layers(model)) == ["0"]
    assert type(model[2]) is nn.Linear
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    ("steps", "error", "match"),
    [
        (0, ValueError, "steps must be >= 1.*got 0"),
        (-3, ValueError, "got -3"),
        (1.5, TypeError, "steps must be an int or None, got float: 1.5"),
        (True, TypeError, "got bool: True"),
    ],
)
def test_update_sigma_bad_steps(steps: Any, error: type[Exception], match: str) -> None:
    model = snpatch.apply_spectral_norm(_model())
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(2)  # the state is now out of date
    before = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(error, match=match) as raised:
        snpatch.update_sigma(model, steps=steps)
    assert isinstance(raised.value, SnpatchError)
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())


def test_update_sigma_needs_a_patched_model() -> None:
    with pytest.raises(NoMatchingLayersError, match=r"the model \(Sequential\) has no patched"):
        snpatch.update_sigma(_model())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        snpatch.update_sigma("model")  # type: ignore[type-var]


def test_wrapped_model_error_is_a_runtime_error() -> None:
    assert issubclass(snpatch.WrappedModelError, RuntimeError)
    assert issubclass(snpatch.WrappedModelError, SnpatchError)


def test_normalization_removed_by_torch_gets_a_clear_error_and_remove_finishes_the_job() -> None:
    torch.manual_seed(0)
    model = snpatch.apply_spectral_norm(_model())
    x = torch.randn(2, 3, 3, 3)
    parametrize.remove_parametrizations(model[0], "weight")  # torch's, not snpatch's
    plain_conv = model[0].weight.detach().clone()
    with pytest.raises(
        snpatch.ParametrizationRemovedError,
        match=r"Conv2d's 'weight' was removed outside snpatch.*snpatch.remove_spectral_norm",
    ):
        model(x)
    assert issubclass(snpatch.ParametrizationRemovedError, RuntimeError)
    with pytest.raises(snpatch.ParametrizationRemovedError):
        snpatch.spectral_norms(model[0])

    snapshot = snpatch.remove_spectral_norm(model)
    assert not snpatch.is_patched(model)
    assert list(snapshot.layers) == ["3"]  # the conv had nothing left to record
    assert list(model.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    torch.testing.assert_close(model[0].weight, plain_conv, rtol=0, atol=0)
    model(x).sum().backward()  # a plain model again, training included
    snpatch.restore_spectral_norm(model, snapshot)
    assert list(snpatch.patched_layers(model)) == ["3"]


def test_a_foreign_parametrization_in_place_of_snpatchs_is_not_taken_for_it() -> None:
    model = snpatch.apply_spectral_norm(_model())
    parametrize.remove_parametrizations(model[3], "weight")
    parametrizations.orthogonal(model[3])  # someone else's parametrization on the same name
    with pytest.raises(snpatch.ParametrizationRemovedError, match="Linear's 'weight'"):
        model(torch.randn(2, 3, 3, 3))


def _sink(tag: str, value: float, step: int) -> None:
    raise AssertionError("nothing is written after a bad argument")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: snpatch.sigma_estimates("net"), TypeError, "torch.nn.Module, got str"),
        (lambda m: snpatch.sigma_estimates(nn.Linear(2, 2)), ValueError, "no patched layer"),
        (lambda m: snpatch.exact_sigmas(nn.Linear(2, 2)), ValueError, "no patched layer"),
        (lambda m: snpatch.sigma_estimates(m, as_tensors=1), TypeError, "as_tensors.*bool"),
        (lambda m: snpatch.log_sigmas(m, object(), 0), TypeError, "add_scalar.*got object"),
        (lambda m: snpatch.log_sigmas(m, _sink, -1), ValueError, "step must be >= 0, got -1"),
        (lambda m: snpatch.log_sigmas(m, _sink, 1.0), TypeError, "step must be an int, got float"),
        (lambda m: snpatch.log_sigmas(m, _sink, 0, every=0), ValueError, "every must be >= 1"),
        (lambda m: snpatch.log_sigmas(m, _sink, 0, prefix=1), TypeError, "prefix must be a str"),
        (
            lambda m: snpatch.monitor._SigmaMonitorHooks(every_n_steps=0),
            ValueError,
            "every_n_steps must be >= 1, got 0",
        ),
    ],
)
def test_monitor_bad_arguments(call: Any, error: type[Exception], match: str) -> None:
    model = snpatch.apply_spectral_norm(_model())
    before = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(error, match=match) as raised:
        call(model)
    assert isinstance(raised.value, SnpatchError)
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
