"""Every Python code block in the README runs, so the docs cannot rot."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import VISION_MARKS

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _marks(block: str) -> list[pytest.MarkDecorator]:
    marks = list(VISION_MARKS) if "torchvision" in block else []
    if "init_process_group" in block:
        marks.append(pytest.mark.slow)  # two processes under torchrun
    return marks


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


def _run_distributed(block: str, tmp_path: Path) -> None:
    """A block that starts a process group runs as torchrun would run it: 2 processes."""
    script = tmp_path / "block.py"
    script.write_text(block)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    process = subprocess.Popen(
        [*command, "--nproc_per_node=2", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a timeout can kill the workers too
    )
    try:
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, stderr[-3000:]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch 2.14
@pytest.mark.parametrize(
    "index",
    [
        pytest.param(i, marks=_marks(block)) if _marks(block) else i
        for i, block in enumerate(BLOCKS)
    ],
)
def test_readme_python_block_runs(index: int, tmp_path: Path) -> None:
    block = BLOCKS[index]
    if "init_process_group" in block:
        _run_distributed(block, tmp_path)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exec(compile(block, f"README.md block {index}", "exec"), {"__name__": "readme"})
