"""Accuracy of the sigma estimate: snpatch vs torch's parametrizations.spectral_norm.

The foundation's acceptance run: a randomly initialized torchvision model, every conv and
linear layer normalized to 1, trained from scratch with Adam (lr 2e-4, batch 8, 32x32
random data) for 20 steps. Reported: the worst |sigma(W_eff) - 1| over all layers right
after patching, and over all layers and steps (the weights each training forward used;
exact sigma from a float64 eigendecomposition). Also the time to patch a resnet50.

    python benchmarks/accuracy.py [--models resnet18 mobilenet_v3_small] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrizations

import snpatch
from snpatch.parametrization import weight_to_matrix


def exact_sigma(weight: torch.Tensor) -> float:
    matrix = weight_to_matrix(weight.detach().double(), 0)
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())


def run(model_name: str, variant: str, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None, num_classes=10)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if variant == "torch":
        for layer in layers:
            parametrizations.spectral_norm(layer)
    else:
        snpatch.apply_spectral_norm(model, layer_types=[nn.Conv2d, nn.Linear])
    model.eval()
    initial = max(abs(exact_sigma(layer.weight) - 1) for layer in layers)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    worst = 0.0
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        worst = max(worst, *(abs(exact_sigma(layer.weight) - 1) for layer in layers))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return initial, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, Adam lr 2e-4, "
        f"batch 8, 32x32, {args.steps} steps"
    )
    print("| model | implementation | worst rel. error after patching | worst over training |")
    print("|---|---|---|---|")
    for model_name in args.models:
        for variant in ("torch", "snpatch"):
            initial, worst = run(model_name, variant, args.steps)
            label = (
                "torch.nn.utils.parametrizations.spectral_norm" if variant == "torch" else "snpatch"
            )
            print(f"| {model_name} | {label} | {initial:.2g} | {worst:.2g} |", flush=True)
    times = []
    for _ in range(3):
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None)
        start = time.perf_counter()
        snpatch.apply_spectral_norm(model)
        times.append(time.perf_counter() - start)
    print(f"\napply_spectral_norm(resnet50): {sorted(times)[1]:.2f} s (median of 3)")


if __name__ == "__main__":
    main()
