"""The true operator norms of spectrally normalized convolutions: torch's vs snpatch's.

A randomly initialized torchvision resnet18 (seed 0) at 3x32x32. Each conv is normalized to
1 by ``torch.nn.utils.parametrizations.spectral_norm`` (the kernel reshaped to a matrix) or
by ``snpatch.apply_spectral_norm(method="operator")`` after one training forward; then each
conv's l2 operator norm on the input size it receives is computed independently of either
(``snpatch.operator.operator_norm``: a dense SVD for small layers, Lanczos otherwise, in
float64), next to snpatch's certified bound. Also: a constant 5x5 kernel, and the time of a
training step (batch 8) with method="matrix", "operator" and operator + certified.

    python benchmarks/operator_norms.py [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrizations

import snpatch
from snpatch.operator import ConvSpec, operator_norm

SHAPE = (3, 32, 32)


def _sizes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    sizes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> object:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sizes.setdefault(name, tuple(args[0].shape[2:]))

        return hook

    handles = [
        module.register_forward_pre_hook(record(name))  # type: ignore[arg-type]
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    with torch.no_grad():
        model.eval()(torch.randn(1, *SHAPE))
    for handle in handles:
        handle.remove()
    return sizes


def _norms(model: nn.Module, sizes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    out = {}
    for name, size in sizes.items():
        layer = model.get_submodule(name)
        out[name] = operator_norm(ConvSpec.of(layer), layer.weight.detach(), size)
    return out


def _step_time(method: str, certified: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    if method != "none":
        snpatch.apply_spectral_norm(
            model,
            method=method,  # type: ignore[arg-type]
            certified=certified,
            example_inputs=(torch.randn(1, *SHAPE),),
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, resnet18 at 3x32x32")

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10)
    sizes = _sizes(reference)
    torch_model = torchvision.models.resnet18(num_classes=10)
    torch_model.load_state_dict(reference.state_dict())
    for module in torch_model.modules():
        if isinstance(module, nn.Conv2d):
            parametrizations.spectral_norm(module)
    torch_model.train()(torch.randn(8, *SHAPE))  # one training forward: one power step
    torch_model.eval()
    ours = torchvision.models.resnet18(num_classes=10)
    ours.load_state_dict(reference.state_dict())
    snpatch.apply_spectral_norm(ours, layer_types=[nn.Conv2d], method="operator")
    ours.train()(torch.randn(8, *SHAPE))
    ours.eval()
    torch_norms = _norms(torch_model, sizes)
    our_norms = _norms(ours, sizes)
    bounds = snpatch.lipschitz_bounds(ours)
    print("| layer | input | torch spectral_norm | snpatch operator | snpatch certified bound |")
    print("|---|---|---|---|---|")
    for name, size in sizes.items():
        print(
            f"| {name} | {'x'.join(map(str, size))} | {torch_norms[name]:.3f} | "
            f"{our_norms[name]:.4f} | {bounds[name]:.4f} |"
        )
    print(
        f"torch: {min(torch_norms.values()):.2f} to {max(torch_norms.values()):.2f}; "
        f"snpatch: {min(our_norms.values()):.5f} to {max(our_norms.values()):.5f}"
    )

    constant = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        constant.weight.fill_(1.0)
    parametrizations.spectral_norm(constant)
    constant.eval()
    value = operator_norm(ConvSpec.of(constant), constant.weight.detach(), (32, 32))
    print(f"constant 5x5 kernel, torch spectral_norm, 32x32: operator norm {value:.3f}")

    for method, certified in (
        ("none", False),
        ("matrix", False),
        ("operator", False),
        ("operator", True),
    ):
        label = method + (" + certified" if certified else "")
        milliseconds = _step_time(method, certified, args.steps) * 1e3
        print(f"training step (batch 8), {label}: {milliseconds:.0f} ms")


if __name__ == "__main__":
    main()
