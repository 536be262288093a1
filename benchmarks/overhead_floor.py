"""Lower bounds on snpatch's overhead that its design cannot go below, measured in one process.

python benchmarks/overhead_floor.py [--steps N]

Training step (resnet18, batch 16, 64x64, SGD), interleaved, medians:
  unpatched; torch's ``parametrizations.spectral_norm``; snpatch; snpatch with
  ``n_power_iterations=0`` (no power iteration at all: only ``u^T W v`` per step, then the
  normalization and its backward). The last is a floor for any snpatch setting.
Eval forward (resnet18, batch 1, 32x32, ``torch.no_grad()``), interleaved, medians:
  unpatched; unpatched plus a no-op forward pre-hook on each layer snpatch patches; the same
  plus a ``weight`` property that returns a stored tensor (the cheapest a
  parametrized layer with a pre-hook can be); snpatch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils import parametrizations

import snpatch


def _interleaved(runs: dict[str, Callable[[], None]], steps: int) -> dict[str, float]:
    """Median milliseconds of each run, one run after another in a rotating order."""
    for run in runs.values():
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for _ in range(steps):
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
        order.append(order.pop(0))
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def _training_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    return step


def _eval_forward(model: nn.Module, x: Tensor) -> Callable[[], None]:
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    return forward


def _with_stored_weight(layer: nn.Module, weight: Tensor) -> None:
    """Give ``layer`` a class whose ``weight`` property returns ``weight``."""
    layer._stored = weight
    base = type(layer)
    layer.__class__ = type(base.__name__, (base,), {"weight": property(lambda self: self._stored)})
    del layer._parameters["weight"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None)
    names = snpatch.select_layers(base)

    torch_sn = copy.deepcopy(base)
    for name in names:
        parametrizations.spectral_norm(torch_sn.get_submodule(name))
    x = torch.randn(16, 3, 64, 64)
    train = _interleaved(
        {
            "unpatched": _training_step(copy.deepcopy(base), x),
            "torch": _training_step(torch_sn, x),
            "snpatch": _training_step(snpatch.apply_spectral_norm(copy.deepcopy(base)), x),
            "snpatch, no iteration": _training_step(
                snpatch.apply_spectral_norm(copy.deepcopy(base), n_power_iterations=0), x
            ),
        },
        args.steps,
    )
    print("train step ms, resnet18 16 x 64x64:")
    for name, ms in train.items():
        print(f"  {name:32s} {ms:8.2f}  ({ms / train['torch']:.3f}x torch)")

    hooked, stored = copy.deepcopy(base), copy.deepcopy(base)
    for name in names:
        hooked.get_submodule(name).register_forward_pre_hook(lambda module, args: None)
        layer = stored.get_submodule(name)
        layer.register_forward_pre_hook(lambda module, args: None)
        _with_stored_weight(layer, layer.weight.detach().clone())
    x = torch.randn(1, 3, 32, 32)
    evals = _interleaved(
        {
            "unpatched": _eval_forward(copy.deepcopy(base), x),
            "no-op pre-hooks": _eval_forward(hooked, x),
            "no-op pre-hooks + stored weight": _eval_forward(stored, x),
            "snpatch": _eval_forward(snpatch.apply_spectral_norm(copy.deepcopy(base)), x),
        },
        args.steps * 10,
    )
    print("eval forward ms, resnet18 1 x 32x32:")
    for name, ms in evals.items():
        print(f"  {name:32s} {ms:8.3f}  ({ms / evals['unpatched']:.3f}x unpatched)")


if __name__ == "__main__":
    main()
