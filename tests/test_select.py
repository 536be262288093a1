"""Selection: one truth table for name matching, then the rules around it."""

from __future__ import annotations

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
