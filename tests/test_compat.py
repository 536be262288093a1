"""snpatch reaches torch's private APIs only through ``snpatch/_compat.py``.

A static check over the package's source: outside ``_compat.py`` no import from a private
module (``torch._subclasses``, ``torch.utils._python_dispatch``) or of a private name, and
no ``obj._name`` (or ``getattr(obj, "_name")``) of a name that snpatch itself does not
define, except nn.Module's storage and override protocol in :data:`MODULE_PROTOCOL`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "snpatch"
COMPAT = "_compat.py"

#: nn.Module's own storage dicts and the methods a subclass overrides: the protocol that
#: torch's parametrize.py and prune.py are written against, unchanged across torch 2.x. Read
#: directly (``nn.Module.__getattr__`` costs microseconds per access on hot paths).
MODULE_PROTOCOL = frozenset(
    {"_parameters", "_buffers", "_modules", "_apply", "_load_from_state_dict"}
)

_NAME_FUNCTIONS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(trees: list[ast.Module]) -> set[str]:
    """Names snpatch defines: functions, classes, module/class-level names, ``self.x``."""
    names: set[str] = set()

    def targets(node: ast.AST) -> list[ast.expr]:
        if isinstance(node, ast.Assign):
            return node.targets
        if isinstance(node, ast.AnnAssign | ast.AugAssign):
            return [node.target]
        return []

    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
                if isinstance(node, ast.ClassDef):
                    for statement in node.body:
                        for target in targets(statement):
                            if isinstance(target, ast.Name):
                                names.add(target.id)
            for target in targets(node):
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id in ("self", "cls")
                ):
                    names.add(target.attr)
        for statement in tree.body:
            for target in targets(statement):
                if isinstance(target, ast.Name):
                    names.add(target.id)
    return names


def private_uses(sources: dict[str, str]) -> list[str]:
    """``"file:line: what"`` for each private API use in ``sources`` (name -> source)."""
    trees = {name: ast.parse(text, filename=name) for name, text in sources.items()}
    defined = _defined_names(list(trees.values()))
    found = []
    for name, tree in trees.items():
        if name == COMPAT:
            continue
        for node in ast.walk(tree):
            what = None
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if any(_private(part) for part in node.module.split(".")):
                    what = f"from {node.module} import"
                else:
                    bad = [a.name for a in node.names if _private(a.name)]
                    what = f"from {node.module} import {', '.join(bad)}" if bad else None
            elif isinstance(node, ast.Import):
                bad = [a.name for a in node.names if any(map(_private, a.name.split(".")))]
                what = f"import {', '.join(bad)}" if bad else None
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                if node.attr not in defined and node.attr not in MODULE_PROTOCOL:
                    what = f".{node.attr}"
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in _NAME_FUNCTIONS
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
                and node.args[1].value not in defined | MODULE_PROTOCOL
            ):
                what = f"{node.func.id}(..., {node.args[1].value!r})"
            if what is not None:
                found.append(f"{name}:{getattr(node, 'lineno', 0)}: {what}")
    return found


def _package_sources() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(PACKAGE.glob("*.py"))}


def test_private_torch_apis_are_used_only_in_compat() -> None:
    uses = private_uses(_package_sources())
    assert not uses, "private APIs outside snpatch/_compat.py:\n" + "\n".join(uses)


@pytest.mark.parametrize(
    "line",
    [
        "import torch\nx = torch._C._is_tracing()",
        "import torch\ntorch._foreach_copy_([], [])",
        "from torch._subclasses.fake_tensor import FakeTensorMode",
        "from torch.utils._python_dispatch import TorchDispatchMode",
        "from torch.nn.utils.parametrize import _maybe_set",
        "def f(t):\n    return t._version",
        "def f(m):\n    return m._forward_pre_hooks",
        "from torch.nn.utils import parametrize\ng = getattr(parametrize, '_maybe_set', None)",
        "from torch.nn.utils import parametrize\nparametrize._maybe_set = print",
    ],
)
def test_the_check_sees_each_kind_of_use(line: str) -> None:
    assert private_uses({"x.py": line}), line


@pytest.mark.parametrize(
    "line",
    [
        # snpatch's own private names, nn.Module's storage, dunders, a private alias.
        "class A:\n    _cache = None\n    def f(self):\n        return self._cache",
        "def f(m):\n    return m._parameters, m._buffers, m._modules",
        "def f(m):\n    return m.__class__",
        "from torch.nn.utils.spectral_norm import SpectralNorm as _Legacy",
        # Inside the compat module anything goes.
    ],
)
def test_the_check_allows_snpatchs_own_names(line: str) -> None:
    assert not private_uses({"x.py": line}), line
    assert not private_uses({COMPAT: "import torch\ntorch._C._is_tracing()"})
