"""SN-GAN on a 2-D mixture of Gaussians: does spectral normalization stabilize the discriminator?

The standard mode-collapse test (8 Gaussians on a ring, 25 on a 5x5 grid). The same generator
and discriminator MLPs (3 hidden layers of 64 ReLUs), the same seeds and optimizer settings
(non-saturating GAN loss, Adam with betas (0, 0.9) as in SN-GAN, learning rate decaying
linearly to 0, batch 256) are trained with and without
``snpatch.apply_spectral_norm(discriminator)``, in a standard setting and in an aggressive one
(a higher learning rate and 3 discriminator steps per generator step). Then the Lipschitz
target (0.5, 1, 2) and soft vs hard mode are compared, to see how much the one
hyper-parameter needs tuning.

    python examples/sngan_mixture.py            # the figures in docs/gan.md (minutes, one thread)
    python examples/sngan_mixture.py --quick    # seconds; what the test suite runs
    python examples/sngan_mixture.py --plot samples.png   # needs matplotlib (extra "examples")

Metrics, on 2500 generated samples (means over seeds for modes and quality, medians for the
others):
- modes: modes with at least 20% of their fair share of samples, counting high-quality ones;
- quality: share of samples within 3 standard deviations of the nearest mode;
- D grad: median norm of the discriminator's gradient over the second half of training;
- loss std: standard deviation of the discriminator loss over the second half
  (both sampled every 10th generator step).
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
HIDDEN = 64
SAMPLE_EVERY = 10  # record D grad norm and loss on every 10th step of the second half
EVAL_SAMPLES = 2500


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
    betas: tuple[float, float]
    d_steps: int


STANDARD = Setting("standard (lr 3e-3, 1 D step)", 3e-3, (0.0, 0.9), 1)
AGGRESSIVE = Setting("aggressive (lr 1e-2, 3 D steps)", 1e-2, (0.0, 0.9), 3)


@dataclass(frozen=True)
class Normalization:
    name: str
    apply: Callable[[nn.Module], object] | None


NONE = Normalization("none", None)
SN = Normalization("snpatch SN", lambda d: snpatch.apply_spectral_norm(d))


# The Lipschitz sweep runs where both variants converge (ring: 8/8 modes with and without SN).
SWEEP = (ring(), STANDARD)


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
    optimizers = [
        torch.optim.Adam(net.parameters(), lr=setting.lr, betas=setting.betas) for net in (g, d)
    ]
    opt_g, opt_d = optimizers
    # The learning rate decays linearly to 0 for both networks: without it, neither variant
    # settled on the modes in a few thousand steps (the samples keep jittering at full lr).
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps) for opt in optimizers
    ]
    softplus = nn.functional.softplus  # BCE with logits: -log sigmoid(x) = softplus(-x)
    d_losses: list[Tensor] = []
    grad_norms: list[Tensor] = []
    for step in range(steps):
        for _ in range(setting.d_steps):
            real = data.sample(batch, generator)
            with torch.no_grad():
                fake = g(torch.randn(batch, LATENT, generator=generator))
            # One discriminator call on real and fake together (half the calls of D(real),
            # D(fake)); snpatch advances the power iteration once per training forward, so
            # this is also one iteration step per discriminator update, as in SN-GAN.
            logits = d(torch.cat([real, fake]))
            loss_d = softplus(-logits[:batch]).mean() + softplus(logits[batch:]).mean()
            opt_d.zero_grad()
            loss_d.backward()
            if step >= steps // 2 and step % SAMPLE_EVERY == 0:  # no .item() in the loop
                grads = [p.grad.norm() for p in d.parameters() if p.grad is not None]
                grad_norms.append(torch.stack(grads).norm())
                d_losses.append(loss_d.detach())
            opt_d.step()
        fake = g(torch.randn(batch, LATENT, generator=generator))
        loss_g = softplus(-d(fake)).mean()  # non-saturating generator loss
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        for schedule in schedules:
            schedule.step()
    with torch.no_grad():
        samples = g(torch.randn(EVAL_SAMPLES, LATENT, generator=generator))
    modes, quality = coverage(data, samples)
    norms = torch.stack(grad_norms)
    finite = norms[torch.isfinite(norms)]
    return Result(
        modes=modes,
        total_modes=len(data.centers),
        quality=quality,
        grad_norm=float(finite.median()) if len(finite) else math.inf,
        loss_std=float(torch.stack(d_losses).std(correction=0)),
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
    parser.add_argument("--steps", type=int, default=1500, help="generator steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--plot", metavar="PNG", help="save samples side by side (matplotlib)")
    args = parser.parse_args(argv)
    steps, seeds = (20, 1) if args.quick else (args.steps, args.seeds)
    batch = 64 if args.quick else args.batch
    start = time.perf_counter()
    print(f"{steps} generator steps, batch {batch}, seeds 0..{seeds - 1}")
    print("| data | setting | discriminator | modes | quality | D grad | loss std |")
    print("|---|---|---|---|---|---|---|")
    runs: dict[tuple[str, str, str], list[Result]] = {}
    for data in (ring(), grid()):
        for setting in (STANDARD, AGGRESSIVE):
            for norm in (NONE, SN):
                results = [train(data, setting, norm, s, steps, batch) for s in range(seeds)]
                runs[data.name, setting.name, norm.name] = results
                print(f"| {data.name} | {setting.name} | {norm.name} {summarize(results)}")
    print()
    data, setting = SWEEP
    print(f"Lipschitz target and mode ({data.name}, {setting.name}):")
    print("| discriminator | modes | quality | D grad | loss std |")
    print("|---|---|---|---|---|")
    for norm in (_sn(0.5, "hard"), _sn(1.0, "hard"), _sn(2.0, "hard"), _sn(1.0, "soft")):
        # hard c=1 is the table's "snpatch SN" run: the same seeds, so the same numbers.
        same = runs.get((data.name, setting.name, SN.name)) if norm.name == "SN hard c=1" else None
        results = same or [train(data, setting, norm, s, steps, batch) for s in range(seeds)]
        print(f"| {norm.name} {summarize(results)}")
    print(f"\ntook {time.perf_counter() - start:.0f} s")
    if args.plot:
        plot(runs, args.plot)


def plot(runs: dict[tuple[str, str, str], list[Result]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = (STANDARD, AGGRESSIVE)
    columns = [(data, norm) for data in (ring(), grid()) for norm in (NONE, SN)]
    fig, axes = plt.subplots(len(settings), len(columns), figsize=(2.8 * len(columns), 6.2))
    for row, setting in zip(axes, settings, strict=True):
        for ax, (data, norm) in zip(row, columns, strict=True):
            result = runs[data.name, setting.name, norm.name][0]
            samples = result.samples
            points = samples[torch.isfinite(samples).all(1)].clamp(-6, 6)
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
            ax.scatter(data.centers[:, 0], data.centers[:, 1], s=12, c="red", marker="x")
            ax.set_xlim(-6, 6)
            ax.set_ylim(-6, 6)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            ax.set_title(
                f"{data.name}, {norm.name}: {result.modes}/{result.total_modes}, "
                f"{100 * result.quality:.0f}%",
                fontsize=8,
            )
        row[0].set_ylabel(setting.name, fontsize=8)
    fig.suptitle("Generated samples, seed 0 (title: modes covered, high-quality share)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
