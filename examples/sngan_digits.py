"""SN-GAN on scikit-learn's handwritten digits: the paper's hyper-parameter robustness, measured.

Miyato et al. (ICLR 2018) claim that spectral normalization keeps a GAN's quality across Adam
settings where other methods, WGAN-GP among them, fail at high learning rates and momentum
(their Table 1, settings A to F; Figures 1 and 2). This script repeats that grid on the 1797
8x8 digits that ship inside scikit-learn (no download), scaled to [-1, 1], with the same
DCGAN-style generator and discriminator for every variant, the same seeds and the same data
order. The discriminator variants:
- none: no normalization (standard non-saturating GAN loss);
- torch SN: ``torch.nn.utils.parametrizations.spectral_norm`` on every conv and linear layer;
- snpatch: ``snpatch.apply_spectral_norm(discriminator)`` (the one line);
- WGAN-GP: the WGAN loss with a gradient penalty of 10 and no normalization.
On one aggressive setting (E by default) snpatch also runs with Lipschitz targets 0.5 and 2,
``mode="soft"`` and ``method="operator"`` (the convolutions' true l2 norm). All use the
paper's batch of 64 and a constant learning rate.

The metrics use no downloaded network: a small digits classifier is trained on the real
training split (its held-out accuracy is printed) and, on generated images,
- FID-digits: the Frechet distance between the classifier's penultimate-layer features of the
  generated and the held-out real images (torchmetrics' ``FrechetInceptionDistance`` with the
  classifier as its feature extractor, statistics in float64);
- score: exp(E KL(p(y|x) || p(y))), the Inception score's analogue (10 is the ceiling);
- digits: how many of the 10 digits hold at least 20% of a fair share of the confident samples
  (classifier probability >= 0.9), and the largest digit's share of them (mode collapse).
The floor is the held-out images scored against the training images, the ceiling an
untrained generator.

    python examples/sngan_digits.py --plot docs/   # the figures in docs/gan.md (2 processes)
    python examples/sngan_digits.py --quick        # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import snpatch

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

LATENT = 32
CONFIDENT = 0.9  # a generated digit counts towards coverage when the classifier is this sure
FAIR_SHARE = 0.2  # a digit is covered with at least 20% of its fair share of confident samples
CURVE_POINTS = 10  # FID-digits evaluations during training (the plot's points)
GP_WEIGHT = 10.0  # WGAN-GP's lambda, as in Gulrajani et al. and the SN-GAN paper


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Digits:
    train: Tensor  # (n, 1, 8, 8) in [-1, 1]
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor


def load_digits() -> Digits:
    """The 1797 digits of ``sklearn.datasets.load_digits``, 75% / 25% split by class."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.25, stratify=labels.numpy(), random_state=0
    )
    train_index, test_index = torch.as_tensor(train), torch.as_tensor(test)
    return Digits(images[train_index], labels[train_index], images[test_index], labels[test_index])


# --------------------------------------------------------------------------- the judge


