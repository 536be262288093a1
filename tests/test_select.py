"""Selection: one truth table for name matching, then the rules around it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import snpatch
from snpatch import NoMatchingLayersError, SnpatchWarning


class Tree(nn.Module):
    """encoder.{conv1, conv2, block.{conv, fc}}, head, attn (with its out_proj), act."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.conv1 = nn.Conv2d(3, 4, 3)
        self.encoder.conv2 = nn.Conv2d(4, 4, 3)
        self.encoder.block = nn.Module()
        self.encoder.block.conv = nn.ConvTranspose2d(4, 4, 3)
        self.encoder.block.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.attn = nn.MultiheadAttention(4, 1)
        self.act = nn.ReLU()


ALL = ["encoder.conv1", "encoder.conv2", "encoder.block.conv", "encoder.block.fc", "head", "attn"]

# (include, exclude, expected selection in model order)
TRUTH_TABLE = [
    (None, None, ALL),
    ("head", None, ["head"]),
    ("encoder", None, ["encoder.conv1", "encoder.conv2", "encoder.block.conv", "encoder.block.fc"]),
    ("encoder.block", None, ["encoder.block.conv", "encoder.block.fc"]),
    ("encoder.conv*", None, ["encoder.conv1", "encoder.conv2"]),
    ("*conv*", None, ["encoder.conv1", "encoder.conv2", "encoder.block.conv"]),
    ("*.fc", None, ["encoder.block.fc"]),
    ("encoder.?onv1", None, ["encoder.conv1"]),
    ("encoder.conv[12]", None, ["encoder.conv1", "encoder.conv2"]),
    (["head", "attn"], None, ["head", "attn"]),
    (["head", "head"], None, ["head"]),
    ("re:encoder\\.conv\\d", None, ["encoder.conv1", "encoder.conv2"]),
    ("re:conv", None, None),
    ("re:.*conv", None, ["encoder.block.conv"]),
    (
        "re:encoder",
        None,
        ["encoder.conv1", "encoder.conv2", "encoder.block.conv", "encoder.block.fc"],
    ),
    (None, "encoder", ["head", "attn"]),
    (None, "encoder.block", ["encoder.conv1", "encoder.conv2", "head", "attn"]),
    (
        None,
        ["head", "attn"],
        ["encoder.conv1", "encoder.conv2", "encoder.block.conv", "encoder.block.fc"],
    ),
    ("encoder", "encoder.block", ["encoder.conv1", "encoder.conv2"]),
    ("encoder.block", "encoder", None),
    ("*", "re:.*\\.conv\\d", ["encoder.block.conv", "encoder.block.fc", "head", "attn"]),
    (lambda name, m: isinstance(m, nn.Linear), None, ["encoder.block.fc", "head"]),
    (
        None,
        lambda name, m: isinstance(m, nn.Conv2d),
        ["encoder.block.conv", "encoder.block.fc", "head", "attn"],
    ),
]


@pytest.mark.parametrize(("include", "exclude", "expected"), TRUTH_TABLE)
def test_truth_table(include: object, exclude: object, expected: list[str] | None) -> None:
    model = Tree()
    if expected is None:
        with pytest.raises(NoMatchingLayersError):
            snpatch.select_layers(model, include, exclude)  # type: ignore[arg-type]
        return
    assert snpatch.select_layers(model, include, exclude) == expected  # type: ignore[arg-type]


def test_regex_must_match_the_whole_name() -> None:
    # 're:conv' is anchored: it matches no name (nor ancestor) exactly.
    with pytest.raises(NoMatchingLayersError, match="re:conv"):
        snpatch.select_layers(Tree(), "re:conv")


def test_attention_out_proj_is_part_of_the_attention_layer() -> None:
    model = Tree()
    assert "attn.out_proj" not in snpatch.select_layers(model)
    # Linear includes NonDynamicallyQuantizableLinear, but out_proj still belongs to attn.
    assert snpatch.select_layers(model, layer_types=[nn.Linear]) == ["encoder.block.fc", "head"]


def test_layer_types_override_and_subclasses() -> None:
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Linear(3, 3))
    assert snpatch.select_layers(model) == ["0", "1", "2"]
    assert snpatch.select_layers(model, layer_types=[MyConv]) == ["0"]
    assert snpatch.select_layers(model, layer_types=(nn.Linear,)) == ["2"]
    assert snpatch.select_layers(model, layer_types=[nn.Embedding, nn.Linear]) == ["2"]


