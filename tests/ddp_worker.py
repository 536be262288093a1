"""One rank of the DistributedDataParallel tests (started by tests/test_distributed.py).

Usage: ``PYTHONPATH=<repo> python tests/ddp_worker.py RANK WORLD_SIZE PORT OUT_FILE SCENARIO...``.
Each scenario trains a small patched model for a few steps on this rank's shard of a fixed
batch, and the rank saves ``{scenario: {name: tensor}}`` (every parameter and every buffer,
plus errors and graph counts) to ``OUT_FILE`` with ``torch.save``. The test compares the ranks
with each other and with a single-process run on the full batch.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import snpatch

STEPS = 3
LR = 0.5
BATCH = 8
MODEL_SEED = 10
DATA_SEED = 1234


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    )


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    return (
        torch.randn(BATCH, 3, 6, 6, generator=generator),
        torch.randn(BATCH, 3, generator=generator),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = STEPS) -> None:
    """SGD on the mean squared error; DDP averages the ranks' gradients, which for equal
    shards is the gradient of the full-batch mean."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=LR)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        (model(x) - y).square().mean().backward()
        optimizer.step()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and every buffer (``_u``, ``_v``, ``_block``, ``_sigma``) by name."""
    found = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    found.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()})
    return found


def run(
    rank: int, seed_per_rank: bool, wrap: Callable[[nn.Module], DistributedDataParallel]
) -> dict[str, torch.Tensor]:
    """Patch, then wrap, then train on this rank's shard."""
    torch.manual_seed(MODEL_SEED + (rank if seed_per_rank else 0))
    model = snpatch.apply_spectral_norm(make_model())
    ddp = wrap(model)
    x, y = make_batch()
    shard = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    train(ddp, x[shard], y[shard])
    return state(model)


def exported_midway(rank: int) -> dict[str, torch.Tensor]:
    """Patch, wrap, train a step, take a plain checkpoint inside ``exported``, train on: the
    restored model must keep DDP averaging its gradients (same result as no export)."""
    torch.manual_seed(MODEL_SEED + rank)
    model = snpatch.apply_spectral_norm(make_model())
    ddp = DistributedDataParallel(model)
    x, y = make_batch()
    shard = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    train(ddp, x[shard], y[shard], steps=1)
    with snpatch.exported(model):
        checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    train(ddp, x[shard], y[shard], steps=STEPS - 1)
    found = state(model)
    found["checkpoint_keys"] = torch.tensor(list(" ".join(sorted(checkpoint)).encode()))
    return found


def _message(error: Exception) -> torch.Tensor:
    return torch.tensor(list(f"{type(error).__name__}: {error}".encode()))


def patch_after_wrap(rank: int) -> dict[str, torch.Tensor]:
    """Wrap an unpatched model, then patch ``ddp.module`` and ``ddp``: both are refused,
    the model is left unpatched and DDP still trains it."""
    torch.manual_seed(MODEL_SEED + rank)
    ddp = DistributedDataParallel(make_model())
    found = {}
    for key, target in (("error:ddp.module", ddp.module), ("error:ddp", ddp)):
        try:
            snpatch.apply_spectral_norm(target)
        except snpatch.SnpatchError as error:
            found[key] = _message(error)
    found["patched"] = torch.tensor(snpatch.is_patched(ddp))
    x, y = make_batch()
    shard = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    train(ddp, x[shard], y[shard])
    found.update(state(ddp.module))
    return found


def compiled(rank: int, backend: str, inner: bool) -> dict[str, torch.Tensor]:
    """Patch, wrap, then ``torch.compile`` the DDP module (``inner``: compile the patched
    model with ``fullgraph=True``, then wrap); also counts dynamo's graphs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(MODEL_SEED + rank)
    model = snpatch.apply_spectral_norm(make_model())
    if inner:
        ddp = DistributedDataParallel(torch.compile(model, backend=backend, fullgraph=True))
    else:
        ddp = torch.compile(DistributedDataParallel(model), backend=backend)
    x, y = make_batch()
    shard = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    train(ddp, x[shard], y[shard], steps=1)
    graphs_after_one_step = counters["stats"]["unique_graphs"]
    train(ddp, x[shard], y[shard], steps=STEPS - 1)
    found = state(model)
    found["graphs_after_one_step"] = torch.tensor(graphs_after_one_step)
    found["graphs"] = torch.tensor(counters["stats"]["unique_graphs"])
    found["graph_breaks"] = torch.tensor(sum(counters["graph_break"].values()))
    return found


def scenario(name: str, rank: int) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        # broadcast_buffers is deprecated in torch 2.14 but still what most code passes.
        warnings.simplefilter("ignore", FutureWarning)
        if name == "default":
            return run(rank, True, lambda m: DistributedDataParallel(m))
        if name == "broadcast_buffers_false":
            return run(rank, False, lambda m: DistributedDataParallel(m, broadcast_buffers=False))
        if name == "broadcast_buffers_false_seed_per_rank":
            return run(rank, True, lambda m: DistributedDataParallel(m, broadcast_buffers=False))
        if name == "forward_sync_buffers_false":
            return run(rank, True, lambda m: DistributedDataParallel(m, forward_sync_buffers=False))
        if name == "exported_midway":
            return exported_midway(rank)
        if name == "patch_after_wrap":
            return patch_after_wrap(rank)
        if name.startswith("compiled_"):
            backend = name.removeprefix("compiled_").removesuffix("_inner")
            return compiled(rank, backend, inner=name.endswith("_inner"))
    raise ValueError(f"unknown scenario {name!r}")


def main() -> None:
    rank, world_size, port = (int(a) for a in sys.argv[1:4])
    out, names = sys.argv[4], sys.argv[5:]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.save({name: scenario(name, rank) for name in names}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