class Classifier(nn.Module):
    """A small digits CNN; its penultimate layer is the feature space of FID-digits."""

    num_features = 64  # read by torchmetrics' FrechetInceptionDistance

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(256, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Features(nn.Module):
    """The classifier's penultimate layer, as torchmetrics' feature extractor."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.body(x)


def train_classifier(data: Digits, epochs: int) -> tuple[Classifier, float]:
    """(classifier, held-out accuracy): Adam, batch 64, one-pixel random shifts."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-3, total_steps=epochs * math.ceil(len(data.train) / 64)
    )
    for _ in range(epochs):
        order = torch.randperm(len(data.train), generator=generator)
        for index in order.split(64):
            images = data.train[index]
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            images = torch.roll(images, shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(images), data.train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = float((model(data.test).argmax(1) == data.test_labels).float().mean())
    return model, accuracy


def classifier_score(probs: Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))): 1 for a single class, 10 for confident, balanced digits."""
    probs = probs.double()
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (probs.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(1)
    return math.exp(float(kl.mean()))


def coverage(probs: Tensor) -> tuple[int, float]:
    """(digits covered among confident samples, largest digit's share of them)."""
    confidence, label = probs.max(1)
    label = label[confidence >= CONFIDENT]
    if len(label) == 0:
        return 0, 1.0
    counts = torch.bincount(label, minlength=probs.shape[1])
    covered = int((counts >= FAIR_SHARE * len(label) / probs.shape[1]).sum())
    return covered, float(counts.max()) / len(label)


@dataclass
class Judge:
    """Scores a set of images: FID-digits against the held-out images, score, coverage."""

    classifier: Classifier
    test: Tensor
    fid: FrechetInceptionDistance = field(init=False)

    def __post_init__(self) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        # The held-out statistics are computed once and kept through reset().
        self.fid = FrechetInceptionDistance(
            feature=Features(self.classifier), reset_real_features=False
        )
        self.fid.update(self.test, real=True)

    def fid_digits(self, images: Tensor) -> float:
        if not bool(torch.isfinite(images).all()):
            return math.nan
        self.fid.reset()
        self.fid.update(images, real=False)
        return float(self.fid.compute())

    def scores(self, images: Tensor) -> tuple[float, float, int, float]:
        """(FID-digits, classifier score, digits covered, largest share)."""
        if not bool(torch.isfinite(images).all()):
            return math.nan, math.nan, 0, math.nan
        with torch.no_grad():
            probs = self.classifier(images).softmax(1)
        return (self.fid_digits(images), classifier_score(probs), *coverage(probs))


# --------------------------------------------------------------------------- the GAN


def generator(width: int) -> nn.Module:
    """z -> 2x2 -> 4x4 -> 8x8: transposed convs, BatchNorm and ReLU, tanh (DCGAN's G at 8x8)."""
    return nn.Sequential(
        nn.Linear(LATENT, 8 * width * 2 * 2),
        nn.Unflatten(1, (8 * width, 2, 2)),
        nn.BatchNorm2d(8 * width),
        nn.ReLU(),
        nn.ConvTranspose2d(8 * width, 4 * width, 4, stride=2, padding=1),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(),
        nn.ConvTranspose2d(4 * width, 1, 4, stride=2, padding=1),
        nn.Tanh(),
    )


def discriminator(width: int) -> nn.Module:
    """8x8 -> 4x4 -> 2x2: strided convs, LeakyReLU(0.1), no BatchNorm (DCGAN's D at 8x8)."""
    return nn.Sequential(
        nn.Conv2d(1, 2 * width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1),
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(4 * width * 2 * 2, 1),
    )


@dataclass(frozen=True)
class Setting:
    """One row of the paper's Table 1: Adam's learning rate and betas, D steps per G step."""

    name: str
    lr: float
    beta1: float
    beta2: float
    n_dis: int

    def label(self) -> str:
        return f"{self.name} ({self.lr:g}, {self.beta1:g}, {self.beta2:g}, {self.n_dis})"


SETTINGS = (
    Setting("A", 1e-4, 0.5, 0.9, 5),
    Setting("B", 1e-4, 0.5, 0.999, 1),
    Setting("C", 2e-4, 0.5, 0.999, 1),
    Setting("D", 1e-3, 0.5, 0.9, 5),
    Setting("E", 1e-3, 0.5, 0.999, 5),
    Setting("F", 1e-3, 0.9, 0.999, 5),
)
SETTING = {s.name: s for s in SETTINGS}


def _torch_sn(d: nn.Module) -> None:
    for layer in d.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            nn.utils.parametrizations.spectral_norm(layer)


def _snpatch(**options: object) -> Callable[[nn.Module], None]:
    def apply(d: nn.Module) -> None:
        if options.get("method") == "operator":
            options["example_inputs"] = (torch.zeros(1, 1, 8, 8),)
        snpatch.apply_spectral_norm(d, **options)  # type: ignore[arg-type]

    return apply


@dataclass(frozen=True)
class Variant:
    name: str
    apply: Callable[[nn.Module], None] | None
    gradient_penalty: bool = False


VARIANTS = (
    Variant("none", None),
    Variant("torch SN", _torch_sn),
    Variant("snpatch", _snpatch()),
    Variant("WGAN-GP", None, gradient_penalty=True),
)
SWEEP_VARIANTS = (
    Variant("snpatch c=0.5", _snpatch(lipschitz=0.5)),
    Variant("snpatch c=2", _snpatch(lipschitz=2.0)),
    Variant("snpatch soft", _snpatch(mode="soft")),
    Variant("snpatch operator", _snpatch(method="operator")),
)
CURVES = ("C", "E")  # settings whose FID-digits is recorded during training (the plot)
VARIANT = {v.name: v for v in (*VARIANTS, *SWEEP_VARIANTS)}


@dataclass(frozen=True)
class Job:
    variant: str
    setting: str
    seed: int
    steps: int
    batch: int
    width: int
    loss: str
    eval_samples: int


@dataclass
class Result:
    job: Job
    fid: float
    score: float
    digits: int
    top_share: float
    seconds_per_step: float  # wall time, training only (evaluations excluded)
    cpu_seconds: float  # the process's CPU time for the whole run, evaluations included
    curve: list[tuple[int, float]]  # (generator step, FID-digits)
    samples: Tensor  # the first 36 evaluation samples


class Step:
    """One discriminator update and one generator update for a variant and a loss."""

    def __init__(self, d: nn.Module, variant: Variant, loss: str, gp_random: torch.Generator):
        self.d, self.variant, self.loss, self.gp_random = d, variant, loss, gp_random

    def d_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        n = len(real)
        if self.variant.gradient_penalty:
            eps = torch.rand(n, 1, 1, 1, generator=self.gp_random)
            mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
            # One call on real, fake and interpolates (one power-iteration step per update
            # where there is one; no BatchNorm in D, so the rows do not interact).
            out = self.d(torch.cat([real, fake, mixed]))
            (grad,) = torch.autograd.grad(out[2 * n :].sum(), mixed, create_graph=True)
            penalty = (grad.flatten(1).norm(dim=1) - 1).square().mean()
            return out[n : 2 * n].mean() - out[:n].mean() + GP_WEIGHT * penalty
        out = self.d(torch.cat([real, fake]))
        if self.loss == "hinge":
            return nn.functional.relu(1 - out[:n]).mean() + nn.functional.relu(1 + out[n:]).mean()
        softplus = nn.functional.softplus  # -log sigmoid(x) = softplus(-x)
        return softplus(-out[:n]).mean() + softplus(out[n:]).mean()

    def g_loss(self, fake: Tensor) -> Tensor:
        out = self.d(fake)
        if self.variant.gradient_penalty or self.loss == "hinge":
            return -out.mean()
        return nn.functional.softplus(-out).mean()  # non-saturating


def build(job: Job) -> tuple[nn.Module, nn.Module, Step, torch.Generator]:
    """G, D (normalized as the variant says), the step, and the data's random stream."""
    torch.manual_seed(job.seed)  # the same G and D weights for every variant of a seed
    g, d = generator(job.width), discriminator(job.width)
    variant = VARIANT[job.variant]
    if variant.apply is not None:
        variant.apply(d)
    # Data order and latents come from their own stream, the same for every variant; the
    # interpolation weights of WGAN-GP from another, so they do not shift it.
    data_random = torch.Generator().manual_seed(job.seed)
    step = Step(d, variant, job.loss, torch.Generator().manual_seed(10_000 + job.seed))
    return g, d, step, data_random


def optimizers(job: Job, g: nn.Module, d: nn.Module) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    s = SETTING[job.setting]
    return (
        torch.optim.Adam(g.parameters(), lr=s.lr, betas=(s.beta1, s.beta2)),
        torch.optim.Adam(d.parameters(), lr=s.lr, betas=(s.beta1, s.beta2)),
    )


def d_update(
    job: Job, g: nn.Module, step: Step, opt_d: torch.optim.Optimizer, real: Tensor, z: Tensor
) -> None:
    with torch.no_grad():
        fake = g(z)
    loss = step.d_loss(real, fake)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()


def train(job: Job, judge: Judge, train_images: Tensor) -> Result:
    cpu_start = time.process_time()
    g, d, step, data_random = build(job)
    opt_g, opt_d = optimizers(job, g, d)
    n_dis = SETTING[job.setting].n_dis
    record = job.setting in CURVES
    eval_z = torch.randn(job.eval_samples, LATENT, generator=torch.Generator().manual_seed(99))
    every = max(1, job.steps // CURVE_POINTS)
    curve: list[tuple[int, float]] = []
    training = 0.0

    def sample() -> Tensor:
        # G keeps batch statistics (train mode) for sampling, as during training.
        with torch.no_grad():
            return g(eval_z)

    if record:
        curve.append((0, judge.fid_digits(sample())))
    for index in range(job.steps):
        start = time.perf_counter()
        for _ in range(n_dis):
            batch = torch.randint(len(train_images), (job.batch,), generator=data_random)
            z = torch.randn(job.batch, LATENT, generator=data_random)
            d_update(job, g, step, opt_d, train_images[batch], z)
        z = torch.randn(job.batch, LATENT, generator=data_random)
        loss_g = step.g_loss(g(z))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        training += time.perf_counter() - start
        if record and ((index + 1) % every == 0 or index + 1 == job.steps):
            curve.append((index + 1, judge.fid_digits(sample())))
    images = sample()
    fid, score, digits, top = judge.scores(images)
    cpu = time.process_time() - cpu_start
    return Result(
        job, fid, score, digits, top, training / job.steps, cpu, curve, images[:36].clone()
    )


# --------------------------------------------------------------------------- the grid

_WORKER: dict[str, object] = {}


def _init_worker(state: dict[str, Tensor]) -> None:
    torch.set_num_threads(1)
    data = load_digits()
    classifier = Classifier()
    classifier.load_state_dict(state)
    classifier.eval().requires_grad_(False)
    _WORKER["judge"] = Judge(classifier, data.test)
    _WORKER["train"] = data.train


def _run(job: Job) -> Result:
    return train(job, _WORKER["judge"], _WORKER["train"])  # type: ignore[arg-type]


def run_jobs(jobs: list[Job], classifier: Classifier, workers: int) -> list[Result]:
    from tqdm import tqdm

    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    # The longest jobs first (n_dis 5, WGAN-GP) so that the two workers finish together.
    order = sorted(
        jobs, key=lambda j: -SETTING[j.setting].n_dis * (2 if "WGAN" in j.variant else 1)
    )
    if workers == 1:
        _init_worker(state)
        results = [_run(job) for job in tqdm(order, desc="runs")]
    else:
        # spawn, not fork: a forked process inherits torch's thread pools in a bad state.
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, _init_worker, (state,)) as pool:
            results = list(tqdm(pool.imap_unordered(_run, order), total=len(order), desc="runs"))
    position = {job: i for i, job in enumerate(jobs)}
    return sorted(results, key=lambda r: position[r.job])


def _mean_std(values: Iterable[float], digits: int = 3) -> str:
    values = list(values)
    if any(not math.isfinite(v) for v in values):
        bad = sum(not math.isfinite(v) for v in values)
        return f"diverged ({bad}/{len(values)})"
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.mean(values):.{digits}g} ± {statistics.stdev(values):.{digits - 1}g}"


