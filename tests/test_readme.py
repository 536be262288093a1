"""Every Python code block in the README and the docs runs, so the docs cannot rot.

The pages are README.md and every docs/**/*.md. A block that must not run is fenced as ``text``
or ``bash``, never ``python``. A ``python`` block that only includes a file
(``--8<-- "examples/ddp.py"``: how the docs show an example script whole) is not run here: the
examples run in tests/test_examples.py (quickstart.py in test_cli.py), and
``test_included_files_are_examples_that_run`` checks that a test runs each one.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import snpatch
from tests.conftest import VISION_MARKS, run_torchrun

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

# A fence may be indented (inside a collapsible block); its closing fence has the same indent.
_PYTHON_FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", flags=re.DOTALL | re.MULTILINE)
_INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')


def _blocks(page: Path) -> list[str]:
    return [textwrap.dedent(body) for _, body in _PYTHON_FENCE.findall(page.read_text())]


def _includes(block: str) -> list[str] | None:
    """The files a block only includes, or None for a block of code."""
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    matches = [_INCLUDE.match(line) for line in lines]
    if lines and all(matches):
        return [m.group(1) for m in matches if m]
    return None


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


BLOCKS = {
    f"{_name(page)}-{i}": block
    for page in PAGES
    for i, block in enumerate(_blocks(page))
    if _includes(block) is None
}
INCLUDED = sorted(
    {path for page in PAGES for block in _blocks(page) for path in _includes(block) or []}
)


def _marks(block: str) -> list[pytest.MarkDecorator]:
    marks = list(VISION_MARKS) if "torchvision" in block else []
    if "init_process_group" in block:
        marks.append(pytest.mark.slow)  # two processes under torchrun
    return marks


def test_readme_and_every_use_page_have_python_blocks() -> None:
    pages_with_code = {key.rsplit("-", 1)[0] for key in BLOCKS}
    uses = ["gan", "lipschitz", "uncertainty", "export", "distributed", "monitoring"]
    expected = {"README.md", "docs/getting-started.md", *(f"docs/{use}.md" for use in uses)}
    assert expected <= pages_with_code, expected - pages_with_code


def _run_distributed(block: str, tmp_path: Path) -> None:
    """A block that starts a process group runs as torchrun would run it: 2 processes."""
    script = tmp_path / "block.py"
    script.write_text(block)
    run_torchrun(script)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch 2.14
@pytest.mark.parametrize(
    "key",
    [pytest.param(key, marks=_marks(block)) for key, block in BLOCKS.items()],
)
def test_python_block_runs(key: str, tmp_path: Path) -> None:
    block = BLOCKS[key]
    if "init_process_group" in block:
        _run_distributed(block, tmp_path)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exec(compile(block, f"{key} (python block)", "exec"), {"__name__": "readme"})


def test_included_files_are_examples_that_run() -> None:
    tests = [
        p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_readme.py"
    ]
    assert INCLUDED, "the docs show the example scripts"
    for path in INCLUDED:
        assert (ROOT / path).is_file(), path
        assert path.startswith("examples/"), path
        assert any(f'"{Path(path).name}"' in text for text in tests), f"no test runs {path}"


def test_api_reference_documents_every_public_name() -> None:
    documented = re.findall(r"^::: snpatch\.(\w+)$", (DOCS / "api.md").read_text(), re.MULTILINE)
    assert len(documented) == len(set(documented)), "a name documented twice"
    assert set(documented) == set(snpatch.__all__)


def _anchors(page: Path) -> set[str]:
    """The heading ids that mkdocs (Python-Markdown's toc) and GitHub give a page's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE):
        slug = re.sub(r"[^\w\s-]", "", heading).strip().lower()
        anchors.add(re.sub(r"[-\s]+", "-", slug))
    return anchors


def test_readme_links_every_docs_page_and_each_link_resolves() -> None:
    """The README is the landing page: it links each page of the site (relative links into
    docs/, which work on GitHub too), and each relative link reaches a file and a heading."""
    text = _PYTHON_FENCE.sub("", README.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    nav = re.findall(r":\s+(\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    pages = {f"docs/{page}" for page in nav if page != "index.md"}
    assert pages, "the site's navigation lists its pages"
    assert pages <= {link.partition("#")[0] for link in relative}
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.is_file(), link
        if anchor:
            assert anchor in _anchors(target), link


def _copy_project(destination: Path) -> None:
    """What `mkdocs build` reads: the config, the pages, the README, the package, the examples."""
    for name in ["mkdocs.yml", "README.md"]:
        shutil.copy(ROOT / name, destination / name)
    for name in ["docs", "snpatch", "examples"]:
        shutil.copytree(ROOT / name, destination / name, ignore=shutil.ignore_patterns("*.pyc"))


def _build(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", "site"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="the docs extra is not installed"
)
def test_docs_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    _copy_project(tmp_path)
    assert _build(tmp_path).returncode == 0  # the docs as they are build
    page = tmp_path / "docs" / "getting-started.md"
    text = page.read_text()
    for broken in ["[gone](no-such-page.md)", "[no heading](api.md#no-such-heading)"]:
        page.write_text(f"{text}\n{broken}\n")
        result = _build(tmp_path)
        assert result.returncode != 0, broken
        assert "no-such" in result.stderr, broken
