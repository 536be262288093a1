"""Remove, export, restore: nothing lost; checkpoints of every layout load with strict=True."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import snpatch
from snpatch.patch import CheckpointAdapter, PowerIterationHook
from tests.conftest import (
    VISION_MARKS,
    ZOO,
    exact_sigma,
    first_output,
    needs_torchvision,
    torchvision,
    zoo_params,
)

ZooCase = tuple[str, nn.Module, torch.Tensor]


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, the non-persistent iteration state included."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    return {k: v.detach().clone() for k, v in state.items()}


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = _full_state(a), _full_state(b)
    assert list(state_a) == list(state_b)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def _train(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int) -> None:
    model.train()
    torch.manual_seed(1)  # dropout draws the same masks in twins
    probe = torch.randn_like(first_output(model(x)))
    for _ in range(steps):
        loss = (first_output(model(x)) * probe).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _assert_same_output(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    if "attention" in name or "transformer" in name or "vit" in name:
        # Unparametrized attention takes torch's fused inference path in eval: same math,
        # other rounding.
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(actual, expected)


def _hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: (
            len(m._forward_pre_hooks),
            len(m._forward_hooks),
            len(m._load_state_dict_pre_hooks),
            len(m._load_state_dict_post_hooks),
            len(m._state_dict_hooks),
        )
        for name, m in model.named_modules()
    }


def _snpatch_hooks(model: nn.Module) -> list[object]:
    found: list[object] = []
    for m in model.modules():
        for hooks in (
            m._forward_pre_hooks,
            m._load_state_dict_pre_hooks,
            m._load_state_dict_post_hooks,
        ):
            for hook in hooks.values():
                method = getattr(hook, "hook", hook)
                if isinstance(hook, PowerIterationHook) or isinstance(
                    getattr(method, "__self__", None), CheckpointAdapter
                ):
                    found.append(hook)
    return found


def test_zoo_remove_export_restore_is_bit_exact(zoo_case: ZooCase) -> None:
    name, model, x = zoo_case
    never_patched = ZOO[name][0]()
    snpatch.apply_spectral_norm(model)
    # A deepcopy shares torch's parametrized classes with the model: removing from the
    # model must leave the copy working (torch's remove_parametrizations breaks it).
    twin = copy.deepcopy(model)
    opt_model = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=1e-3)
    _train(model, x, opt_model, 1)
    _train(twin, x, opt_twin, 1)
    param_ids = [id(p) for p in model.parameters()]
    plain = snpatch.plain_state_dict(model)
    model.eval()
    twin.eval()
    with torch.no_grad():
        expected = first_output(twin(x))

    snapshot = snpatch.remove_spectral_norm(model)

    assert len(snapshot) == len(snpatch.patched_layers(twin))
    assert not snpatch.is_patched(model)
    assert _snpatch_hooks(model) == []
    assert _hook_counts(model) == _hook_counts(never_patched)
    for (n1, m1), (n2, m2) in zip(
        model.named_modules(), never_patched.named_modules(), strict=True
    ):
        assert (n1, type(m1)) == (n2, type(m2))
    assert list(model.state_dict()) == list(never_patched.state_dict())
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in never_patched.named_parameters()
    ]
    assert sorted(id(p) for p in model.parameters()) == sorted(param_ids)
    assert list(plain) == list(model.state_dict())
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        _assert_same_output(name, first_output(model(x)), expected)
    never_patched.load_state_dict(model.state_dict(), strict=True)
    never_patched.eval()
    with torch.no_grad():
        _assert_same_output(name, first_output(never_patched(x)), expected)

    assert snpatch.restore_spectral_norm(model, snapshot) is model
    assert [id(p) for p in model.parameters()] == param_ids
    _assert_same_state(model, twin)
    _train(model, x, opt_model, 2)
    _train(twin, x, opt_twin, 2)
    _assert_same_state(model, twin)
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(first_output(model(x)), first_output(twin(x)))


def test_remove_and_restore_keep_each_weights_gradient_accumulator() -> None:
    # DistributedDataParallel hooks the AccumulateGrad node of each parameter once, at
    # wrapping; a restore that gave a weight a new node would silently detach it from DDP
    # (tests/test_distributed.py checks that end to end).
    model = snpatch.apply_spectral_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    weight = model[0].parametrizations.weight.original
    accumulator = (weight * 1).grad_fn.next_functions[0][0]
    fired: list[bool] = []
    accumulator.register_hook(lambda *args: fired.append(True))
    with snpatch.exported(model):
        pass
    snpatch.restore_spectral_norm(model, snpatch.remove_spectral_norm(model))
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert fired == [True]
    assert (weight * 1).grad_fn.next_functions[0][0] is accumulator


def test_remove_from_unpatched_model_returns_empty_snapshot_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    before = copy.deepcopy(model.state_dict())
    snapshot = snpatch.remove_spectral_norm(model)
    assert not snapshot
    assert len(snapshot) == 0
    assert type(model[0]) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert snpatch.restore_spectral_norm(model, snapshot) is model
    assert not snpatch.is_patched(model)


def test_remove_selected_layers_only() -> None:
    model = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    snapshot = snpatch.remove_spectral_norm(model, include="2")
    assert list(snapshot.layers) == ["2"]
    assert list(snpatch.patched_layers(model)) == ["0"]
    assert type(model[2]) is nn.Linear
    with pytest.raises(snpatch.NoMatchingLayersError, match="closest"):
        snpatch.remove_spectral_norm(model, include="2")  # no longer patched
    snpatch.restore_spectral_norm(model, snapshot)
    assert list(snpatch.patched_layers(model)) == ["0", "2"]


def test_removal_keeps_other_parametrizations_of_the_same_module() -> None:
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    layer = nn.Linear(4, 4)
    torch.nn.utils.parametrize.register_parametrization(layer, "bias", Scale())
    snpatch.apply_spectral_norm(layer)
    bias = layer.bias.clone()
    snapshot = snpatch.remove_spectral_norm(layer)
    assert torch.nn.utils.parametrize.is_parametrized(layer, "bias")
    assert not torch.nn.utils.parametrize.is_parametrized(layer, "weight")
    assert isinstance(layer, nn.Linear)
    assert torch.equal(layer.bias, bias)
    assert "weight" in layer._parameters
    snpatch.restore_spectral_norm(layer, snapshot)
    assert snpatch.spectral_norms(layer)
    assert torch.nn.utils.parametrize.is_parametrized(layer, "bias")


def test_exported_restores_on_exit_and_when_the_block_raises() -> None:
    model = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    state = _full_state(model)
    with snpatch.exported(model) as inside:
        assert inside is model
        assert not snpatch.is_patched(model)
    assert snpatch.is_patched(model)
    assert _full_state(model).keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in _full_state(model).items())
    with pytest.raises(KeyError, match="boom"), snpatch.exported(model):
        raise KeyError("boom")
    assert snpatch.is_patched(model)
    assert all(torch.equal(v, state[k]) for k, v in _full_state(model).items())


def test_snapshot_saves_and_loads_with_weights_only(tmp_path: object) -> None:
    model = snpatch.apply_spectral_norm(ZOO["nested"][0](), lipschitz=0.7, mode="soft")
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    snapshot = snpatch.remove_spectral_norm(model)
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert isinstance(loaded, snpatch.SpectralNormSnapshot)
    snpatch.restore_spectral_norm(model, loaded)
    _assert_same_state(model, twin)
    norm = snpatch.spectral_norms(model.heads["cls"])["weight"]
    assert (norm.lipschitz, norm.mode) == (0.7, "soft")
    _train(model, x, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    _train(twin, x, torch.optim.SGD(twin.parameters(), lr=0.1), 2)
    _assert_same_state(model, twin)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _other_shape() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))


def _missing_layer() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU())


def _other_dtype() -> nn.Module:
    return _mlp().double()


def _attention_in_place_of_linear() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.MultiheadAttention(4, 2))


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (_other_shape, snpatch.SnapshotMismatchError, r"layer '2' \(Linear\).*\(3, 4\).*\(2, 4\)"),
        (_missing_layer, snpatch.SnapshotMismatchError, "layer '2', which the model doesn't"),
        (_other_dtype, snpatch.SnapshotMismatchError, r"torch.float64.*torch.float32"),
        (_attention_in_place_of_linear, snpatch.SnapshotMismatchError, "in_proj_weight"),
    ],
)
def test_snapshot_that_does_not_fit_raises_and_changes_nothing(
    target: Callable[[], nn.Module], error: type[Exception], match: str
) -> None:
    snapshot = snpatch.remove_spectral_norm(snpatch.apply_spectral_norm(_mlp()))
    model = target()
    before = _full_state(model)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        snpatch.restore_spectral_norm(model, snapshot)
    assert not snpatch.is_patched(model)  # layer '0' fits, yet nothing was restored
    assert [type(m) for m in model.modules()] == classes
    after = _full_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in after.items())


def test_restore_onto_a_patched_layer_or_with_a_non_snapshot_is_refused() -> None:
    model = snpatch.apply_spectral_norm(_mlp())
    snapshot = snpatch.remove_spectral_norm(model)
    snpatch.restore_spectral_norm(model, snapshot)
    with pytest.raises(snpatch.AlreadyPatchedError, match="layer '0'"):
        snpatch.restore_spectral_norm(model, snapshot)
    with pytest.raises(TypeError, match="SpectralNormSnapshot.*got dict"):
        snpatch.restore_spectral_norm(model, {"0": {}})  # type: ignore[arg-type]
    bad = copy.deepcopy(snapshot.layers)
    bad["0"]["weight"]["kind"] = "x"
    with pytest.raises(snpatch.SnapshotMismatchError, match="unknown normalization kind 'x'"):
        snpatch.restore_spectral_norm(_mlp(), snpatch.SpectralNormSnapshot(bad))


@pytest.mark.slow
@needs_torchvision
def test_plain_state_dict_loads_strictly_and_leaves_the_model_alone() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    snpatch.apply_spectral_norm(model, exclude="fc", lipschitz=2.0)
    # (A batch of 8: with 2, layer4's batch norms at 1x1 normalize two values, and one SGD
    # step moved weights up to 10^4 times their norm; the eval forward, which divides by the
    # estimate of the last training step as torch's does, then overflowed to NaN on both
    # sides, or not, by rounding. With 8 the eval weights stay within 1.21 times the bound.)
    x = torch.randn(8, 3, 32, 32)
    _train(model, x, torch.optim.SGD(model.parameters(), lr=0.05), 1)
    model.eval()
    state = _full_state(model)
    plain = snpatch.plain_state_dict(model)
    assert all(torch.equal(v, state[k]) for k, v in _full_state(model).items())
    assert snpatch.is_patched(model)
    never_patched = torchvision.models.resnet18(num_classes=10).eval()
    assert list(plain) == list(never_patched.state_dict())
    never_patched.load_state_dict(plain, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(never_patched(x), model(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the eval forward's effective weights, exactly
        for name, layer in snpatch.patched_layers(model).items():
            assert torch.equal(plain[f"{name}.weight"], layer.weight), name


# --- loading checkpoints into a patched model -------------------------------------------


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 5, 3, stride=2),
        nn.Flatten(),
        nn.LazyLinear(3),
    )


def _built_net() -> nn.Module:
    net = _net().double()
    net(torch.randn(1, 3, 6, 6, dtype=torch.float64))
    return net


def test_plain_checkpoint_loads_into_patched_model_with_full_accuracy() -> None:
    source = _built_net()
    checkpoint = source.state_dict()
    patched = snpatch.apply_spectral_norm(_built_net(), lipschitz=1.5)
    untouched = copy.deepcopy(patched.state_dict())
    model = copy.deepcopy(patched)  # the hooks of a deepcopy act on the copy
    model.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(v, untouched[k]) for k, v in patched.state_dict().items())
    for name, layer in snpatch.patched_layers(model).items():
        original = layer.parametrizations.weight.original
        assert torch.equal(original, checkpoint[f"{name}.weight"])
        assert exact_sigma(layer)["weight"] == pytest.approx(1.5, rel=1e-9)
    # Patch-then-load gives what load-then-patch gives.
    other = _built_net()
    other.load_state_dict(checkpoint, strict=True)
    snpatch.apply_spectral_norm(other, lipschitz=1.5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model.eval()
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=1e-9, atol=1e-12)


def test_legacy_spectral_norm_checkpoint_loads_with_identical_eval_outputs() -> None:
    legacy = _built_net()
    for index in (0, 2, 4):
        torch.nn.utils.spectral_norm(legacy[index], dim=1 if index == 2 else 0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    legacy.train()
    for _ in range(3):
        legacy(x)  # a few power iterations: u and v are legacy's, not converged
    checkpoint = legacy.state_dict()
    assert "0.weight_orig" in checkpoint
    model = snpatch.apply_spectral_norm(_built_net())
    model.load_state_dict(checkpoint, strict=True)
    legacy.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), legacy(x), rtol=1e-12, atol=1e-14)
    assert torch.equal(model[0].parametrizations.weight.original, checkpoint["0.weight_orig"])


def test_mixed_checkpoint_loads_layer_by_layer() -> None:
    plain = _built_net()
    legacy = copy.deepcopy(plain)
    torch.nn.utils.spectral_norm(legacy[2], dim=1)
    legacy.train()(torch.randn(1, 3, 6, 6, dtype=torch.float64))  # iterated, as trained ones are
    patched = snpatch.apply_spectral_norm(copy.deepcopy(plain), include="4")
    checkpoint = {
        **{k: v for k, v in plain.state_dict().items() if k.startswith("0.")},
        **{k: v for k, v in legacy.state_dict().items() if k.startswith("2.")},
        **{k: v for k, v in patched.state_dict().items() if k.startswith("4.")},
    }
    model = snpatch.apply_spectral_norm(_built_net())
    result = model.load_state_dict(checkpoint, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert torch.equal(model[2].parametrizations.weight.original, legacy[2].weight_orig)
    assert torch.equal(
        model[4].parametrizations.weight[0]._u, patched[4].parametrizations.weight[0]._u
    )


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda sd: sd.update({"0.extra": torch.zeros(1)}), r'Unexpected key\(s\).*"0.extra"'),
        (lambda sd: sd.pop("0.bias"), r'Missing key\(s\).*"0.bias"'),
        (lambda sd: sd.pop("0.weight"), r'Missing key\(s\).*"0.parametrizations.weight.original"'),
        (
            lambda sd: sd.update({"0.parametrizations.weight.original": sd["0.weight"]}),
            r'Unexpected key\(s\).*"0.weight"',
        ),
    ],
)
def test_unknown_or_missing_keys_still_fail_under_strict(
    edit: Callable[[dict[str, torch.Tensor]], object], match: str
) -> None:
    checkpoint = dict(_built_net().state_dict())
    edit(checkpoint)
    model = snpatch.apply_spectral_norm(_built_net())
    with pytest.raises(RuntimeError, match=match):
        model.load_state_dict(checkpoint, strict=True)


def _never_iterated(layout: str, weight: torch.Tensor) -> tuple[nn.Module, float]:
    """A Linear with torch's spectral norm whose saved u, v give u^T W v < 0.

    Legacy ``utils.spectral_norm`` starts from random u, v and iterates only in training
    forwards, so a model saved before any has this about half the time; here the sign of u
    is chosen so that it always has.
    """
    layer = nn.Linear(3, 5).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    if layout == "legacy":
        torch.nn.utils.spectral_norm(layer)
        u, v, original = layer.weight_u, layer.weight_v, layer.weight_orig
    else:
        torch.nn.utils.parametrizations.spectral_norm(layer)
        norm = layer.parametrizations.weight[0]
        u, v, original = norm._u, norm._v, layer.parametrizations.weight.original
    with torch.no_grad():
        if float(u @ original @ v) > 0:
            u.neg_()
    return layer.eval(), float(u @ original.detach() @ v)


@pytest.mark.parametrize("layout", ["legacy", "parametrizations"])
def test_checkpoint_with_non_positive_u_w_v_is_re_estimated_with_a_warning(layout: str) -> None:
    weight = torch.randn(5, 3, dtype=torch.float64)
    saved, divisor = _never_iterated(layout, weight)
    assert divisor < 0
    # What torch's model does with it: W / (u^T W v), sign flipped, norm unbounded.
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(saved(x), nn.functional.linear(x, weight / divisor, saved.bias))
    model = snpatch.apply_spectral_norm(nn.Sequential(nn.Linear(3, 5).double()), lipschitz=0.5)
    with pytest.warns(snpatch.SnpatchWarning, match=r"'0\.weight' give u\^T W v = -.* <= 0"):
        model.load_state_dict({f"0.{k}": v for k, v in saved.state_dict().items()})
    layer = model[0].eval()
    assert torch.equal(layer.parametrizations.weight.original, weight)
    assert exact_sigma(layer)["weight"] == pytest.approx(0.5, rel=1e-6)
    # Re-estimated, not flipped: the normalized weight is W scaled by a positive factor.
    factor = layer.weight.detach() / weight
    assert bool((factor > 0).all())
    torch.testing.assert_close(factor, torch.full_like(factor, float(factor[0, 0])))


# --- state_dict metadata and tied weights -------------------------------------------------


def _with_other_parametrization() -> nn.Module:
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.nn.utils.parametrize.register_parametrization(model[2], "bias", Scale())
    return model


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            lambda: torchvision.models.mnasnet0_5(weights=None),  # versioned loading
            marks=VISION_MARKS,
            id="mnasnet0_5",
        ),
        pytest.param(_with_other_parametrization, id="other_parametrization"),  # bias too
        pytest.param(
            lambda: nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2)), id="attention"
        ),
    ],
)
def test_plain_state_dict_keeps_the_metadata_of_the_never_patched_model(
    build: Callable[[], nn.Module],
) -> None:
    torch.manual_seed(0)
    never_patched = build()
    model = snpatch.apply_spectral_norm(copy.deepcopy(never_patched))
    plain = snpatch.plain_state_dict(model)
    expected = never_patched.state_dict()
    assert list(plain) == list(expected)
    assert list(plain._metadata.items()) == list(expected._metadata.items())  # type: ignore[attr-defined]
    fresh = build()
    fresh.load_state_dict(plain, strict=True)
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert list(loaded._metadata.items()) == list(expected._metadata.items())


class TiedLM(nn.Module):
    """A GPT-2 look-alike: the output layer's weight is the input embedding's Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(30, 8)
        self.proj = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 30, bias=False)
        self.lm_head.weight = self.wte.weight
        with torch.no_grad():
            self.wte.weight.mul_(3)  # sigma well above 1: normalization changes it

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.proj(self.wte(ids))))


