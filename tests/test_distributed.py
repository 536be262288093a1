"""DistributedDataParallel: 2 gloo processes on localhost, against a single-process full-batch run.

The ranks run ``tests/ddp_worker.py`` (see its docstring) in subprocesses with a hard timeout;
the processes are killed in ``finally`` whatever happens.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import snpatch
from tests import ddp_worker

pytestmark = pytest.mark.slow  # compiles / starts processes: make test-fast skips it

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
WORLD_SIZE = 2

Results = dict[str, dict[str, torch.Tensor]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _launch(directory: Path, scenarios: list[str], timeout: float) -> list[Results]:
    """Run the scenarios on 2 ranks; return each rank's results. Never leaves a process."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # 2 ranks on a 2-core machine: one thread each.
        "OMP_NUM_THREADS": "1",
    }
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    logs = [directory / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    outs = [directory / f"rank{rank}.pt" for rank in range(WORLD_SIZE)]
    try:
        for rank in range(WORLD_SIZE):
            with logs[rank].open("wb") as log:
                command = [sys.executable, str(WORKER), str(rank), str(WORLD_SIZE), str(port)]
                processes.append(
                    subprocess.Popen(
                        [*command, str(outs[rank]), *scenarios],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + timeout
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for rank, process in enumerate(processes):
        assert process.returncode == 0, logs[rank].read_text()[-3000:]
    return [torch.load(out, weights_only=True) for out in outs]


def _reference() -> dict[str, torch.Tensor]:
    """One process, the full batch, rank 0's seed."""
    torch.manual_seed(ddp_worker.MODEL_SEED)
    model = snpatch.apply_spectral_norm(ddp_worker.make_model())
    x, y = ddp_worker.make_batch()
    ddp_worker.train(model, x, y)
    return ddp_worker.state(model)


def _message(encoded: torch.Tensor) -> str:
    return bytes(encoded.tolist()).decode()


SCENARIOS = [
    "default",
    "broadcast_buffers_false",
    "broadcast_buffers_false_seed_per_rank",
    "forward_sync_buffers_false",
    "patch_after_wrap",
    "exported_midway",
    "compiled_aot_eager",
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[Results]:
    # One launch for every scenario: starting two processes costs more than most scenarios.
    return _launch(tmp_path_factory.mktemp("ddp"), SCENARIOS, timeout=90)


def _assert_ranks_identical_and_equal_to_reference(ranks: list[dict[str, torch.Tensor]]) -> None:
    reference = _reference()
    initial = ddp_worker.state(snpatch.apply_spectral_norm(_seeded_model()))
    for key, expected in reference.items():
        # Every parameter and every buffer (u, v, block, sigma) is bitwise equal on both
        # ranks ...
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        # ... and equal to the single-process full-batch run.
        torch.testing.assert_close(ranks[0][key], expected, rtol=1e-5, atol=1e-6, msg=key)
    # Training moved the weights, so the comparison says something about the iteration.
    moved = [k for k in reference if k.endswith("original")]
    assert all((reference[k] - initial[k]).abs().max() > 1e-2 for k in moved)


def _seeded_model() -> nn.Module:
    torch.manual_seed(ddp_worker.MODEL_SEED)
    return ddp_worker.make_model()


@pytest.mark.parametrize(
    "scenario",
    [
        # broadcast_buffers=True (the default): rank 0's state is broadcast at wrapping and
        # before every forward, so even ranks seeded differently agree.
        "default",
        # The state is not broadcast, but ranks that patched identical weights run the
        # same deterministic iteration on identical (all-reduced) weights.
        "broadcast_buffers_false",
        # torch 2.14's replacement: no broadcast per forward, but one at wrapping.
        "forward_sync_buffers_false",
    ],
)
def test_ddp_state_is_identical_across_ranks_and_matches_one_process(
    ranks: list[Results], scenario: str
) -> None:
    _assert_ranks_identical_and_equal_to_reference([rank[scenario] for rank in ranks])


def test_ddp_broadcast_buffers_false_needs_identically_patched_ranks(
    ranks: list[Results],
) -> None:
    # With broadcast_buffers=False torch does not even broadcast buffers at wrapping: ranks
    # that patched different weights keep different iteration states, although DDP keeps
    # their parameters identical. This is why the README asks for the default.
    ranks = [rank["broadcast_buffers_false_seed_per_rank"] for rank in ranks]
    params = [k for k in ranks[0] if k.startswith("param:")]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in params)
    vectors = [k for k in ranks[0] if k.endswith(("._u", "._v"))]
    assert not all(torch.equal(ranks[0][k], ranks[1][k]) for k in vectors)


def test_ddp_training_goes_on_identically_after_exporting_midway(ranks: list[Results]) -> None:
    # exported() removes and restores the parametrizations of the wrapped model: DDP must
    # keep averaging the gradients of the restored weights, so the ranks (different shards)
    # stay identical and equal to one process that never exported.
    states = [rank["exported_midway"] for rank in ranks]
    for found in states:
        keys = _message(found.pop("checkpoint_keys")).split()
        assert keys == ["0.bias", "0.weight", "3.bias", "3.weight", "5.bias", "5.weight"]
    _assert_ranks_identical_and_equal_to_reference(states)


def test_ddp_patching_after_wrapping_is_refused_and_changes_nothing(ranks: list[Results]) -> None:
    for rank in ranks:
        found = rank["patch_after_wrap"]
        for key in ("error:ddp.module", "error:ddp"):
            message = _message(found[key])
            assert message.startswith("WrappedModelError: layer "), message
            assert "before DistributedDataParallel(model)" in message
        assert not bool(found["patched"])
    # The refused model still trains normally under DDP.
    params = [k for k in ranks[0]["patch_after_wrap"] if k.startswith("param:")]
    assert params
    for key in params:
        assert torch.equal(ranks[0]["patch_after_wrap"][key], ranks[1]["patch_after_wrap"][key])


def test_compiled_ddp_matches_one_process_without_recompiling(ranks: list[Results]) -> None:
    # torch.compile(DDP(model)). aot_eager: dynamo and AOT autograd (the parts that see the
    # hook, the buffer updates and the custom autograd function) without inductor's C++
    # compilation, which tests/test_compile.py covers in one process.
    states = [rank["compiled_aot_eager"] for rank in ranks]
    counts = {k: states[0].pop(k) for k in ("graphs_after_one_step", "graphs", "graph_breaks")}
    for key in counts:
        del states[1][key]
    # No graph is compiled after the first step.
    assert int(counts["graphs"]) == int(counts["graphs_after_one_step"]) > 0
    # DDP's own graph breaks (its logger and _inside_ddp_forward): 3, also without snpatch.
    assert int(counts["graph_breaks"]) <= 3
    _assert_ranks_identical_and_equal_to_reference(states)
