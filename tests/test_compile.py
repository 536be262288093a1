"""torch.compile: a compiled patched model trains like the eager one, in one graph, compiled once.

Kept tiny: inductor's C++ compilation dominates the time of this file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import snpatch
from tests.conftest import exact_sigma
from tests.ddp_worker import make_model
from tests.test_training_modes import Checkpointed

pytestmark = pytest.mark.slow  # compiles / starts processes: make test-fast skips it


def _norms(model: nn.Module) -> list[snpatch.SpectralNorm]:
    return [m for m in model.modules() if isinstance(m, snpatch.SpectralNorm)]


def _assert_same_iteration_state(model: nn.Module, reference: nn.Module) -> None:
    for norm, expected in zip(_norms(model), _norms(reference), strict=True):
        torch.testing.assert_close(norm._sigma, expected._sigma, rtol=1e-5, atol=0)
        # Singular vectors are defined up to sign.
        for name in ("_u", "_v"):
            dot = torch.dot(getattr(norm, name), getattr(expected, name)).abs()
            assert float(dot) == pytest.approx(1.0, abs=1e-5), name


def _train_side_by_side(
    compiled: nn.Module,
    model: nn.Module,
    reference: nn.Module,
    x: torch.Tensor,
    atol: float,
    same_state: Callable[[nn.Module, nn.Module], None] = _assert_same_iteration_state,
) -> None:
    """SGD steps on ``compiled`` (wrapping ``model``) and on an eager ``reference``; the
    iteration state is compared after every step, the parameters at the end."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, reference)]
    for _ in range(3):
        for net, optimizer in zip((compiled, reference), optimizers, strict=True):
            net(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        same_state(model, reference)
    for param, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, expected, rtol=1e-4, atol=atol)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def test_inductor_fullgraph_trains_like_eager_and_compiles_once() -> None:
    model = snpatch.apply_spectral_norm(make_model(), lipschitz=2.0)
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("inductor")
    # fullgraph=True: the pre-hook, its QR/SVD power step with in-place buffer updates and
    # the custom autograd function trace into one graph without a break.
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    _train_side_by_side(compiled, model, eager, x, atol=1e-6)
    # One graph, compiled on the first step and reused: no recompilation per step.
    assert counter.frame_count == 1
    # A training forward catches the iteration up with the last optimizer step.
    compiled(x)
    eager(x)
    for layer in snpatch.patched_layers(model).values():
        assert exact_sigma(layer)["weight"] == pytest.approx(2.0, rel=1e-4)


def test_switching_train_and_eval_compiles_each_mode_once() -> None:
    # aot_eager: the graph count does not depend on the backend, inductor's C++ compilation
    # of a second graph would only cost time.
    model = snpatch.apply_spectral_norm(make_model())
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    for training in (True, False, True, False):
        model.train(training)
        eager.train(training)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
    # Eval is a different graph (the estimate is recomputed instead of iterated).
    assert counter.frame_count == 2
    _assert_same_iteration_state(model, eager)


def _checkpointed_side_by_side() -> tuple[nn.Module, nn.Module, nn.Module, torch.Tensor]:
    model = snpatch.apply_spectral_norm(Checkpointed(use_reentrant=False))
    plain = copy.deepcopy(model)
    plain.use_reentrant = None
    return torch.compile(model, backend="aot_eager"), model, plain, torch.randn(4, 6)


def test_compiled_checkpointed_blocks_first_step_is_exact() -> None:
    # From the converged state of patch time, one compiled step with checkpointed blocks
    # gives eager's gradients and advances the iteration once.
    compiled, model, plain, x = _checkpointed_side_by_side()
    for net in (compiled, plain):
        net(x).square().mean().backward()
    for param, expected in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-5, atol=1e-7)
    _assert_same_iteration_state(model, plain)


@pytest.mark.xfail(
    # Not strict since the block of 16: on this model the estimate is converged, so one
    # power step further moves sigma by less than the test's tolerance, and the bug is
    # usually invisible here (it passed on 2026-12-01).
    strict=False,
    reason="torch 2.14 AOTAutograd recomputes the checkpointed region's reads of the buffers "
    "after the forward has updated them (pytorch/pytorch PR 197039, open), so the recomputed "
    "sigma is one power step further on: gradients off by up to 4e-3 relative (inductor, "
    "lr 0.5, 4 steps). See the README's 'Distributed and compiled training'.",
)
def test_compiled_checkpointed_blocks_later_steps_match_eager() -> None:
    compiled, model, plain, x = _checkpointed_side_by_side()
    _train_side_by_side(compiled, model, plain, x, atol=1e-6)


def _assert_same_operator_estimate(model: nn.Module, reference: nn.Module) -> None:
    # Not ``_op_v``: a circulant's top is a pair of Fourier modes (cos and sin) at least, and
    # rounding picks the vector in that plane; every choice has the same norm of A(W) v as a
    # function of W, so the estimate and the gradients agree.
    for norm, expected in zip(_norms(model), _norms(reference), strict=True):
        torch.testing.assert_close(norm._op_sigma, expected._op_sigma, rtol=1e-5, atol=0)


def test_operator_mode_circulants_and_small_operators_compile_in_one_graph() -> None:
    """Operator mode's exact paths (a circulant's frequency blocks, complex; a small
    operator on its whole input space) trace into one graph and train like eager."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular"),  # 3-wide frequency blocks
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, padding=1, padding_mode="circular"),  # strided
        nn.ReLU(),
        nn.Conv2d(4, 2, 4),  # 2 outputs: solved exactly
    )
    x = torch.randn(4, 3, 8, 8)
    snpatch.apply_spectral_norm(model, method="operator", example_inputs=(x[:1],))
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    _train_side_by_side(compiled, model, eager, x, 1e-6, _assert_same_operator_estimate)
    assert counter.frame_count == 1
