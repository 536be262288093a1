"""DDP and FSDP2 (fully_shard): 2 gloo processes on localhost, against a single-process run.

The ranks run ``tests/ddp_worker.py`` (see its docstring) in subprocesses with a hard timeout;
the processes are killed in ``finally`` whatever happens.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import snpatch
from snpatch.parametrization import weight_to_matrix
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


#: DistributedDataParallel(forward_sync_buffers=...) is in torch 2.13 and 2.14, not in 2.11.
HAS_FORWARD_SYNC_BUFFERS = (
    "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
)

SCENARIOS = [
    "default",
    "broadcast_buffers_false",
    "broadcast_buffers_false_seed_per_rank",
    *(["forward_sync_buffers_false"] if HAS_FORWARD_SYNC_BUFFERS else []),
    "patch_after_wrap",
    "exported_midway",
    "compiled_aot_eager",
    "fsdp",
    "fsdp_operator",
    "fsdp_sharded_in_eval",
    "fsdp_bf16",
    "fsdp_patch_after_shard",
    "fsdp_checkpoint",
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[Results]:
    # One launch for every scenario: starting two processes costs more than most scenarios.
    return _launch(tmp_path_factory.mktemp("ddp"), SCENARIOS, timeout=240)


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
        # The newer flag: no broadcast per forward, but one at wrapping.
        pytest.param(
            "forward_sync_buffers_false",
            marks=pytest.mark.skipif(
                not HAS_FORWARD_SYNC_BUFFERS,
                reason=f"DistributedDataParallel has no forward_sync_buffers in torch "
                f"{torch.__version__} (torch 2.13 added it)",
            ),
        ),
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
    # that patched different weights keep different iteration states for every weight the
    # iteration tracks, although DDP keeps their parameters identical. This is why the docs
    # ask for the default. The worker's model is small enough that every weight's row space
    # fits in the block: those are solved from the weight alone at every step, so there the
    # ranks' vectors agree, bitwise, whatever their seeds (the tracked blocks still differ).
    ranks = [rank["broadcast_buffers_false_seed_per_rank"] for rank in ranks]
    params = [k for k in ranks[0] if k.startswith("param:")]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in params)
    vectors = [k for k in ranks[0] if k.endswith(("._u", "._v"))]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in vectors)
    blocks = [k for k in ranks[0] if k.endswith("._block")]
    assert not all(torch.equal(ranks[0][k], ranks[1][k]) for k in blocks)


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


# --- FSDP2: torch.distributed.fsdp.fully_shard -------------------------------------------


def _fsdp_reference(method: str) -> dict[str, torch.Tensor]:
    """One process, the full batch, Adam, the same seed; as ddp_worker.fsdp records it."""
    torch.manual_seed(ddp_worker.MODEL_SEED)
    model = ddp_worker.patch(ddp_worker.make_model(), method)
    x, y = ddp_worker.make_batch()
    ddp_worker.train(model, x, y, optimizer=ddp_worker.adam(model))
    ddp_worker.catch_up(model, x)
    found = ddp_worker.state(model)
    found.update({f"plain:{k}": v.clone() for k, v in snpatch.plain_state_dict(model).items()})
    return found


def _operator_norm(weight: torch.Tensor) -> float:
    """The l2 operator norm of ddp_worker's Conv2d on its 3x6x6 input, from its dense matrix."""
    n = 3 * 6 * 6
    out = F.conv2d(torch.eye(n, dtype=torch.float64).reshape(n, 3, 6, 6), weight.double())
    return float(torch.linalg.matrix_norm(out.reshape(n, -1), 2))


def _matrix_norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight_to_matrix(weight.double(), 0), 2))


def _assert_refused_midway(found: dict[str, torch.Tensor]) -> None:
    message = _message(found.pop("error:exported"))
    assert message.startswith("WrappedModelError: can't take the spectral normalization off "), (
        message
    )
    assert "sharded by fully_shard" in message
    assert "Gather first" in message
    # Nothing was taken off (and the state below equals a run that never tried).
    assert int(found.pop("patched_after_refusal")) == 3


@pytest.mark.parametrize(
    ("scenario", "method"),
    [("fsdp", "matrix"), ("fsdp_operator", "operator"), ("fsdp_sharded_in_eval", "matrix")],
)
def test_fsdp_state_is_identical_across_ranks_and_matches_one_process(
    ranks: list[Results], scenario: str, method: str
) -> None:
    # Patch, fully_shard each layer and the root (fsdp_sharded_in_eval: in eval mode, with
    # snpatch's pre-hooks parked), Adam on different data per rank; an exported() midway is
    # refused and changes nothing.
    states = [dict(rank[scenario]) for rank in ranks]
    for found in states:
        _assert_refused_midway(found)
    reference = _fsdp_reference(method)
    # The same names as one process: full parameters (gathered DTensors), every buffer,
    # and plain_state_dict on the sharded model gives the unpatched architecture's keys.
    assert sorted(states[0]) == sorted(reference)
    plain = sorted(k.removeprefix("plain:") for k in reference if k.startswith("plain:"))
    assert plain == sorted(ddp_worker.make_model().state_dict())
    for key, expected in reference.items():
        assert torch.equal(states[0][key], states[1][key]), key
        # A tracked block's later vectors are its least determined: rounding-level
        # differences of the weights (3e-8 here) move the conv's last of 8 by 6e-6 and the
        # others by 3e-7 to 1.3e-6 (its top vector _op_v: 3e-7). The estimates, the vectors
        # torch saves and the weights are held to 1e-6.
        atol = 1e-5 if key.endswith("_block") else 1e-6
        torch.testing.assert_close(states[0][key], expected, rtol=1e-5, atol=atol, msg=key)
    torch.manual_seed(ddp_worker.MODEL_SEED)
    initial = ddp_worker.make_model().state_dict()
    for name in ("0", "3", "5"):
        moved = reference[f"plain:{name}.weight"] - initial[f"{name}.weight"]
        assert moved.abs().max() > 1e-2, name
        # Every full effective weight is at its target (lipschitz=1).
        weight = states[0][f"plain:{name}.weight"]
        if method == "operator" and weight.dim() == 4:
            # The operator iteration tracks its norm within 0.2% here (1.0012 measured).
            assert abs(_operator_norm(weight) - 1.0) < 2e-3, name
        else:
            assert abs(_matrix_norm(weight) - 1.0) < 1e-5, name