class Mirror(nn.Module):
    """Reads another layer's weight through a Parameter of its own (transposed)."""

    def __init__(self, kernel: nn.Parameter) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel


class Mirrored(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.mirror = Mirror(self.fc.weight)
        with torch.no_grad():
            self.fc.weight.mul_(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.mirror(x)


TIED = {
    # model, input, the patched layer, its weight's other reader (module, attribute)
    "lm_head_and_embedding": (
        TiedLM,
        lambda: torch.randint(0, 30, (4, 5)),
        "lm_head",
        "wte.weight",
    ),
    "module_reading_it_elsewhere": (Mirrored, lambda: torch.randn(3, 6), "fc", "mirror.kernel"),
}


@pytest.mark.parametrize("case", list(TIED))
def test_removal_never_changes_a_tied_weight_another_module_reads(case: str) -> None:
    build, make_input, layer_name, reader = TIED[case]
    torch.manual_seed(0)
    model = snpatch.apply_spectral_norm(build(), include=layer_name).eval()
    twin = copy.deepcopy(model)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
    shared = model.get_parameter(reader)
    values = shared.detach().clone()
    layer = model.get_submodule(layer_name)
    assert layer.parametrizations.weight.original is shared
    with snpatch.exported(model):
        assert model.get_parameter(reader) is shared
        assert torch.equal(shared, values)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert layer.parametrizations.weight.original is shared
    _assert_same_state(model, twin)
    snapshot = snpatch.remove_spectral_norm(model)
    assert model.get_parameter(reader) is shared
    assert torch.equal(shared, values)
    assert layer.weight is not shared
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert list(model.state_dict()) == list(build().state_dict())
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    snpatch.restore_spectral_norm(model, torch.load(buffer, weights_only=True))
    assert layer.parametrizations.weight.original is shared  # tied again
    _assert_same_state(model, twin)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(TIED))
def test_plain_state_dict_of_a_tied_weight_is_refused(case: str) -> None:
    build, _, layer_name, reader = TIED[case]
    model = snpatch.apply_spectral_norm(build(), include=layer_name)
    state = _full_state(model)
    with pytest.raises(snpatch.SharedWeightError, match=rf"'{layer_name}.weight'.*'{reader}'"):
        snpatch.plain_state_dict(model)
    assert all(torch.equal(v, state[k]) for k, v in _full_state(model).items())


def test_restore_of_a_tied_weight_into_a_model_without_its_partner_is_refused() -> None:
    model = snpatch.apply_spectral_norm(TiedLM(), include="lm_head")
    snapshot = snpatch.remove_spectral_norm(model)
    other = nn.Module()
    other.lm_head = nn.Linear(8, 30, bias=False)
    with pytest.raises(snpatch.SnapshotMismatchError, match="'weight' was tied to 'wte.weight'"):
        snpatch.restore_spectral_norm(other, snapshot)
    assert not snpatch.is_patched(other)


# --- export targets ----------------------------------------------------------------------

EXPORT_CASES = ["mlp", "conv_transpose2d", "attention", "resnet18"]


def _patched_eval(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    factory, shape = ZOO[name]
    model = snpatch.apply_spectral_norm(factory())
    x = torch.randn(shape)
    _train(model, x, torch.optim.SGD(model.parameters(), lr=0.05), 1)
    model.eval()
    with torch.no_grad():
        expected = first_output(model(x))
    return model, x, expected


@pytest.mark.parametrize("name", zoo_params(EXPORT_CASES))
def test_torch_export_inside_exported(name: str) -> None:
    model, x, expected = _patched_eval(name)
    with snpatch.exported(model):
        program = torch.export.export(model, (x,))
    assert snpatch.is_patched(model)
    assert not any("parametrizations" in k for k in program.state_dict)
    torch.testing.assert_close(first_output(program.module()(x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", zoo_params(["mlp", "conv_transpose2d", "resnet18"]))
def test_onnx_export_inside_exported_runs_in_onnxruntime(name: str, tmp_path: object) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, x, expected = _patched_eval(name)
    path = f"{tmp_path}/model.onnx"
    with snpatch.exported(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx's own deprecation chatter
        torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
    session = ort.InferenceSession(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch 2.14
@pytest.mark.parametrize("name", ["mlp", "conv_transpose2d", "nested"])
def test_torchscript_trace_and_script_inside_exported(name: str) -> None:
    model, x, expected = _patched_eval(name)
    with snpatch.exported(model):
        traced = torch.jit.trace(model, (x,))
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-6)


def test_still_patched_model_exports_correctly_in_eval_mode() -> None:
    # torch.export traces the eval forward, W * c / (u^T W v) included: correct, but the
    # graph recomputes the normalization on every call; exported() bakes it in.
    model, x, expected = _patched_eval("mlp")
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-6)
    assert any("parametrizations" in k for k in program.state_dict)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_still_patched_model_traces_the_normalization_not_a_cached_constant() -> None:
    # torch.jit.trace checks its graph by tracing again under no_grad, where the eval cache
    # would be served and become a constant: the trace must compute W * c / (u^T W v).
    model, x, expected = _patched_eval("mlp")
    with torch.no_grad():
        model(x)  # the cache is filled
    traced = torch.jit.trace(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)
        for parameter in model.parameters():
            parameter.mul_(1.5).add_(0.01)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_still_patched_model_refuses_torchscript_and_pickling_with_a_clear_message() -> None:
    model, x, expected = _patched_eval("mlp")
    with pytest.raises(snpatch.SerializationError, match="exported"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match=r"state_dict\(\).*plain_state_dict.*exported"):
        torch.save(model, io.BytesIO())
    buffer = io.BytesIO()
    with snpatch.exported(model):
        torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not snpatch.is_patched(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


# --- method="operator" -------------------------------------------------------------------


def _operator_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1),
        nn.Flatten(),
        nn.Linear(2 * 10 * 10, 3),
    )


@pytest.mark.parametrize("certified", [False, True])
def test_operator_method_round_trip_is_bit_exact(certified: bool) -> None:
    x = torch.randn(2, 3, 8, 8)
    model = snpatch.apply_spectral_norm(
        _operator_net(), method="operator", certified=certified, example_inputs=(x,)
    )
    twin = copy.deepcopy(model)
    opt_model = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05)
    _train(model, x, opt_model, 1)
    _train(twin, x, opt_twin, 1)
    model.eval()
    twin.eval()
    with torch.no_grad():
        expected = twin(x)
    with snpatch.exported(model):
        assert list(model.state_dict()) == list(_operator_net().state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-7)
    snapshot = snpatch.remove_spectral_norm(model)
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    snpatch.restore_spectral_norm(model, torch.load(buffer, weights_only=True))
    norm = snpatch.spectral_norms(model[0])["weight"]
    assert isinstance(norm, snpatch.OperatorNorm)
    assert norm.input_size == (8, 8)
    assert norm.certified is certified
    _assert_same_state(model, twin)
    _train(model, x, opt_model, 2)
    _train(twin, x, opt_twin, 2)
    _assert_same_state(model, twin)


def test_matrix_checkpoint_loads_into_operator_model_and_back() -> None:
    x = torch.randn(2, 3, 8, 8)
    matrix = snpatch.apply_spectral_norm(_operator_net())
    operator = snpatch.apply_spectral_norm(_operator_net(), method="operator", example_inputs=(x,))
    operator.load_state_dict(matrix.state_dict(), strict=True)
    conv = operator[0]
    assert torch.equal(
        conv.parametrizations.weight.original, matrix[0].parametrizations.weight.original
    )
    # The operator state was re-estimated for the loaded weight: a dense check.
    jacobian = torch.autograd.functional.jacobian(
        lambda t: nn.functional.conv2d(
            nn.functional.pad(t, (1, 1, 1, 1), mode="reflect"), conv.weight.detach(), stride=2
        ),
        torch.zeros(1, 3, 8, 8),
    ).reshape(4 * 4 * 4, 3 * 8 * 8)
    assert float(torch.linalg.matrix_norm(jacobian, 2)) == pytest.approx(1.0, rel=1e-4)
    matrix.load_state_dict(operator.state_dict(), strict=False)  # extra operator keys
    with pytest.raises(RuntimeError, match="Unexpected key.*_op_v"):
        matrix.load_state_dict(operator.state_dict(), strict=True)
