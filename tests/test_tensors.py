"""Any tensor by name (``tensors=``): RNN weights, embeddings, a custom layer's kernel.

One table of layer types, run through every behaviour that ``weight`` has: the forward uses
the normalized tensors (checked against a hand-normalized copy), Adam training keeps each at
its target, remove / export / restore are exact, and checkpoints move both ways.
"""

from __future__ import annotations

import copy
import fnmatch
import io
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import snpatch
from snpatch.parametrization import weight_to_matrix
from tests.conftest import first_output
from tests.test_export import _assert_same_state, _hook_counts, _snpatch_hooks, _train

# torch's note that its oneDNN CPU kernels don't do LSTM projections (it falls back).
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

LIPSCHITZ = 0.5  # far from the initial sigmas: a forward on unnormalized weights shows


class Taps(nn.Module):
    """A custom layer with a 3-D ``kernel`` (in, out, taps): its outputs are on dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 6, 3))
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bit,iot->bo", x, self.kernel) + self.bias


class Tagger(nn.Module):
    """Embedding, bidirectional GRU and a linear head (the head keeps its default ``weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 5)
        self.rnn = nn.GRU(5, 4, bidirectional=True, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


@dataclass(frozen=True)
class Case:
    factory: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]
    tensors: dict[type[nn.Module], snpatch.select.TensorSpec]
    #: Normalized tensors by layer name, and the dim of each.
    expected: dict[str, dict[str, int]]


def _lstm_weights(layers: int, reverse: bool, proj: bool = False) -> dict[str, int]:
    kinds = ("ih", "hh", "hr") if proj else ("ih", "hh")
    suffixes = ("", "_reverse") if reverse else ("",)
    return {
        f"weight_{kind}_l{layer}{suffix}": 0
        for layer in range(layers)
        for suffix in suffixes
        for kind in kinds
    }


CASES = {
    "lstm_2_layers_bidirectional": Case(
        lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True),
        lambda: torch.randn(3, 5, 4),
        {nn.LSTM: ("weight_ih_l*", "weight_hh_l*")},
        {"": _lstm_weights(2, reverse=True)},
    ),
    "lstm_projection": Case(
        lambda: nn.LSTM(4, 6, proj_size=3),
        lambda: torch.randn(5, 2, 4),
        {nn.LSTM: "weight_*"},
        {"": _lstm_weights(1, reverse=False, proj=True)},
    ),
    "gru_hidden_only": Case(
        lambda: nn.GRU(4, 6, num_layers=2),
        lambda: torch.randn(5, 2, 4),
        {nn.GRU: "weight_hh_l*"},
        {"": {"weight_hh_l0": 0, "weight_hh_l1": 0}},
    ),
    "rnn_relu_regex": Case(
        lambda: nn.RNN(4, 6, nonlinearity="relu", bidirectional=True),
        lambda: torch.randn(5, 2, 4),
        {nn.RNN: "re:weight_(ih|hh)_l0(_reverse)?"},
        {"": _lstm_weights(1, reverse=True)},
    ),
    "custom_kernel_dim_1": Case(
        Taps,
        lambda: torch.randn(2, 4, 3),
        {Taps: snpatch.TensorNames("kernel", dim=1)},
        {"": {"kernel": 1}},
    ),
    "embedding_gru_and_default_linear": Case(
        Tagger,
        lambda: torch.randint(0, 12, (2, 7)),
        {nn.Embedding: "weight", nn.GRU: ["weight_ih_l0*", "weight_hh_l0*"]},
        {
            "embed": {"weight": 0},
            "rnn": _lstm_weights(1, reverse=True),
            "head": {"weight": 0},
        },
    ),
}


