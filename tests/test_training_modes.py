"""Training modes: mixed precision, torch.func, gradient checkpointing, model averaging (EMA)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint

import snpatch
from snpatch.parametrization import weight_to_matrix
from tests.conftest import exact_sigma
from tests.ddp_worker import make_model

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    )


def _norms(model: nn.Module) -> list[snpatch.SpectralNorm]:
    return [m for m in model.modules() if isinstance(m, snpatch.SpectralNorm)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _float64_sigma(norm: snpatch.SpectralNorm, layer: nn.Module) -> float:
    """Exact top singular value of the layer's (low-precision) original weight, in float64."""
    original = layer.parametrizations.weight.original.detach().double()
    return float(torch.linalg.matrix_norm(weight_to_matrix(original, norm.dim), ord=2))


# --- mixed precision ------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("how", "dtype"),
    [
        ("autocast", torch.bfloat16),
        ("autocast", torch.float16),
        ("convert", torch.bfloat16),
        ("convert", torch.float16),
    ],
)
def test_low_precision_training_keeps_sigma_math_in_float32(
    device: str, how: str, dtype: torch.dtype
) -> None:
    model = snpatch.apply_spectral_norm(make_model(), lipschitz=2.0).to(device)
    if how == "convert":
        model.to(dtype)
    x = torch.randn(4, 3, 6, 6, device=device, dtype=dtype if how == "convert" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # float16 autocast trains with loss scaling (a converted float16 model cannot: its
    # gradients are float16 themselves).
    scaler = torch.amp.GradScaler(device, enabled=how == "autocast" and dtype == torch.float16)
    for _ in range(3):
        with torch.autocast(device, dtype=dtype, enabled=how == "autocast"):
            out = model(x)
        assert out.dtype == dtype
        scaler.scale(out.float().square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    with torch.autocast(device, dtype=dtype, enabled=how == "autocast"):
        model(x)  # the iteration catches up with the last step
    for name, layer in snpatch.patched_layers(model).items():
        (norm,) = snpatch.spectral_norms(layer).values()
        assert norm._u.dtype == norm._block.dtype == norm._sigma.dtype == torch.float32
        # The estimate matches float64 math on the same weights to float32 accuracy: a
        # bfloat16 or float16 computation would be off by up to ~0.4% (bfloat16's epsilon).
        assert float(norm._sigma) == pytest.approx(_float64_sigma(norm, layer), rel=1e-5), name
        # The effective weight, rounded to the model's dtype, is within 1% of the target.
        assert layer.weight.dtype == (dtype if how == "convert" else torch.float32)
        assert exact_sigma(layer)["weight"] == pytest.approx(2.0, rel=1e-2), name


# --- torch.func -----------------------------------------------------------------------------


def test_functional_call_with_the_models_own_and_with_other_parameters() -> None:
    model = snpatch.apply_spectral_norm(_mlp())
    x = torch.randn(5, 6)
    for training in (False, True):
        model.train(training)
        # The model's own state_dict (parameters and u, v) gives the model's output ...
        twin = copy.deepcopy(model)
        torch.testing.assert_close(functional_call(model, model.state_dict(), (x,)), twin(x))
        # ... and other parameters give what a model holding them gives.
        other = {k: v.detach() * 1.5 + 0.1 for k, v in model.named_parameters()}
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for key, value in other.items():
                twin.get_parameter(key).copy_(value)
        torch.testing.assert_close(functional_call(model, other, (x,)), twin(x))


@pytest.mark.parametrize("training", [False, True])
def test_per_sample_gradients_with_vmap_grad(training: bool) -> None:
    model = snpatch.apply_spectral_norm(_mlp(), lipschitz=1.5)
    x, y = torch.randn(6, 6), torch.randn(6, 3)
    # Weights changed since the last forward: bring sigma up to date, as a training
    # forward would, since a forward under torch.func leaves the iteration state alone.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    snpatch.update_sigma(model, steps=1)
    model.train(training)
    before = _state(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return (functional_call(model, p, (xi.unsqueeze(0),)) - yi).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for key, value in _state(model).items():
        assert torch.equal(value, before[key]), key  # no state changed under the transform
    # Reference: one ordinary backward per sample, in eval mode (sigma = u^T W v).
    model.eval()
    for i in range(len(x)):
        model.zero_grad()
        (model(x[i : i + 1]) - y[i]).square().sum().backward()
        for key, param in model.named_parameters():
            torch.testing.assert_close(per_sample[key][i], param.grad, rtol=1e-5, atol=1e-6)


# --- gradient checkpointing -----------------------------------------------------------------


class Checkpointed(nn.Module):
    """Two patched blocks, each under ``torch.utils.checkpoint`` unless ``use_reentrant`` is
    None."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        # (32 x 32: larger than the block, so that its estimate is tracked, not exact)
        self.block1 = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.block2 = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten())
        self.head = nn.Linear(128, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.block1, lambda h: self.block2(h.unsqueeze(1))):
            if self.use_reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.use_reentrant)
        return self.head(x)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_advances_the_iteration_once_and_gives_exact_gradients(
    use_reentrant: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The recomputation in backward runs the blocks' pre-hooks again; snpatch skips the
    # power step there, so the recomputed forward uses exactly the state the forward used.
    torch.manual_seed(0)
    reference = snpatch.apply_spectral_norm(Checkpointed(None))
    model = copy.deepcopy(reference)
    model.use_reentrant = use_reentrant
    steps = {"count": 0}
    # Every step of a weight, batched or not, starts with its products (first round).
    step_products = snpatch.SpectralNorm.step_products

    def counting(self: snpatch.SpectralNorm, weight: torch.Tensor, *, first: bool) -> object:
        steps["count"] += first
        return step_products(self, weight, first=first)

    monkeypatch.setattr(snpatch.SpectralNorm, "step_products", counting)
    x = torch.randn(4, 6, requires_grad=use_reentrant)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, reference)]
    for _ in range(3):
        grads = []
        for net, optimizer in zip((model, reference), optimizers, strict=True):
            steps["count"] = 0
            net(x).square().mean().backward()
            assert steps["count"] == len(_norms(net))  # once per weight per training step
            grads.append([p.grad.clone() for p in net.parameters()])  # type: ignore[union-attr]
            optimizer.step()
            optimizer.zero_grad()
        for got, expected in zip(*grads, strict=True):
            assert torch.equal(got, expected)
        for key, value in _state(model).items():
            assert torch.equal(value, _state(reference)[key]), key


# --- eval after an optimizer step -----------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no_grad", "grad"])
def test_eval_after_an_update_that_reverses_the_weight_is_still_normalized(
    conv: bool, grad_enabled: bool
) -> None:
    # The last step's u, v are for W; the optimizer then made the weight -W, so torch's
    # u^T W v is -sigma there: dividing by it (or by 1, for a non-positive estimate) is off.
    torch.manual_seed(0)
    layer = snpatch.apply_spectral_norm(
        nn.Conv2d(3, 5, 3) if conv else nn.Linear(8, 6), lipschitz=2.0
    )
    layer(torch.randn(2, 3, 6, 6) if conv else torch.randn(4, 8))
    with torch.no_grad():
        layer.parametrizations.weight.original.neg_()
    layer.eval()
    with torch.set_grad_enabled(grad_enabled):
        sigma = exact_sigma(layer)["weight"]
    assert sigma == pytest.approx(2.0, rel=1e-5)


# --- model averaging ------------------------------------------------------------------------


def _effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: layer.weight.detach().clone() for name, layer in snpatch.patched_layers(model).items()
    }


@pytest.mark.parametrize("use_buffers", [False, True])
def test_averaged_model_of_a_patched_model(use_buffers: bool) -> None:
    model = snpatch.apply_spectral_norm(make_model(), lipschitz=2.0)
    decay = 0.8
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
    expected: dict[str, torch.Tensor] = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(4):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
        for key, value in model.named_parameters():
            # The first update copies, the later ones average.
            previous = expected.get(key, value.detach())
            expected[key] = decay * previous + (1 - decay) * value.detach()
    for key, value in ema.module.named_parameters():
        torch.testing.assert_close(value, expected[key])
    ema.eval()
    # The averaged copy's iteration state belongs to other weights (stale, or averaged into
    # non-unit vectors): its layers miss the target until update_sigma ...
    stale = [exact_sigma(layer)["weight"] for layer in snpatch.patched_layers(ema).values()]
    assert max(abs(s / 2.0 - 1) for s in stale) > 1e-3
    snpatch.update_sigma(ema)
    # ... after which every averaged layer is at its target, and the averaged model computes
    # the normalized average weight: average * 2 / sigma(average).
    for name, layer in snpatch.patched_layers(ema).items():
        assert exact_sigma(layer)["weight"] == pytest.approx(2.0, rel=1e-5), name
        average = expected[f"{name.removeprefix('module.')}.parametrizations.weight.original"]
        sigma = torch.linalg.matrix_norm(weight_to_matrix(average.double(), 0), ord=2)
        torch.testing.assert_close(layer.weight, (average.double() * 2.0 / sigma).float())
    # Eval is deterministic and leaves the state alone.
    before = _effective_weights(ema)
    ema(x)
    assert all(torch.equal(v, _effective_weights(ema)[k]) for k, v in before.items())


def test_update_sigma_steps_advance_like_training_forwards() -> None:
    model = snpatch.apply_spectral_norm(make_model())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            delta = 0.2 * torch.randn_like(a)
            a.add_(delta)
            b.add_(delta)
    snpatch.update_sigma(model, steps=1)
    x = torch.randn(2, 3, 6, 6)
    twin(x)
    twin(x)  # the same weights: not stepped again
    for key, value in _state(model).items():
        assert torch.equal(value, _state(twin)[key]), key
