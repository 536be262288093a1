"""The eval-mode cache of the normalized weight: served while valid, never stale or graph-attached.

Every expected weight is recomputed here from its definition, ``W * c / (u^T W v)``, with
the layer's current original weight and vectors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import snpatch
from snpatch.parametrization import weight_to_matrix


def _layer() -> nn.Module:
    torch.manual_seed(0)
    return snpatch.apply_spectral_norm(nn.Conv2d(3, 6, 3), lipschitz=1.5).eval()


def _norm(layer: nn.Module) -> snpatch.SpectralNorm:
    return snpatch.spectral_norms(layer)["weight"]


def _original(layer: nn.Module) -> nn.Parameter:
    original = layer.parametrizations.weight.original
    assert isinstance(original, nn.Parameter)
    return original


def _expected(layer: nn.Module) -> torch.Tensor:
    """The hard-normalized weight from its definition, with the layer's current state."""
    norm = _norm(layer)
    weight = _original(layer).detach()
    sigma = torch.vdot(norm._u, weight_to_matrix(weight, norm.dim) @ norm._v)
    return weight * (norm.lipschitz / sigma)


def _fill(layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        weight = layer.weight
    assert _norm(layer)._cache is not None
    return weight


def test_the_cache_serves_one_detached_tensor_while_nothing_changes() -> None:
    layer = _layer()
    first = _fill(layer)
    with torch.no_grad():
        assert layer.weight is first
    with torch.inference_mode():
        assert layer.weight is first
    assert first.grad_fn is None and not first.requires_grad
    torch.testing.assert_close(first, _expected(layer), rtol=1e-6, atol=0)
    # Exactly one weight-sized tensor per layer.
    cache = _norm(layer)._cache
    assert cache is not None and cache[1].shape == _original(layer).shape


def _edit_in_place(layer: nn.Module) -> None:
    with torch.no_grad():
        _original(layer).add_(0.05 * torch.randn_like(_original(layer)))


def _optimizer_step(layer: nn.Module) -> None:
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
    _original(layer).grad = torch.randn_like(_original(layer))  # Adam: a 0.01 step
    optimizer.step()


def _load_state_dict(layer: nn.Module) -> None:
    torch.manual_seed(5)
    other = snpatch.apply_spectral_norm(nn.Conv2d(3, 6, 3), lipschitz=1.5)
    layer.load_state_dict(other.state_dict())


def _set_lipschitz(layer: nn.Module) -> None:
    snpatch.set_lipschitz(layer, 0.25)


def _to_float64(layer: nn.Module) -> None:
    layer.double()


def _training_forward(layer: nn.Module) -> None:
    layer.train()
    _edit_in_place(layer)
    layer(torch.randn(2, 3, 5, 5))  # the power iteration moves u and v
    layer.eval()


def _edit_through_data_then_clear(layer: nn.Module) -> None:
    # .data bypasses the version counter: the documented remedy is clear_cache().
    _original(layer).data.add_(0.05 * torch.randn_like(_original(layer)))
    _norm(layer).clear_cache()


CHANGES: dict[str, Callable[[nn.Module], None]] = {
    "in-place edit": _edit_in_place,
    "optimizer step": _optimizer_step,
    "load_state_dict": _load_state_dict,
    "set_lipschitz": _set_lipschitz,
    ".to(float64)": _to_float64,
    "train -> eval": _training_forward,
    ".data edit + clear_cache": _edit_through_data_then_clear,
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_invalidates_the_cache(change: str) -> None:
    layer = _layer()
    stale = _fill(layer).clone()
    CHANGES[change](layer)
    expected = _expected(layer)
    # The change matters: a stale tensor would fail the checks below.
    assert stale.dtype != expected.dtype or not torch.allclose(stale, expected)
    x = torch.randn(2, 3, 5, 5, dtype=expected.dtype)
    with torch.no_grad():
        torch.testing.assert_close(layer.weight, expected, rtol=1e-6, atol=0)
        out = layer(x)
    torch.testing.assert_close(out, nn.functional.conv2d(x, expected, layer.bias))


def test_grad_enabled_eval_builds_the_graph_for_weight_gradients() -> None:
    layer = _layer()
    cached = _fill(layer)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = layer(x)
    weight = layer.weight
    assert weight is not cached and weight.grad_fn is not None
    out.square().sum().backward()
    # Reference: autograd through the definition, with the same u and v.
    norm = _norm(layer)
    original = _original(layer).detach().clone().requires_grad_()
    sigma = torch.vdot(norm._u, weight_to_matrix(original, 0) @ norm._v)
    x_ref = x.detach().clone().requires_grad_()
    ref = nn.functional.conv2d(x_ref, original * (norm.lipschitz / sigma), layer.bias)
    ref.square().sum().backward()
    assert _original(layer).grad is not None and x.grad is not None
    torch.testing.assert_close(_original(layer).grad, original.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_input_gradients_with_frozen_weights_use_the_cache_filled_in_inference_mode() -> None:
    layer = _layer().requires_grad_(False)
    with torch.inference_mode():
        layer(torch.randn(1, 3, 5, 5))
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = layer(x)  # an inference tensor here would fail: it cannot be saved for backward
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref = nn.functional.conv2d(x_ref, _expected(layer), layer.bias)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_no_full_size_copy_is_kept_while_training() -> None:
    layer = _layer()
    _fill(layer)
    layer.train()
    assert _norm(layer)._cache is None
    layer(torch.randn(2, 3, 5, 5))
    with torch.no_grad():
        layer(torch.randn(2, 3, 5, 5))
    assert _norm(layer)._cache is None


def test_copies_do_not_carry_the_cache() -> None:
    layer = _layer()
    _fill(layer)
    twin = copy.deepcopy(layer)
    assert _norm(twin)._cache is None
    with torch.no_grad():
        _original(twin).add_(1.0)
        torch.testing.assert_close(twin.weight, _expected(twin), rtol=1e-6, atol=0)


def test_no_cache_while_compiling_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        torch.testing.assert_close(layer.weight, _expected(layer), rtol=1e-6, atol=0)
    assert _norm(layer)._cache is None
    monkeypatch.undo()
    _norm(layer).eval_cache = False
    with torch.no_grad():
        torch.testing.assert_close(layer.weight, _expected(layer), rtol=1e-6, atol=0)
    assert _norm(layer)._cache is None


def test_eval_under_autocast_serves_the_full_precision_weight() -> None:
    layer = snpatch.apply_spectral_norm(nn.Linear(16, 8)).eval()
    expected = _expected(layer)
    for grad in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            weight = layer.weight
            out = layer(torch.randn(2, 16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(weight, expected, rtol=1e-6, atol=0)
    with torch.no_grad():  # the weight cached under autocast, served outside it
        torch.testing.assert_close(layer.weight, expected, rtol=1e-6, atol=0)


def test_a_valid_cache_is_served_without_calling_the_parametrization(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = _layer()
    first = _fill(layer)
    calls: list[int] = []
    forward = snpatch.SpectralNorm.forward

    def counting(self: snpatch.SpectralNorm, weight: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return forward(self, weight)

    monkeypatch.setattr(snpatch.SpectralNorm, "forward", counting)
    with torch.no_grad():
        assert layer.weight is first
        layer(torch.randn(1, 3, 5, 5))
    assert calls == []
    # Anything that makes the cache invalid goes through the parametrization again.
    with torch.no_grad():
        _original(layer).mul_(2.0)
        torch.testing.assert_close(layer.weight, _expected(layer), rtol=1e-6, atol=0)
    assert calls == [1]


def test_a_parametrization_stacked_on_top_is_never_skipped() -> None:
    class Double(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return 2.0 * weight

    layer = _layer()
    _fill(layer)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Double())
    with torch.no_grad():
        torch.testing.assert_close(layer.weight, 2.0 * _expected(layer), rtol=1e-6, atol=0)


def test_operator_norm_never_serves_the_matrix_estimate_cached_before_the_first_input() -> None:
    torch.manual_seed(0)
    layer = snpatch.apply_spectral_norm(nn.Conv2d(2, 3, 3, padding=1), method="operator").eval()
    norm = _norm(layer)
    with torch.no_grad():
        before = layer.weight  # no input size yet: the matrix norm, cached
    assert norm._cache is not None
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        out = layer(x)  # records the input size: the operator norm from now on
        expected = norm(_original(layer))
        assert not torch.allclose(expected, before)
        torch.testing.assert_close(layer.weight, expected, rtol=0, atol=0)
        torch.testing.assert_close(out, nn.functional.conv2d(x, expected, layer.bias, padding=1))


def test_a_layer_built_in_inference_mode_is_normalized_and_never_cached() -> None:
    # Inference tensors have no version counter: nothing can validate a cached weight.
    with torch.inference_mode():
        torch.manual_seed(0)
        layer = snpatch.apply_spectral_norm(nn.Conv2d(3, 6, 3), lipschitz=1.5).eval()
        assert _original(layer).is_inference()
        first = layer.weight
        _edit_in_place(layer)  # no version counter records it
        second = layer.weight
    assert _norm(layer)._cache is None
    torch.testing.assert_close(second, _expected(layer), rtol=1e-6, atol=0)
    assert not torch.allclose(first, second)