def summarize(results: list[Result]) -> str:
    fid = _mean_std(r.fid for r in results)
    score = _mean_std(r.score for r in results)
    digits = statistics.mean(r.digits for r in results)
    top = [r.top_share for r in results if math.isfinite(r.top_share)]
    top_text = f"{100 * statistics.mean(top):.0f}%" if top else "-"
    ms = 1000 * statistics.median(r.seconds_per_step for r in results)
    return f"| {fid} | {score} | {digits:.1f}/10 | {top_text} | {ms:.1f} |"


def reference_rows(judge: Judge, data: Digits, eval_samples: int, width: int) -> list[str]:
    """The floor (held-out vs training images) and the ceiling (untrained generators)."""
    rows = []
    fid, score, digits, top = judge.scores(data.train)
    rows.append(
        f"| real training images (floor) | {fid:.3g} | {score:.3g} | {digits}/10 | "
        f"{100 * top:.0f}% |"
    )
    z = torch.randn(eval_samples, LATENT, generator=torch.Generator().manual_seed(99))
    torch.manual_seed(0)
    with torch.no_grad():
        images = generator(width)(z)
    fid, score, digits, top = judge.scores(images)
    rows.append(
        f"| untrained generator, seed 0 (ceiling) | {fid:.3g} | {score:.3g} | "
        f"{digits}/10 | {100 * top:.0f}% |"
    )
    return rows


