"""One rank of the DDP and FSDP2 tests (started by tests/test_distributed.py).

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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import snpatch

STEPS = 3
LR = 0.5
ADAM_LR = 0.01
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


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = STEPS,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """SGD (unless ``optimizer`` is given) on the mean squared error; DDP and FSDP average
    the ranks' gradients, which for equal shards is the gradient of the full-batch mean."""
    if optimizer is None:
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=LR)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        (model(x) - y).square().mean().backward()
        optimizer.step()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain copy; a DTensor shard is gathered (a collective: every rank calls it)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (full tensors) and every buffer (``_u``, ``_v``, ``_block``,
    ``_sigma``) by name."""
    found = {f"param:{k}": _full(v) for k, v in model.named_parameters()}
    found.update({f"buffer:{k}": _full(v) for k, v in model.named_buffers()})
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


def shard(model: nn.Sequential, **options: object) -> nn.Sequential:
    """``fully_shard`` each layer with a weight, then the root (FSDP2's usual recipe)."""
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            fully_shard(layer, **options)  # type: ignore[call-overload]
    fully_shard(model, **options)  # type: ignore[call-overload]
    return model


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=ADAM_LR)


def patch(model: nn.Module, method: str) -> nn.Module:
    """``apply_spectral_norm`` (``method="operator"``: with the batch's input size)."""
    example = (make_batch()[0][:1],) if method == "operator" else None
    return snpatch.apply_spectral_norm(model, method=method, example_inputs=example)  # type: ignore[arg-type]


def catch_up(model: nn.Module, x: torch.Tensor) -> None:
    """One training forward without a step: the iteration advances on the final weights
    (the estimate of the last step's forward is that of the weights before the step)."""
    model.train()
    with torch.no_grad():
        model(x)


def fsdp(
    rank: int, method: str, bf16: bool = False, shard_in_eval: bool = False
) -> dict[str, torch.Tensor]:
    """Patch, ``fully_shard``, train with Adam on this rank's shard. Midway, ``exported()``
    must be refused and change nothing. At the end (after :func:`catch_up`): the state, the
    ``plain_state_dict`` (gathered) and, with ``bf16``, the bfloat16 weights the last
    iteration step ran on. With ``shard_in_eval``, ``fully_shard`` runs in eval mode, where
    snpatch's pre-hooks are parked: training must put them back after fully_shard's."""
    # fully_shard broadcasts nothing: every rank must start from the same weights.
    torch.manual_seed(MODEL_SEED)
    model = patch(make_model(), method)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    model.train(not shard_in_eval)
    shard(model, mp_policy=policy)
    optimizer = adam(model)
    x, y = make_batch()
    part = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    train(model, x[part], y[part], steps=1, optimizer=optimizer)
    found = {}
    try:
        with snpatch.exported(model):
            pass
    except snpatch.SnpatchError as error:
        found["error:exported"] = _message(error)
    found["patched_after_refusal"] = torch.tensor(len(snpatch.patched_layers(model)))
    train(model, x[part], y[part], steps=STEPS - 1, optimizer=optimizer)
    catch_up(model, x[part])
    found.update(state(model))
    found.update({f"plain:{k}": _full(v) for k, v in snpatch.plain_state_dict(model).items()})
    if bf16:
        for name, layer in snpatch.patched_layers(model).items():
            original = layer.parametrizations.weight.original
            found[f"bf16:{name}"] = _full(original).to(torch.bfloat16)
    return found