def _patched(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(patched model, its never-patched twin, an input)."""
    case = CASES[name]
    torch.manual_seed(0)
    model = case.factory()
    never_patched = copy.deepcopy(model)
    snpatch.apply_spectral_norm(model, tensors=case.tensors, lipschitz=LIPSCHITZ)
    return model, never_patched, case.example()


def _exact(tensor: torch.Tensor, dim: int) -> float:
    matrix = weight_to_matrix(tensor.detach().double(), dim)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def _used_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the last forward of ``layer`` used, by name.

    An RNN's forward hands ``_flat_weights`` to the kernel (torch refreshes it from the
    module's attributes when they change); other layers read their attributes.
    """
    if isinstance(layer, nn.RNNBase):
        return dict(zip(layer._flat_weights_names, layer._flat_weights, strict=True))  # type: ignore[arg-type]
    return {key: getattr(layer, key) for key in snpatch.spectral_norms(layer)}


@pytest.mark.parametrize("name", list(CASES))
def test_the_chosen_tensors_and_only_they_are_normalized(name: str) -> None:
    model, _, _ = _patched(name)
    found = {
        layer_name: {key: norm.dim for key, norm in snpatch.spectral_norms(layer).items()}
        for layer_name, layer in snpatch.patched_layers(model).items()
    }
    assert found == CASES[name].expected
    assert snpatch.select_layers(model, tensors=CASES[name].tensors) == list(found)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_forward_uses_the_normalized_tensors(name: str, training: bool) -> None:
    model, never_patched, x = _patched(name)
    by_hand = copy.deepcopy(never_patched)
    with torch.no_grad():
        for layer_name, tensors in CASES[name].expected.items():
            layer = by_hand.get_submodule(layer_name)
            for key, dim in tensors.items():
                tensor = getattr(layer, key)
                tensor.mul_(LIPSCHITZ / _exact(tensor, dim))
    model.train(training)
    by_hand.train(training)
    never_patched.train(training)
    with torch.no_grad():
        expected = first_output(by_hand(x))
        unnormalized = first_output(never_patched(x))
    actual = first_output(model(x)).detach()  # with grad: the tensors used carry a graph
    assert not torch.allclose(unnormalized, expected, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for layer_name in CASES[name].expected:
        layer = model.get_submodule(layer_name)
        used = _used_tensors(layer)
        for key, norm in snpatch.spectral_norms(layer).items():
            assert used[key].grad_fn is not None or not training, key  # the parametrized one
            assert _exact(used[key], norm.dim) == pytest.approx(LIPSCHITZ, rel=1e-5), key


@pytest.mark.parametrize("name", list(CASES))
def test_adam_training_keeps_each_tensor_the_forward_uses_at_its_target(name: str) -> None:
    model, _, x = _patched(name)
    layers = {n: model.get_submodule(n) for n in CASES[name].expected}
    originals = {
        (n, key): norm_original.detach().clone()
        for n, layer in layers.items()
        for key, _, norm_original in snpatch.patch._hook(layer).norms(layer)  # type: ignore[union-attr]
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = torch.randn_like(first_output(model(x)))
    model.train()
    for _ in range(30):
        loss = (first_output(model(x)) * probe).mean()
        for layer_name, layer in layers.items():
            used = _used_tensors(layer)
            for key, norm in snpatch.spectral_norms(layer).items():
                sigma = _exact(used[key], norm.dim)
                assert sigma == pytest.approx(LIPSCHITZ, rel=5e-3), (layer_name, key)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for (layer_name, key), before in originals.items():
        layer = layers[layer_name]
        after = dict((k, o) for k, _, o in snpatch.patch._hook(layer).norms(layer))[key]  # type: ignore[union-attr]
        assert not torch.equal(after.detach(), before), (layer_name, key)  # it trained


@pytest.mark.parametrize("name", list(CASES))
def test_remove_export_restore_and_plain_checkpoints_are_exact(name: str) -> None:
    model, never_patched, x = _patched(name)
    twin = copy.deepcopy(model)  # never removed: what the model must stay equal to
    optimizers = [(m, torch.optim.Adam(m.parameters(), lr=1e-3)) for m in (model, twin)]
    for trained, optimizer in optimizers:
        _train(trained, x, optimizer, 1)
        trained.eval()
    param_ids = [id(p) for p in model.parameters()]
    plain = snpatch.plain_state_dict(model)
    with torch.no_grad():
        expected = first_output(twin(x))
    with snpatch.exported(model):
        assert not snpatch.is_patched(model)
        with torch.no_grad():
            _assert_same_output(model, first_output(model(x)), expected)

    snapshot = snpatch.remove_spectral_norm(model)

    assert {n: set(w) for n, w in snapshot.layers.items()} == {
        n: set(t) for n, t in CASES[name].expected.items()
    }
    assert _snpatch_hooks(model) == []
    assert _hook_counts(model) == _hook_counts(never_patched)
    assert [(n, type(m)) for n, m in model.named_modules()] == [
        (n, type(m)) for n, m in never_patched.named_modules()
    ]
    assert list(model.state_dict()) == list(never_patched.state_dict())
    assert sorted(id(p) for p in model.parameters()) == sorted(param_ids)
    assert list(plain) == list(model.state_dict())
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        _assert_same_output(model, first_output(model(x)), expected)
    never_patched.load_state_dict(plain, strict=True)
    never_patched.eval()
    with torch.no_grad():
        _assert_same_output(model, first_output(never_patched(x)), expected)

    snpatch.restore_spectral_norm(model, torch.load(_saved(snapshot), weights_only=True))
    assert [id(p) for p in model.parameters()] == param_ids
    _assert_same_state(model, twin)
    for trained, optimizer in optimizers:
        _train(trained, x, optimizer, 2)
    _assert_same_state(model, twin)


def _assert_same_output(model: nn.Module, actual: torch.Tensor, expected: torch.Tensor) -> None:
    if any(isinstance(m, nn.GRU) for m in model.modules()):
        # torch's CPU GRU rounds differently when its weights require grad (plain
        # Parameters) than when they don't (the patched eval weights): up to 1.2e-7 apart
        # on a plain nn.GRU with the same weights.
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(actual, expected)


def _saved(snapshot: snpatch.SpectralNormSnapshot) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoints_load_both_ways(name: str) -> None:
    model, _, x = _patched(name)
    # An unpatched checkpoint loads into the patched model, re-estimated for its values.
    source = CASES[name].factory()
    model.load_state_dict(source.state_dict(), strict=True)
    for layer_name, tensors in CASES[name].expected.items():
        layer = model.get_submodule(layer_name)
        for key, dim in tensors.items():
            original = snpatch.patch.parametrization_list(layer, key).original
            assert torch.equal(original, getattr(source.get_submodule(layer_name), key))
            norm = snpatch.spectral_norms(layer)[key]
            assert float(norm.sigma(original)) == pytest.approx(_exact(original, dim), rel=1e-5)
    # The patched layout loads into a freshly patched model, outputs the same.
    fresh, _, _ = _patched(name)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(first_output(fresh(x)), first_output(model(x)))


def test_a_snapshot_of_other_tensors_is_refused_naming_them_and_changes_nothing() -> None:
    tensors = {nn.LSTM: "weight_*"}
    snapshot = snpatch.remove_spectral_norm(
        snpatch.apply_spectral_norm(nn.Sequential(nn.LSTM(3, 4, num_layers=2)), tensors=tensors)
    )
    model = nn.Sequential(nn.LSTM(3, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(snpatch.SnapshotMismatchError, match=r"no 'weight_hh_l1', 'weight_ih_l1'"):
        snpatch.restore_spectral_norm(model, snapshot)
    assert not snpatch.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Into the same architecture it goes back whatever the defaults are.
    same = nn.Sequential(nn.LSTM(3, 4, num_layers=2))
    snpatch.restore_spectral_norm(same, snapshot)
    assert list(snpatch.spectral_norms(same[0])) == list(snapshot.layers["0"])


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoints_move_between_torchs_spectral_norm_and_snpatch(name: str) -> None:
    case = CASES[name]

    def build() -> nn.Module:
        torch.manual_seed(1)
        # float64: torch divides W / sigma, snpatch multiplies W * (c / sigma).
        return case.factory().double()

    x = case.example()
    x = x.double() if x.is_floating_point() else x
    theirs = build()
    for layer_name, tensors in case.expected.items():
        for key, dim in tensors.items():
            parametrizations.spectral_norm(theirs.get_submodule(layer_name), key, dim=dim)
    for _ in range(5):
        theirs(x)  # moves its u, v
    theirs.eval()
    ours = snpatch.apply_spectral_norm(build(), tensors=case.tensors).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        expected = first_output(theirs(x))
        torch.testing.assert_close(first_output(ours(x)), expected, rtol=1e-12, atol=1e-14)

    ours.train()
    ours(x)  # our own iteration state now differs from torch's
    ours.eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        expected = first_output(ours(x))
        torch.testing.assert_close(first_output(theirs(x)), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(CASES))
def test_spectral_report_and_sigma_readers_see_the_chosen_tensors(name: str) -> None:
    model, _, _ = _patched(name)
    report = snpatch.spectral_report(model)
    assert [row.name for row in report] == list(CASES[name].expected)
    for row in report:
        assert row.sigma_exact == pytest.approx(LIPSCHITZ, rel=1e-5), row.name
        assert row.within_target, row.name
    expected_keys = [
        ".".join(p for p in (layer, key) if p)
        for layer, tensors in CASES[name].expected.items()
        for key in tensors
    ]
    assert list(snpatch.exact_sigmas(model)) == expected_keys
    assert list(snpatch.sigma_estimates(model)) == expected_keys


class GatedConv(nn.Conv2d):
    """A convolution with a second matrix: only its kernel is a convolution operator."""

    def __init__(self) -> None:
        super().__init__(3, 4, 3, padding=1)
        self.gate = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,dc->bdhw", super().forward(x), self.gate)


def test_operator_method_treats_only_a_convolutions_kernel_as_its_operator() -> None:
    x = torch.randn(2, 3, 6, 6)
    model = nn.Sequential(GatedConv())
    snpatch.apply_spectral_norm(
        model, tensors={GatedConv: ["weight", "gate"]}, method="operator", example_inputs=(x,)
    )
    norms = snpatch.spectral_norms(model[0])
    assert isinstance(norms["weight"], snpatch.OperatorNorm)
    assert norms["weight"].conv is not None
    assert type(norms["gate"]) is snpatch.SpectralNorm
    model.eval()
    with torch.no_grad():
        assert _exact(model[0].gate, 0) == pytest.approx(1.0, rel=1e-5)


RNN_KINDS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
RNN_PATTERNS = [
    "weight_*",
    "weight_ih_l*",
    "weight_hh_l*",
    "weight_*_reverse",
    "weight_??_l0",
    "w*_l1*",
]


@st.composite
def rnns(draw: st.DrawFn) -> tuple[nn.RNNBase, list[str]]:
    kind = draw(st.sampled_from(sorted(RNN_KINDS)))
    hidden = draw(st.integers(1, 9))
    options = {
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "bias": draw(st.booleans()),
    }
    if kind == "LSTM" and hidden > 1:
        options["proj_size"] = draw(st.integers(0, hidden - 1))
    rnn = RNN_KINDS[kind](draw(st.integers(1, 9)), hidden, **options)
    patterns = draw(st.lists(st.sampled_from(RNN_PATTERNS), min_size=1, max_size=3, unique=True))
    return rnn, patterns


@given(rnns(), st.floats(min_value=0.05, max_value=20.0))
def test_any_rnn_gets_exactly_the_weights_its_globs_name_each_at_the_target(
    drawn: tuple[nn.RNNBase, list[str]], lipschitz: float
) -> None:
    rnn, patterns = drawn
    matrices = [n for n in rnn._flat_weights_names if getattr(rnn, n).dim() == 2]
    expected = [n for n in matrices if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    assume(all(any(fnmatch.fnmatchcase(n, p) for n in matrices) for p in patterns))
    snpatch.apply_spectral_norm(rnn, tensors={type(rnn): patterns}, lipschitz=lipschitz)
    assert list(snpatch.spectral_norms(rnn)) == expected
    rnn.train()
    rnn(torch.randn(3, 2, rnn.input_size))
    used = dict(zip(rnn._flat_weights_names, rnn._flat_weights, strict=True))
    for name in expected:
        assert _exact(used[name], 0) == pytest.approx(lipschitz, rel=1e-3), name
