"""``snpatch bench``: the cost of spectral normalization, against torch's own, in one process.

One model is built three ways from the same initial weights: unpatched,
``torch.nn.utils.parametrizations.spectral_norm`` on every weight snpatch selects (same
``dim``), and :func:`snpatch.apply_spectral_norm` (default settings). Training steps
(SGD, loss ``mean(output**2)``) and eval forwards (``torch.no_grad()``) are timed
interleaved, one variant after another in a rotating order, so that a load change on the
machine hits all three alike; medians, min-max spread and ratios of medians are reported.

Also reported: the time to patch, the extra memory per normalized weight, and each
normalized variant's worst relative error ``|sigma(W_eff) / target - 1|`` right after
patching and over the timed steps (for the weights each training forward used; exact
``sigma`` from a float64 eigendecomposition, computed outside the timed regions).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from .errors import InvalidArgumentError
from .parametrization import weight_to_matrix
from .patch import _hook, apply_spectral_norm, layer_targets, parametrization_list, patched_layers
from .select import select_layers

__all__ = ["VARIANTS", "BenchResult", "format_report", "mlp", "run_bench"]

#: The three builds of the model, in the order they are reported.
VARIANTS = ("unpatched", "torch", "snpatch")


def mlp() -> nn.Module:
    """The ``mlp`` builtin: 8 x ``Linear(512, 512)`` with ReLUs (Python overhead dominates)."""
    layers: list[nn.Module] = []
    for i in range(8):
        layers.append(nn.Linear(512, 512))
        if i < 7:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class _Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    # (matrix view of the original weight, module holding _u/_v) per normalized weight.
    weights: list[tuple[Callable[[], Tensor], nn.Module]] = field(default_factory=list)
    train_ms: list[float] = field(default_factory=list)
    eval_ms: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)


@dataclass
class BenchResult:
    """Everything ``snpatch bench`` measured; :meth:`as_dict` is the ``--json`` output."""

    settings: dict[str, Any]
    train_ms: dict[str, dict[str, float]]
    eval_ms: dict[str, dict[str, float]]
    ratios: dict[str, float]
    patch_s: dict[str, float]
    memory: dict[str, float]
    sigma_error: dict[str, dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "train_ms": self.train_ms,
            "eval_ms": self.eval_ms,
            "ratios": self.ratios,
            "patch_s": self.patch_s,
            "memory": self.memory,
            "sigma_error": self.sigma_error,
        }


def example_input(model: nn.Module, batch_size: int, image_size: int) -> Tensor:
    """A random input for ``model``, shaped for its first conv or linear layer."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            spatial = module.weight.dim() - 2
            return torch.randn(batch_size, module.in_channels, *([image_size] * spatial))
        if isinstance(module, nn.Linear):
            return torch.randn(batch_size, module.in_features)
    raise ValueError(f"cannot tell the input shape of {type(model).__name__}: no conv or linear")


def _first_tensor(out: object) -> Tensor:
    """The model's output, or the first tensor of a tuple, list or dict output."""
    if isinstance(out, Tensor):
        return out
    values = list(out.values()) if isinstance(out, dict) else out
    if isinstance(values, (list, tuple)):
        for value in values:
            if isinstance(value, Tensor):
                return value
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor")


def _exact_sigma(matrix: Tensor) -> float:
    matrix = matrix.double()
    gram = matrix @ matrix.mT if matrix.shape[0] <= matrix.shape[1] else matrix.mT @ matrix
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())


def _worst_error(variant: _Variant) -> float:
    """Worst ``|sigma(W) / (u^T W v) - 1|`` over the variant's weights.

    For both implementations ``W / (u^T W v)`` is the weight the last training forward
    used, and the weight an eval forward would use now.
    """
    worst = 0.0
    with torch.no_grad():
        for matrix_of, state in variant.weights:
            matrix = matrix_of().double()
            u, v = state.get_buffer("_u").double(), state.get_buffer("_v").double()
            estimate = float(torch.vdot(u, matrix @ v))
            worst = max(worst, abs(_exact_sigma(matrix) / estimate - 1.0))
    return worst


def _torch_spectral_norm(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, str, int]]:
    found = []
    for name in names:
        layer = model.get_submodule(name) if name else model
        for target in layer_targets(layer):
            owner = layer.get_submodule(target.path) if target.path else layer
            parametrizations.spectral_norm(owner, target.tensor_name, dim=target.dim)
            found.append((owner, target.tensor_name, target.dim))
    return found