def test_shared_module_is_listed_once() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert snpatch.select_layers(model) == ["0"]


def test_root_layer_has_the_empty_name() -> None:
    assert snpatch.select_layers(nn.Linear(2, 2)) == [""]


def test_unmatched_include_names_pattern_and_closest_layers() -> None:
    with pytest.raises(NoMatchingLayersError) as info:
        snpatch.select_layers(Tree(), ["head", "encoder.conv3"])
    message = str(info.value)
    assert "'encoder.conv3'" in message
    assert "encoder.conv1" in message  # a close name is suggested
    assert isinstance(info.value, ValueError)


def test_unmatched_exclude_warns_and_keeps_the_selection() -> None:
    with pytest.warns(SnpatchWarning, match="'decoder'"):
        assert snpatch.select_layers(Tree(), exclude="decoder") == ALL


def test_everything_excluded_raises() -> None:
    with pytest.raises(NoMatchingLayersError, match="leave no eligible layer"):
        snpatch.select_layers(Tree(), exclude="*")


def test_model_without_eligible_layers_raises() -> None:
    with pytest.raises(NoMatchingLayersError, match="has no eligible layers"):
        snpatch.select_layers(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_select_layers_changes_nothing() -> None:
    model = Tree()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snpatch.select_layers(model, "encoder")
    assert not snpatch.is_patched(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_select_layers_matches_apply_spectral_norm() -> None:
    model = Tree()
    names = snpatch.select_layers(model, "encoder", "*.fc")
    snpatch.apply_spectral_norm(model, "encoder", "*.fc")
    assert list(snpatch.patched_layers(model)) == names


# --- linear-like layers of other libraries, and layers skipped ------------------------------


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, rebuilt: weight (in, out), forward x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


# Where transformers defines it (recognised by name: transformers is never imported).
Conv1D.__module__ = "transformers.pytorch_utils"


class OldConv1D(Conv1D):
    pass


OldConv1D.__module__, OldConv1D.__qualname__ = "transformers.modeling_utils", "Conv1D"


class MyConv1D(Conv1D):
    """A user's subclass of transformers' class: recognised through its base."""


class GPTBlock(nn.Module):
    """GPT-2's layout: attention c_attn/c_proj and MLP c_fc/c_proj are all Conv1D."""

    def __init__(self, conv: type[Conv1D] = Conv1D) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.c_attn = conv(24, 8)
        self.c_proj = conv(8, 8)
        self.c_fc = conv(32, 8)
        self.mlp_proj = conv(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_proj(self.c_attn(self.ln(x))[..., :8])
        return self.mlp_proj(torch.relu(self.c_fc(x)))


class GPT(nn.Module):
    def __init__(self, conv: type[Conv1D] = Conv1D) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.h = nn.ModuleList([GPTBlock(conv), GPTBlock(conv)])
        self.lm_head = nn.Linear(8, 20, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for block in self.h:
            x = block(x)
        return self.lm_head(x)


PROJECTIONS = [f"h.{i}.{n}" for i in range(2) for n in ("c_attn", "c_proj", "c_fc", "mlp_proj")]


@pytest.mark.parametrize("conv", [Conv1D, OldConv1D, MyConv1D], ids=["4.20+", "older", "subclass"])
def test_transformers_conv1d_is_normalized_as_the_map_x_to_x_w(conv: type[Conv1D]) -> None:
    torch.manual_seed(0)
    model = GPT(conv)
    assert snpatch.select_layers(model) == [*PROJECTIONS, "lm_head"]
    snpatch.apply_spectral_norm(model, lipschitz=0.5)
    assert "transformers" not in __import__("sys").modules
    model.eval()
    for name in PROJECTIONS:
        layer = model.get_submodule(name)
        norm = snpatch.spectral_norms(layer)["weight"]
        assert norm.dim == 1  # u lives on the outputs (nf), v on the inputs (nx)
        assert norm._u.shape == (layer.nf,)
        weight = layer.weight.detach().double()
        # x -> x W: its operator norm is the top singular value of W, at the target.
        assert float(torch.linalg.matrix_norm(weight, ord=2)) == pytest.approx(0.5, rel=1e-5)
        x = torch.randn(3, weight.shape[0])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias)
        assert snpatch.lipschitz_bound(layer) >= 0.5 * (1 - 1e-6)
    never = GPT(conv)
    assert list(snpatch.plain_state_dict(model)) == list(never.state_dict())


def test_a_conv1d_that_is_not_transformers_is_not_taken_for_it() -> None:
    class Local(nn.Module):  # the same layer, in another library
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

    Local.__module__, Local.__qualname__, Local.__name__ = "mylib.layers", "Conv1D", "Conv1D"
    wrong_bias = Conv1D(4, 6)
    wrong_bias.bias = nn.Parameter(torch.zeros(6))  # not (out,): not transformers' layout
    model = nn.Sequential(Local(4, 6), wrong_bias, nn.Linear(4, 4))
    with pytest.warns(SnpatchWarning, match=r"2 layer\(s\).*'0' \(Conv1D, weight 6x4\), '1'"):
        assert snpatch.select_layers(model) == ["2"]


class Custom(nn.Module):
    """A layer with a 2-D weight that snpatch has no rule for."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def _with_custom() -> nn.Module:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), Custom(), nn.Linear(4, 4))
    model.add_module("inner", nn.Sequential(Custom()))
    return model


def test_patching_the_whole_model_warns_naming_the_layers_with_a_weight_it_skips() -> None:
    model = _with_custom()
    with pytest.warns(SnpatchWarning, match=r"2 layer\(s\).*'2' \(Custom, weight 4x4\), 'inner.0'"):
        snpatch.apply_spectral_norm(model)
    assert list(snpatch.patched_layers(model)) == ["3"]
    # No warning where the user chose: excluded by name, chosen by name, chosen by type.
    for chosen in ({"exclude": ["2", "inner"]}, {"include": "3"}, {"layer_types": [nn.Linear]}):
        snpatch.apply_spectral_norm(_with_custom(), **chosen)  # type: ignore[arg-type]


# Tensor names: (tensors entry for a 2-layer bidirectional LSTM, expected (name, dim) pairs in
# the layer's order, or the error)
LSTM_WEIGHTS = [
    f"weight_{kind}_l{layer}{suffix}"
    for layer in (0, 1)
    for suffix in ("", "_reverse")
    for kind in ("ih", "hh")
]
TENSOR_TRUTH_TABLE: list[tuple[object, object]] = [
    ("weight_ih_l0", [("weight_ih_l0", 0)]),
    ("weight_ih_l*", [(n, 0) for n in LSTM_WEIGHTS if "_ih_" in n]),
    (("weight_ih_l*", "weight_hh_l*"), [(n, 0) for n in LSTM_WEIGHTS]),
    (["weight_hh_l1", "weight_ih_l0"], [("weight_ih_l0", 0), ("weight_hh_l1", 0)]),
    (["weight_*", "weight_hh_l0"], [(n, 0) for n in LSTM_WEIGHTS]),  # a union, once each
    ("weight_*_reverse", [(n, 0) for n in LSTM_WEIGHTS if n.endswith("_reverse")]),
    ("weight_??_l1", [("weight_ih_l1", 0), ("weight_hh_l1", 0)]),
    ("re:weight_hh_l\\d", [("weight_hh_l0", 0), ("weight_hh_l1", 0)]),
    ("re:weight_hh", snpatch.NoMatchingTensorsError),  # a regex matches the whole name
    (snpatch.TensorNames("weight_hh_l0", dim=1), [("weight_hh_l0", 1)]),
    (snpatch.TensorNames("weight_hh_l0", dim=-1), [("weight_hh_l0", 1)]),
    (snpatch.TensorNames("weight_hh_l0", dim=2), snpatch.InvalidArgumentError),
    ("bias_ih_l0", snpatch.UnsupportedLayerError),  # 1-D
    ("*", snpatch.UnsupportedLayerError),  # the biases too
    ("weight_hr_l*", snpatch.NoMatchingTensorsError),  # no projection
    ("Weight_ih_l0", snpatch.NoMatchingTensorsError),  # case-sensitive
]


@pytest.mark.parametrize(("names", "expected"), TENSOR_TRUTH_TABLE)
def test_tensor_name_truth_table(names: object, expected: object) -> None:
    model = nn.Sequential(nn.LSTM(3, 4, num_layers=2, bidirectional=True), nn.Linear(8, 2))
    tensors = {nn.LSTM: names}
    if isinstance(expected, type):
        with pytest.raises(expected):
            snpatch.select_layers(model, tensors=tensors)  # type: ignore[dict-item]
        with pytest.raises(expected):
            snpatch.apply_spectral_norm(model, tensors=tensors)  # type: ignore[dict-item]
        assert not snpatch.is_patched(model)
        return
    assert snpatch.select_layers(model, tensors=tensors) == ["0", "1"]  # type: ignore[dict-item]
    snpatch.apply_spectral_norm(model, tensors=tensors)  # type: ignore[dict-item]
    norms = snpatch.spectral_norms(model[0])
    assert [(key, norm.dim) for key, norm in norms.items()] == expected
    assert list(snpatch.spectral_norms(model[1])) == ["weight"]  # the defaults elsewhere


class Kernel(nn.Module):
    """A custom layer whose matrix is called ``kernel``."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 4))
        self.scale = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel * self.scale


class WideKernel(Kernel):
    pass


def test_a_layer_follows_the_entry_of_its_nearest_class() -> None:
    model = nn.Sequential(Kernel(), WideKernel(), nn.Linear(4, 4))
    tensors = {Kernel: "kernel", WideKernel: ["kernel", "scale"], nn.Linear: "weight"}
    snpatch.apply_spectral_norm(model, tensors=tensors)
    assert {n: list(snpatch.spectral_norms(m)) for n, m in model.named_children()} == {
        "0": ["kernel"],
        "1": ["kernel", "scale"],
        "2": ["weight"],
    }


def test_tensors_types_are_eligible_and_selected_by_include_and_exclude() -> None:
    model = nn.Sequential(Kernel(), nn.GRU(4, 4), nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    tensors = {Kernel: "kernel", nn.GRU: "weight_hh_l0"}
    assert snpatch.select_layers(model, tensors=tensors) == ["0", "1", "2", "3"]
    assert snpatch.select_layers(model, exclude="1", tensors=tensors) == ["0", "2", "3"]
    assert snpatch.select_layers(model, include=["0", "1"], tensors=tensors) == ["0", "1"]
    # In addition to layer_types, not instead.
    assert snpatch.select_layers(model, layer_types=[nn.Linear], tensors=tensors) == ["0", "1", "2"]
    # Selected by include/exclude only: an excluded layer's names are not checked.
    assert snpatch.select_layers(model, exclude="1", tensors={nn.GRU: "nonsense"}) == ["2", "3"]


def test_a_tensors_entry_that_no_layer_of_the_model_follows_warns() -> None:
    model = nn.Sequential(Kernel(), nn.Linear(4, 4))
    with pytest.warns(SnpatchWarning, match=r"tensors\[GRU\] applies to no layer of the model"):
        snpatch.apply_spectral_norm(model, tensors={Kernel: "kernel", nn.GRU: "weight_hh_l0"})
    assert list(snpatch.patched_layers(model)) == ["0", "1"]


def test_a_layer_chosen_by_tensors_is_not_reported_as_skipped() -> None:
    model = _with_custom()
    with pytest.warns(SnpatchWarning, match=r"1 layer\(s\).*'2' \(Custom, weight 4x4\)") as record:
        snpatch.apply_spectral_norm(model, exclude="inner", tensors={nn.Embedding: "weight"})
    assert len(record) == 1
    assert list(snpatch.patched_layers(model)) == ["0", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        snpatch.apply_spectral_norm(_with_custom(), tensors={Custom: "weight"})


def test_attention_entries_name_out_proj_weight_too() -> None:
    model = nn.Sequential(nn.MultiheadAttention(4, 2))
    with pytest.raises(snpatch.NoMatchingTensorsError, match=r"'out_proj\.weight'"):
        snpatch.apply_spectral_norm(model, tensors={nn.MultiheadAttention: "weight"})
    snpatch.apply_spectral_norm(model, tensors={nn.MultiheadAttention: "out_proj.weight"})
    assert list(snpatch.spectral_norms(model[0])) == ["out_proj.weight"]
