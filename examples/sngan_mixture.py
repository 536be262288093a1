"""SN-GAN on a 2-D mixture of Gaussians: does spectral normalization stabilize the discriminator?

The standard mode-collapse test (8 Gaussians on a ring, 25 on a 5x5 grid). The same generator
and discriminator MLPs, the same seeds and optimizer settings are trained with and without
``snpatch.apply_spectral_norm(discriminator)``, in a standard setting and in an aggressive one
(higher learning rate, several discriminator steps per generator step). Then the Lipschitz
target (0.5, 1, 2) and soft vs hard mode are compared, to see how much the one
hyper-parameter needs tuning.

    python examples/sngan_mixture.py            # the README's figures (a few minutes, 2 cores)
    python examples/sngan_mixture.py --quick    # seconds; what the test suite runs
    python examples/sngan_mixture.py --plot samples.png   # needs matplotlib (extra "examples")

Metrics, on 2500 generated samples:
- modes: modes with at least 20% of their fair share of high-quality samples;
- quality: share of samples within 3 standard deviations of the nearest mode;
- D grad: median norm of the discriminator's gradient over the second half of training;
- loss std: standard deviation of the discriminator loss over the second half.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import snpatch

LATENT = 2
HIDDEN = 128


@dataclass(frozen=True)
class Mixture:
    name: str
    centers: Tensor
    std: float

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        index = torch.randint(len(self.centers), (n,), generator=generator)
        return self.centers[index] + self.std * torch.randn(n, 2, generator=generator)


def ring() -> Mixture:
    angles = torch.arange(8) * (2 * math.pi / 8)
    return Mixture("ring", 2.0 * torch.stack([angles.cos(), angles.sin()], 1), 0.02)


def grid() -> Mixture:
    axis = torch.arange(-2, 3, dtype=torch.float32) * 2.0
    centers = torch.cartesian_prod(axis, axis)
    return Mixture("grid", centers, 0.05)


@dataclass(frozen=True)
class Setting:
    name: str
    lr: float
    d_steps: int


STANDARD = Setting("standard (lr 2e-4, 1 D step)", 2e-4, 1)
AGGRESSIVE = Setting("aggressive (lr 1e-3, 3 D steps)", 1e-3, 3)


@dataclass(frozen=True)
class Normalization:
    name: str
    apply: Callable[[nn.Module], object] | None


NONE = Normalization("none", None)
SN = Normalization("snpatch SN", lambda d: snpatch.apply_spectral_norm(d))


def _sn(lipschitz: float, mode: str) -> Normalization:
    return Normalization(
        f"SN {mode} c={lipschitz:g}",
        lambda d: snpatch.apply_spectral_norm(d, lipschitz=lipschitz, mode=mode),  # type: ignore[arg-type]
    )


def mlp(inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, outputs),
    )


@dataclass
class Result:
    modes: int
    total_modes: int
    quality: float
    grad_norm: float
    loss_std: float
    samples: Tensor


def train(
    data: Mixture, setting: Setting, norm: Normalization, seed: int, steps: int, batch: int
) -> Result:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    g, d = mlp(LATENT, 2), mlp(2, 1)
    if norm.apply is not None:
        norm.apply(d)  # the one line: every Linear of the discriminator
    opt_g = torch.optim.Adam(g.parameters(), lr=setting.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=setting.lr, betas=(0.5, 0.999))
    bce = nn.functional.binary_cross_entropy_with_logits
    ones, zeros = torch.ones(batch, 1), torch.zeros(batch, 1)
    d_losses: list[float] = []
    grad_norms: list[float] = []
    for step in range(steps):
        for _ in range(setting.d_steps):
            real = data.sample(batch, generator)
            with torch.no_grad():
                fake = g(torch.randn(batch, LATENT, generator=generator))
            loss_d = bce(d(real), ones) + bce(d(fake), zeros)
            opt_d.zero_grad()
            loss_d.backward()
            if step >= steps // 2:
                grads = [p.grad.norm() for p in d.parameters() if p.grad is not None]
                grad_norms.append(torch.stack(grads).norm().item())
                d_losses.append(loss_d.item())
            opt_d.step()
        fake = g(torch.randn(batch, LATENT, generator=generator))
        loss_g = bce(d(fake), ones)  # non-saturating generator loss
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    with torch.no_grad():
        samples = g(torch.randn(2500, LATENT, generator=generator))
    modes, quality = coverage(data, samples)
    finite = [x for x in grad_norms if math.isfinite(x)]
    return Result(
        modes=modes,
        total_modes=len(data.centers),
        quality=quality,
        grad_norm=statistics.median(finite) if finite else math.inf,
        loss_std=statistics.pstdev(d_losses) if len(d_losses) > 1 else 0.0,
        samples=samples,
    )


def coverage(data: Mixture, samples: Tensor) -> tuple[int, float]:
    """(modes covered, share of high-quality samples)."""
    if not bool(torch.isfinite(samples).all()):
        return 0, 0.0
    distance, nearest = torch.cdist(samples, data.centers).min(1)
    good = distance <= 3 * data.std
    counts = torch.bincount(nearest[good], minlength=len(data.centers))
    fair = len(samples) / len(data.centers)
    return int((counts >= 0.2 * fair).sum()), float(good.float().mean())


def summarize(results: list[Result]) -> str:
    modes = statistics.mean(r.modes for r in results)
    quality = statistics.mean(r.quality for r in results)
    grad = statistics.median(r.grad_norm for r in results)
    loss_std = statistics.median(r.loss_std for r in results)
    total = results[0].total_modes
    return f"| {modes:.1f}/{total} | {100 * quality:.0f}% | {grad:.3g} | {loss_std:.3g} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed (seconds)")
    parser.add_argument("--steps", type=int, default=600, help="generator steps per run")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per configuration")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--plot", metavar="PNG", help="save samples side by side (matplotlib)")
    args = parser.parse_args(argv)
    steps, seeds = (20, 1) if args.quick else (args.steps, args.seeds)
    batch = 64 if args.quick else args.batch
    start = time.perf_counter()
    print(f"{steps} generator steps, batch {batch}, seeds 0..{seeds - 1}")
    print("| data | setting | discriminator | modes | quality | D grad | loss std |")
    print("|---|---|---|---|---|---|---|")
    panels: list[tuple[str, Tensor, Mixture]] = []
    for data in (ring(), grid()):
        for setting in (STANDARD, AGGRESSIVE):
            for norm in (NONE, SN):
                results = [train(data, setting, norm, s, steps, batch) for s in range(seeds)]
                print(f"| {data.name} | {setting.name} | {norm.name} {summarize(results)}")
                if setting is AGGRESSIVE:
                    panels.append((f"{data.name}, {norm.name}", results[0].samples, data))
    print()
    print("Lipschitz target and mode (grid, aggressive setting):")
    print("| discriminator | modes | quality | D grad | loss std |")
    print("|---|---|---|---|---|")
    for norm in (_sn(0.5, "hard"), _sn(1.0, "hard"), _sn(2.0, "hard"), _sn(1.0, "soft")):
        results = [train(grid(), AGGRESSIVE, norm, s, steps, batch) for s in range(seeds)]
        print(f"| {norm.name} {summarize(results)}")
    print(f"\ntook {time.perf_counter() - start:.0f} s")
    if args.plot:
        plot(panels, args.plot)


def plot(panels: list[tuple[str, Tensor, Mixture]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, samples, data) in zip(axes, panels, strict=True):
        points = samples[torch.isfinite(samples).all(1)].clamp(-6, 6)
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
        ax.scatter(data.centers[:, 0], data.centers[:, 1], s=12, c="red", marker="x")
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
    fig.suptitle("Aggressive setting (lr 1e-3, 3 D steps), seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