def time_d_steps(
    variants: Iterable[str],
    setting: str,
    width: int,
    batch: int,
    train_images: Tensor,
    repeats: int,
    steps: int,
) -> dict[str, float]:
    """Median wall time (ms) of one discriminator update per variant, interleaved, one process."""
    states = []
    for name in variants:
        job = Job(name, setting, 0, steps, batch, width, "standard", 0)
        g, d, step, data_random = build(job)
        _, opt_d = optimizers(job, g, d)
        states.append((name, job, g, step, opt_d, data_random))
    times: dict[str, list[float]] = {name: [] for name, *_ in states}
    for round_ in range(repeats + 1):
        for name, job, g, step, opt_d, data_random in states:
            start = time.perf_counter()
            for _ in range(steps):
                index = torch.randint(len(train_images), (batch,), generator=data_random)
                z = torch.randn(batch, LATENT, generator=data_random)
                d_update(job, g, step, opt_d, train_images[index], z)
            if round_ > 0:  # the first round warms up
                times[name].append((time.perf_counter() - start) / steps)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed (seconds)")
    parser.add_argument("--steps", type=int, default=400, help="generator steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell")
    parser.add_argument("--batch", type=int, default=64, help="as in the paper")
    parser.add_argument("--width", type=int, default=8, help="D: 2w, 4w channels; G: 8w, 4w")
    parser.add_argument("--loss", choices=("standard", "hinge"), default="standard")
    parser.add_argument("--workers", type=int, default=2, help="processes (one thread each)")
    parser.add_argument("--sweep", default="E", help="setting of the Lipschitz / mode sweep")
    parser.add_argument("--plot", metavar="DIR", help="write the two PNGs here (matplotlib)")
    args = parser.parse_args(argv)
    quick = args.quick
    steps, seeds = (4, 1) if quick else (args.steps, args.seeds)
    eval_samples = 200 if quick else 0  # 0: as many as the training split
    torch.set_num_threads(1)
    start = time.perf_counter()

    data = load_digits()
    classifier, accuracy = train_classifier(data, epochs=2 if quick else 30)
    judge = Judge(classifier, data.test)
    eval_samples = eval_samples or len(data.train)
    print(f"digits: {len(data.train)} training, {len(data.test)} held-out images (8x8)")
    print(f"digits classifier, held-out accuracy: {100 * accuracy:.1f}%")
    print(
        f"{steps} generator steps, batch {args.batch}, {args.loss} loss, "
        f"seeds 0..{seeds - 1}, {eval_samples} samples per evaluation"
    )
    print()
    print("| reference | FID-digits | score | digits | top digit |")
    print("|---|---|---|---|---|")
    for row in reference_rows(judge, data, eval_samples, args.width):
        print(row)

    def job(variant: str, setting: str, seed: int) -> Job:
        return Job(variant, setting, seed, steps, args.batch, args.width, args.loss, eval_samples)

    grid = [job(v.name, s.name, seed) for s in SETTINGS for v in VARIANTS for seed in range(seeds)]
    sweep = [job(v.name, args.sweep, seed) for v in SWEEP_VARIANTS for seed in range(seeds)]
    results = run_jobs(grid + sweep, classifier, 1 if quick else args.workers)
    cells: dict[tuple[str, str], list[Result]] = {}
    for result in results:
        cells.setdefault((result.job.variant, result.job.setting), []).append(result)

    print()
    print("Settings (lr, beta1, beta2, n_dis): " + ", ".join(s.label() for s in SETTINGS))
    print("| discriminator | setting | FID-digits | score | digits | top digit | ms / G step |")
    print("|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        for s in SETTINGS:
            print(f"| {v.name} | {s.name} {summarize(cells[v.name, s.name])}")
    print()
    print("FID-digits, mean over seeds (lower is better):")
    print("| discriminator | " + " | ".join(s.name for s in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for v in VARIANTS:
        values = []
        for s in SETTINGS:
            fids = [r.fid for r in cells[v.name, s.name]]
            values.append(
                f"{statistics.mean(fids):.3g}" if all(map(math.isfinite, fids)) else "div."
            )
        print(f"| {v.name} | " + " | ".join(values) + " |")
    print()
    print(f"Lipschitz target and mode (setting {args.sweep}):")
    print("| discriminator | FID-digits | score | digits | top digit | ms / G step |")
    print("|---|---|---|---|---|---|")
    for name in ("snpatch c=0.5", "snpatch", "snpatch c=2", "snpatch soft", "snpatch operator"):
        label = "snpatch c=1" if name == "snpatch" else name
        print(f"| {label} {summarize(cells[name, args.sweep])}")
    print()
    timing = time_d_steps(
        [*(v.name for v in VARIANTS), "snpatch operator"],
        "A",
        args.width,
        args.batch,
        data.train,
        repeats=1 if quick else 7,
        steps=3 if quick else 50,
    )
    print(
        f"Wall time per discriminator update (batch {args.batch} real + {args.batch} fake, "
        "one process, interleaved, median):"
    )
    print("| discriminator | ms / D step |")
    print("|---|---|")
    for name, ms in timing.items():
        print(f"| {name} | {ms:.2f} |")
    cpu = sum(r.cpu_seconds for r in results)
    print(
        f"\nthe {len(results)} runs: {cpu:.0f} s of CPU time in the workers "
        f"({args.workers} processes, one thread each)"
    )
    print(f"took {time.perf_counter() - start:.0f} s")
    if args.plot:
        plot(cells, Path(args.plot))


def plot(cells: dict[tuple[str, str], list[Result]], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(
        len(VARIANTS), len(SETTINGS), figsize=(1.6 * len(SETTINGS), 1.75 * len(VARIANTS))
    )
    for row, v in zip(axes, VARIANTS, strict=True):
        for ax, s in zip(row, SETTINGS, strict=True):
            result = cells[v.name, s.name][0]
            tiles = result.samples.nan_to_num(0.0).clamp(-1, 1)
            tiles = torch.nn.functional.pad(tiles, (1, 1, 1, 1), value=0.0)  # grey borders
            count = math.isqrt(len(tiles))
            tiles = tiles[: count * count, 0].reshape(count, count, 10, 10)
            ax.imshow(
                tiles.permute(0, 2, 1, 3).reshape(10 * count, 10 * count),
                cmap="gray_r",
                vmin=-1,
                vmax=1,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if v is VARIANTS[0]:
                ax.set_title(s.label(), fontsize=7)
            ax.set_xlabel(f"FID {result.fid:.3g}", fontsize=7)
        row[0].set_ylabel(v.name, fontsize=8)
    fig.suptitle("Samples of seed 0 (columns: setting (lr, beta1, beta2, n_dis))", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "sngan_digits_samples.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, name in zip(axes, ("C", "E"), strict=True):
        for v in VARIANTS:
            runs = cells[v.name, name]
            steps = [step for step, _ in runs[0].curve]
            curves = torch.tensor([[fid for _, fid in r.curve] for r in runs])
            ax.plot(steps, curves.nanmean(0), label=v.name)
            ax.fill_between(steps, curves.amin(0), curves.amax(0), alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("generator step")
        ax.set_title(f"setting {SETTING[name].label()}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FID-digits (mean, min-max over seeds)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "sngan_digits_fid.png", dpi=110)
    plt.close(fig)
    print(f"saved {folder / 'sngan_digits_samples.png'} and {folder / 'sngan_digits_fid.png'}")


if __name__ == "__main__":
    main()
