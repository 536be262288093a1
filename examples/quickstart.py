"""Quickstart: spectral normalization on a torchvision resnet18 in one line, then train a step.

python examples/quickstart.py
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import snpatch


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)  # built before: keeps working

    print("would patch:", len(snpatch.select_layers(model, exclude="fc")), "layers")
    snpatch.apply_spectral_norm(model, exclude="fc", lipschitz=1.0)

    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for step in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")

    model(x)  # the next training forward refreshes the estimate for the new weights
    worst = 0.0
    for name, layer in snpatch.patched_layers(model).items():
        matrix = layer.weight.detach().flatten(1)
        sigma = float(torch.linalg.matrix_norm(matrix, ord=2))
        worst = max(worst, abs(sigma - 1.0))
        if name.startswith("layer4"):
            print(f"{name:<24} sigma = {sigma:.5f}")
    print(f"worst |sigma - 1| over {len(snpatch.patched_layers(model))} layers: {worst:.2e}")


if __name__ == "__main__":
    main()
