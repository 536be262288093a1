"""What a Lipschitz bound buys: certified robustness radii of a spectrally normalized classifier.

A small 1-D convolutional classifier on synthetic signals (3 classes: noisy sinusoids of
different frequencies), trained twice from the same initial weights: plain, and with
``snpatch.apply_spectral_norm(model, method="operator")`` (each conv divided by its true
operator norm on the input size it sees, each Linear by its top singular value). ReLU and
Flatten are 1-Lipschitz, so the product of the layers' certified bounds
(``snpatch.lipschitz_bound``) bounds the network's l2 Lipschitz constant L, and a test point
whose logit margin is m cannot change class under any input perturbation of l2 norm below
m / (sqrt(2) * L).

    python examples/lipschitz_classifier.py           # docs/lipschitz.md: its figures (a minute)
    python examples/lipschitz_classifier.py --quick   # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn

import snpatch

LENGTH = 32
FREQUENCIES = (2.0, 3.0, 5.0)


def data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    labels = torch.randint(len(FREQUENCIES), (n,), generator=generator)
    t = torch.arange(LENGTH) / LENGTH
    freq = torch.tensor(FREQUENCIES)[labels].unsqueeze(1)
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    clean = torch.sin(2 * math.pi * freq * t + phase)
    noisy = clean + 0.3 * torch.randn(n, LENGTH, generator=generator)
    return noisy.unsqueeze(1), labels


def model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(16, 16, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16, len(FREQUENCIES)),
    )


def lipschitz_upper_bound(net: nn.Sequential, x: Tensor) -> float:
    """Product of certified per-layer bounds on the input sizes the layers receive."""
    bound = 1.0
    for layer in net:
        if isinstance(layer, (nn.Conv1d, nn.Linear)):
            bound *= snpatch.lipschitz_bound(layer, tuple(x.shape[1:]))
        x = layer(x)
    return bound


def train(net: nn.Module, x: Tensor, y: Tensor, epochs: int, temperature: float) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            # The temperature scales the loss's logits only: the model (and its bound) is
            # unchanged, and a 1-Lipschitz network needs it to reach confident margins.
            loss = nn.functional.cross_entropy(net(x[batch]) * temperature, y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net(x[:64])  # refresh the estimate for the last weights


def evaluate(net: nn.Sequential, x: Tensor, y: Tensor) -> dict[str, float]:
    net.eval()
    with torch.no_grad():
        logits = net(x)
        lipschitz = lipschitz_upper_bound(net, x[:1])
    top2 = logits.topk(2, dim=1)
    correct = top2.indices[:, 0] == y
    margin = top2.values[:, 0] - top2.values[:, 1]
    radius = torch.where(correct, margin / (math.sqrt(2) * lipschitz), torch.zeros_like(margin))
    return {
        "accuracy": float(correct.float().mean()),
        "lipschitz": lipschitz,
        "median_radius": float(radius.median()),
        "certified@0.1": float((radius > 0.1).float().mean()),
        "certified@0.5": float((radius > 0.5).float().mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, 2 epochs")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=16.0)
    args = parser.parse_args(argv)
    n_train, epochs = (256, 2) if args.quick else (2048, args.epochs)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = data(n_train, generator)
    x_test, y_test = data(512, generator)

    plain = model()
    patched = model()
    patched.load_state_dict(plain.state_dict())  # same initial weights
    snpatch.apply_spectral_norm(patched, method="operator", example_inputs=(x_train[:1],))

    torch.manual_seed(1)
    train(plain, x_train, y_train, epochs, args.temperature)
    torch.manual_seed(1)
    train(patched, x_train, y_train, epochs, args.temperature)

    print(f"{n_train} training signals, {epochs} epochs, loss temperature {args.temperature:g}")
    print(
        "| model | test accuracy | Lipschitz upper bound L | median certified radius |"
        " certified at 0.1 | certified at 0.5 |"
    )
    print("|---|---|---|---|---|---|")
    for name, net in (("plain", plain), ("snpatch operator SN", patched)):
        r = evaluate(net, x_test, y_test)
        print(
            f"| {name} | {100 * r['accuracy']:.1f}% | {r['lipschitz']:.3g} | "
            f"{r['median_radius']:.3g} | {100 * r['certified@0.1']:.1f}% | "
            f"{100 * r['certified@0.5']:.1f}% |"
        )


if __name__ == "__main__":
    main()