def fsdp_patch_after_shard(rank: int) -> dict[str, torch.Tensor]:
    """``fully_shard`` an unpatched model, then patch it: refused, with the model unchanged
    (also for the root-only sharded model after a ``no_grad`` forward, whose parameters
    are then FSDP's full tensors rather than DTensors); the model still trains."""
    torch.manual_seed(MODEL_SEED)
    model = shard(make_model())
    root_only = fully_shard(make_model())
    x, y = make_batch()
    with torch.no_grad():
        root_only(x)
    found = {
        "root_only_params_are_dtensors": torch.tensor(
            all(isinstance(p, DTensor) for p in root_only.parameters())
        )
    }
    for key, target in (
        ("error:model", model),
        ("error:layer", model[3]),
        ("error:root_only_after_forward", root_only),
    ):
        try:
            snpatch.apply_spectral_norm(target)
        except snpatch.SnpatchError as error:
            found[key] = _message(error)
    found["patched"] = torch.tensor(snpatch.is_patched(model) or snpatch.is_patched(root_only))
    found["is_fsdp_module"] = torch.tensor(isinstance(model[3], FSDPModule))
    part = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    train(model, x[part], y[part], optimizer=adam(model))
    found.update(state(model))
    return found


def make_wide_model() -> nn.Sequential:
    """Layers wider than the tracked block (8 vectors), whose state a load must re-fit."""
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 3)
    )


def fsdp_checkpoint(rank: int, directory: Path) -> dict[str, torch.Tensor]:
    """Train a sharded patched model, save it with torch.distributed.checkpoint, load it
    into another one (other seed: other weights and vectors) with torch's recipe
    (``get_model_state_dict``, ``dcp.load``, ``set_model_state_dict``), compare."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    x, y = torch.randn(BATCH, 16, generator=generator), torch.randn(BATCH, 3, generator=generator)
    torch.manual_seed(MODEL_SEED)
    model = shard(patch(make_wide_model(), "matrix"))
    part = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    train(model, x[part], y[part], optimizer=adam(model))
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=directory)
    torch.manual_seed(MODEL_SEED + 1)
    loaded = shard(patch(make_wide_model(), "matrix"))
    # Eval forwards from here: they change no state.
    model.eval()
    loaded.eval()
    with torch.no_grad():
        found = {"outputs_differ_before": torch.tensor(not torch.equal(model(x), loaded(x)))}
    state_dict = {"model": get_model_state_dict(loaded)}
    dcp.load(state_dict, checkpoint_id=directory)
    set_model_state_dict(loaded, state_dict["model"])
    with torch.no_grad():
        found["saved:out"] = model(x)
        found["loaded:out"] = loaded(x)
    for prefix, module in (("saved", model), ("loaded", loaded)):
        found.update({f"{prefix}:{k}": _full(v) for k, v in module.state_dict().items()})
    # The tracked block is re-fitted to the loaded weights: a training forward now gives
    # the estimate of a converged iteration.
    loaded.train()
    with torch.no_grad():
        loaded(x)
    for name, layer in snpatch.patched_layers(loaded).items():
        found[f"loaded_sigma:{name}"] = layer.parametrizations.weight[0]._sigma.clone()
        found[f"loaded_weight:{name}"] = _full(layer.parametrizations.weight.original)
    # update_sigma on the sharded model, after an edit of the shards in place (x3).
    first = loaded[0].parametrizations.weight
    with torch.no_grad():
        first.original.mul_(3.0)
    for key, steps in (("update_sigma_steps_1", 1), ("update_sigma_exact", None)):
        snpatch.update_sigma(loaded, steps=steps)
        found[key] = first[0]._sigma.clone()
    found["update_sigma_weight"] = _full(first.original)
    return found


def scenario(name: str, rank: int, directory: Path) -> dict[str, torch.Tensor]:
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
        if name == "fsdp":
            return fsdp(rank, "matrix")
        if name == "fsdp_operator":
            return fsdp(rank, "operator")
        if name == "fsdp_sharded_in_eval":
            return fsdp(rank, "matrix", shard_in_eval=True)
        if name == "fsdp_bf16":
            return fsdp(rank, "matrix", bf16=True)
        if name == "fsdp_patch_after_shard":
            return fsdp_patch_after_shard(rank)
        if name == "fsdp_checkpoint":
            return fsdp_checkpoint(rank, directory / "dcp")
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
        directory = Path(out).parent
        torch.save({name: scenario(name, rank, directory) for name in names}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