def test_fsdp_mixed_precision_keeps_the_iteration_in_float32(ranks: list[Results]) -> None:
    # MixedPrecisionPolicy(param_dtype=torch.bfloat16): the forward (and the hook) sees
    # bfloat16 full weights; the state stays float32 and is computed in float32.
    states = [dict(rank["fsdp_bf16"]) for rank in ranks]
    for found in states:
        _assert_refused_midway(found)
    found = states[0]
    assert all(torch.equal(found[k], states[1][k]) for k in found)
    buffers = [k for k in found if k.startswith("buffer:")]
    assert {k.rpartition(".")[2] for k in buffers} == {"_u", "_v", "_block", "_sigma"}
    assert all(found[k].dtype == torch.float32 for k in buffers)
    assert all(found[k].dtype == torch.float32 for k in found if k.startswith("param:"))
    for name in ("0", "3", "5"):
        # The estimate is the exact top singular value (float64 SVD) of the bfloat16 weight
        # the last step ran on: float32 math (bfloat16 math would be off by ~1e-3).
        bf16 = found[f"bf16:{name}"]
        assert bf16.dtype == torch.bfloat16
        sigma = float(found[f"buffer:{name}.parametrizations.weight.0._sigma"])
        exact = _matrix_norm(bf16)
        assert abs(sigma - exact) < 1e-5 * exact, name
        # The full-precision effective weight is at its target.
        assert abs(_matrix_norm(found[f"plain:{name}.weight"]) - 1.0) < 1e-5, name


def test_fsdp_patching_after_sharding_is_refused_and_changes_nothing(
    ranks: list[Results],
) -> None:
    for rank in ranks:
        found = rank["fsdp_patch_after_shard"]
        # The whole model, one sharded layer, and a root-only sharded model after a no_grad
        # forward: its parameters are then FSDP's gathered full tensors, not DTensors.
        assert not bool(found["root_only_params_are_dtensors"])
        for key in ("error:model", "error:layer", "error:root_only_after_forward"):
            message = _message(found[key])
            assert message.startswith("WrappedModelError: "), message
            assert "sharded by fully_shard" in message
            assert message.endswith("call apply_spectral_norm(model) before fully_shard")
        assert not bool(found["patched"])
        assert bool(found["is_fsdp_module"])
    # The refused model still trains normally under FSDP.
    params = [k for k in ranks[0]["fsdp_patch_after_shard"] if k.startswith("param:")]
    assert params
    for key in params:
        assert torch.equal(
            ranks[0]["fsdp_patch_after_shard"][key], ranks[1]["fsdp_patch_after_shard"][key]
        )


def test_fsdp_checkpoint_round_trip_with_distributed_checkpoint(ranks: list[Results]) -> None:
    # dcp.save of get_model_state_dict(model); dcp.load + set_model_state_dict into a
    # sharded patched model with other weights and vectors.
    for rank in ranks:
        found = rank["fsdp_checkpoint"]
        assert bool(found["outputs_differ_before"])
        assert torch.equal(found["saved:out"], found["loaded:out"])
        saved = sorted(k.removeprefix("saved:") for k in found if k.startswith("saved:"))
        loaded = sorted(k.removeprefix("loaded:") for k in found if k.startswith("loaded:"))
        assert saved == loaded
        assert any(k.endswith("._u") for k in saved)
        for key in saved:
            assert torch.equal(found[f"saved:{key}"], found[f"loaded:{key}"]), key
        for name in ("0", "2", "4"):
            # Loading re-fitted the tracked block to the loaded (sharded) weights: the next
            # training step's estimate is the exact sigma (the block left from the other weights,
            # as dcp.load alone leaves it, is 4% and 10% off on layers 0 and 2).
            sigma = float(found[f"loaded_sigma:{name}"])
            exact = _matrix_norm(found[f"loaded_weight:{name}"])
            assert abs(sigma - exact) < 1e-5 * exact, name
        # update_sigma gathers the sharded weights, with steps (a tripled weight keeps its
        # singular vectors: one step is exact) and without.
        exact = _matrix_norm(found["update_sigma_weight"])
        assert abs(exact - 3 * _matrix_norm(found["loaded_weight:0"])) < 1e-5 * exact
        for key in ("update_sigma_steps_1", "update_sigma_exact"):
            assert abs(float(found[key]) - exact) < 1e-5 * exact, key
    assert all(
        torch.equal(ranks[0]["fsdp_checkpoint"][k], v)
        for k, v in ranks[1]["fsdp_checkpoint"].items()
    )