def _matrix_getter(original: Tensor, dim: int) -> Callable[[], Tensor]:
    return lambda: weight_to_matrix(original.detach(), dim)


def _nbytes(tensors: Iterable[Tensor]) -> Iterator[int]:
    return (t.numel() * t.element_size() for t in tensors)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _train_step(variant: _Variant, x: Tensor, measure: bool) -> float:
    """One SGD step; its time in milliseconds, without the (optional) accuracy check.

    The check runs between backward and the optimizer step, on the weights and the
    estimate the forward used.
    """
    start = time.perf_counter()
    variant.optimizer.zero_grad(set_to_none=True)
    loss = _first_tensor(variant.model(x)).float().square().mean()
    loss.backward()  # type: ignore[no-untyped-call]
    elapsed = time.perf_counter() - start
    if measure and variant.weights:
        variant.errors.append(_worst_error(variant))
    start = time.perf_counter()
    variant.optimizer.step()
    return (elapsed + time.perf_counter() - start) * 1e3


def _eval_forward(variant: _Variant, x: Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        variant.model(x)
    return (time.perf_counter() - start) * 1e3


def _check_forward(model: nn.Module, x: Tensor, *, training: bool) -> None:
    """Run the unpatched model once (no grad); its failure becomes a one-line error."""
    model.train(training)
    try:
        with torch.no_grad():
            model(x)
    except Exception as error:  # any failure of the user's model: report it, don't time it
        mode = "training" if training else "eval"
        message = " ".join(str(error).split()) or type(error).__name__
        raise InvalidArgumentError(
            f"the unpatched model's {mode} forward fails on an input of shape "
            f"{tuple(x.shape)}: {message} (try another --batch-size or --image-size)"
        ) from error


def run_bench(
    factory: Callable[[], nn.Module],
    *,
    batch_size: int = 16,
    image_size: int = 64,
    eval_batch_size: int = 1,
    steps: int = 20,
    warmup: int = 3,
    seed: int = 0,
    label: str = "model",
) -> BenchResult:
    """Build ``factory()`` three ways and measure them (see the module docstring).

    Args:
        factory: builds the (unpatched) model.
        batch_size: training batch size.
        image_size: side of the random input images (ignored for linear-first models).
        eval_batch_size: batch size of the timed eval forwards.
        steps: timed training steps and eval forwards per variant.
        warmup: untimed training steps and eval forwards per variant first.
        seed: seeds the model's initialization and the inputs.
        label: the model's name in the report.

    Returns:
        The measurements; ``as_dict()`` gives the JSON layout.
    """
    torch.manual_seed(seed)
    base = factory()
    names = select_layers(base)
    x = example_input(base, batch_size, image_size)
    x_eval = example_input(base, eval_batch_size, image_size)

    _check_forward(base, x, training=True)
    _check_forward(base, x_eval, training=False)
    models = {name: copy.deepcopy(base) for name in VARIANTS}
    start = time.perf_counter()
    torch_targets = _torch_spectral_norm(models["torch"], names)
    patch_torch = time.perf_counter() - start
    start = time.perf_counter()
    apply_spectral_norm(models["snpatch"])
    patch_snpatch = time.perf_counter() - start

    variants = {
        name: _Variant(name, model, torch.optim.SGD(model.parameters(), lr=1e-3))
        for name, model in models.items()
    }
    for owner, tensor_name, dim in torch_targets:
        plist = parametrization_list(owner, tensor_name)
        variants["torch"].weights.append((_matrix_getter(plist.original, dim), plist[0]))
    norms = []
    for layer in patched_layers(models["snpatch"]).values():
        hook = _hook(layer)
        assert hook is not None
        for _, norm, original in hook.norms(layer):
            norms.append(norm)
            variants["snpatch"].weights.append((_matrix_getter(original, norm.dim), norm))

    normalized = [variants["torch"], variants["snpatch"]]
    after_patching = {v.name: _worst_error(v) for v in normalized}

    for variant in variants.values():
        variant.model.train()
        for _ in range(warmup):
            _train_step(variant, x, measure=False)
    order = list(VARIANTS)
    for _ in range(steps):
        for name in order:
            variants[name].train_ms.append(_train_step(variants[name], x, measure=True))
        order.append(order.pop(0))

    for variant in variants.values():
        variant.model.eval()
        for _ in range(warmup):
            _eval_forward(variant, x_eval)
    for _ in range(steps):
        for name in order:
            variants[name].eval_ms.append(_eval_forward(variants[name], x_eval))
        order.append(order.pop(0))

    train = {name: _summary(v.train_ms) for name, v in variants.items()}
    evals = {name: _summary(v.eval_ms) for name, v in variants.items()}
    ratios = {}
    for kind, table in (("train", train), ("eval", evals)):
        medians = {name: table[name]["median"] for name in VARIANTS}
        ratios[f"{kind}_torch_vs_unpatched"] = medians["torch"] / medians["unpatched"]
        ratios[f"{kind}_snpatch_vs_unpatched"] = medians["snpatch"] / medians["unpatched"]
        ratios[f"{kind}_snpatch_vs_torch"] = medians["snpatch"] / medians["torch"]

    torch_states = [state for _, state in variants["torch"].weights]
    caches = [n._cache[1] for n in norms if n._cache is not None]
    memory = {
        "normalized_weights": float(len(norms)),
        "weight_bytes": float(sum(_nbytes([get() for get, _ in variants["snpatch"].weights]))),
        "torch_state_bytes": float(sum(_nbytes(b for s in torch_states for b in s.buffers()))),
        "snpatch_state_bytes": float(sum(_nbytes(b for n in norms for b in n.buffers()))),
        "snpatch_eval_cache_bytes": float(sum(_nbytes(caches))),
    }
    memory["snpatch_state_bytes_per_weight"] = memory["snpatch_state_bytes"] / max(len(norms), 1)
    settings: dict[str, Any] = {
        "model": label,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "image_size": image_size,
        "eval_batch_size": eval_batch_size,
        "steps": steps,
        "warmup": warmup,
        "input_shape": list(x.shape),
    }
    return BenchResult(
        settings=settings,
        train_ms=train,
        eval_ms=evals,
        ratios=ratios,
        patch_s={"torch": patch_torch, "snpatch": patch_snpatch},
        memory=memory,
        sigma_error={
            v.name: {"after_patching": after_patching[v.name], "over_steps": max(v.errors)}
            for v in normalized
        },
    )


def format_report(result: BenchResult) -> str:
    """The human-readable report of ``snpatch bench``."""
    settings, memory = result.settings, result.memory
    lines = [
        f"snpatch bench {settings['model']}: input {tuple(settings['input_shape'])}, "
        f"eval batch {settings['eval_batch_size']}, {settings['steps']} timed steps "
        f"(+{settings['warmup']} warmup) per variant, interleaved; torch {settings['torch']}, "
        f"{settings['threads']} threads",
        f"{'':<22}" + "".join(f"{name:>26}" for name in VARIANTS),
    ]
    for title, table in (("train step ms", result.train_ms), ("eval forward ms", result.eval_ms)):
        cells = [
            f"{t['median']:.2f} [{t['min']:.2f}-{t['max']:.2f}]"
            for t in (table[name] for name in VARIANTS)
        ]
        lines.append(f"{title + ' (median [min-max])':<22}" + "".join(f"{c:>26}" for c in cells))
    ratios = result.ratios
    for kind in ("train", "eval"):
        lines.append(
            f"{kind}: snpatch/torch {ratios[f'{kind}_snpatch_vs_torch']:.3f}, "
            f"torch/unpatched {ratios[f'{kind}_torch_vs_unpatched']:.3f}, "
            f"snpatch/unpatched {ratios[f'{kind}_snpatch_vs_unpatched']:.3f}"
        )
    lines.append(
        f"patch time: torch {result.patch_s['torch']:.3f} s, "
        f"snpatch {result.patch_s['snpatch']:.3f} s"
    )
    count = int(memory["normalized_weights"])
    lines.append(
        f"extra memory: {count} normalized weights ({memory['weight_bytes'] / 2**20:.1f} MiB); "
        f"snpatch state {memory['snpatch_state_bytes'] / 2**10:.1f} KiB "
        f"({memory['snpatch_state_bytes_per_weight'] / 2**10:.1f} KiB per weight), "
        f"torch state {memory['torch_state_bytes'] / 2**10:.1f} KiB; "
        f"snpatch eval cache {memory['snpatch_eval_cache_bytes'] / 2**20:.1f} MiB (eval only)"
    )
    for name, errors in result.sigma_error.items():
        lines.append(
            f"worst |sigma/target - 1| {name}: {errors['after_patching']:.2g} after patching, "
            f"{errors['over_steps']:.2g} over the timed steps"
        )
    return "\n".join(lines)
