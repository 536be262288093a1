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

On a GPU (``device="cuda"``) a step is not timed alone: each timed run is ``run_length``
consecutive steps between two CUDA events, so that a host-device synchronization inside a
step shows up as lost time (the host stops queueing work while the device drains); the
accuracy check then runs on one untimed step after each run. ``compile_mode`` also times a
training step of each variant under ``torch.compile``. :func:`ops_report` counts the aten
ops each normalized weight costs on the CUDA code path (see :mod:`snpatch.audit`).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from ._compat import ConvNd
from .audit import _Recorder, audit_backward, ops_per_weight
from .errors import InvalidArgumentError, MissingDependencyError
from .parametrization import weight_to_matrix
from .patch import _hook, apply_spectral_norm, layer_targets, parametrization_list, patched_layers
from .select import select_layers

__all__ = [
    "BUILTINS",
    "COMPILE_MODES",
    "VARIANTS",
    "BenchResult",
    "Builtin",
    "Clock",
    "CudaClock",
    "WallClock",
    "format_ops_report",
    "format_report",
    "mixture_discriminator",
    "mlp",
    "ops_report",
    "run_bench",
    "sngan_discriminator",
    "time_runs",
]

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


def sngan_discriminator() -> nn.Module:
    """The ``sngan_d`` builtin: the SN-GAN paper's standard CNN discriminator (32x32 input).

    Miyato et al. 2018, table 3 (CIFAR-10): conv3x3-64, conv4x4/2-64, conv3x3-128,
    conv4x4/2-128, conv3x3-256, conv4x4/2-256, conv3x3-512 (padding 1), each followed by
    LeakyReLU(0.1), then a linear layer from the 4x4x512 features to one logit.
    """
    layers: list[nn.Module] = []
    channels = 3
    for width in (64, 128, 256):
        layers += [nn.Conv2d(channels, width, 3, 1, 1), nn.LeakyReLU(0.1)]
        layers += [nn.Conv2d(width, width, 4, 2, 1), nn.LeakyReLU(0.1)]
        channels = width
    layers += [nn.Conv2d(channels, 512, 3, 1, 1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 4 * 4, 1))


def mixture_discriminator() -> nn.Module:
    """The ``mixture_d`` builtin: the 2-D mixture GAN's discriminator, MLP 2-64-64-64-1.

    The discriminator of ``examples/sngan_mixture.py`` (ReLUs), where a step is a few tiny
    products and the per-layer cost of the normalization is all there is.
    """
    return nn.Sequential(
        nn.Linear(2, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 1),
    )


@dataclass(frozen=True)
class Builtin:
    """A model ``snpatch bench`` knows by name, with its default training input."""

    factory: Callable[[], nn.Module]
    batch_size: int
    image_size: int
    description: str


#: The bench's own models, by name (any torchvision model name works too).
BUILTINS: Mapping[str, Builtin] = {
    "mlp": Builtin(mlp, 16, 64, "8 x Linear(512, 512)"),
    "sngan_d": Builtin(sngan_discriminator, 64, 32, "SN-GAN's standard CNN discriminator"),
    "mixture_d": Builtin(mixture_discriminator, 512, 64, "2-D mixture GAN's D, 2-64-64-64-1"),
}


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
    #: With ``compile_mode``: its mode, ``train_ms`` and ``ratios`` as above, and ``errors``
    #: (variant -> the error that stopped it compiling or running).
    compiled: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        result = {
            "settings": self.settings,
            "train_ms": self.train_ms,
            "eval_ms": self.eval_ms,
            "ratios": self.ratios,
            "patch_s": self.patch_s,
            "memory": self.memory,
            "sigma_error": self.sigma_error,
        }
        if self.compiled is not None:
            result["compiled"] = self.compiled
        return result


def example_input(model: nn.Module, batch_size: int, image_size: int) -> Tensor:
    """A random input for ``model``, shaped for its first conv or linear layer."""
    for module in model.modules():
        if isinstance(module, ConvNd):
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


class Clock(Protocol):
    """Marks points in a device's stream of work and measures between them.

    :class:`CudaClock` records CUDA events; :class:`WallClock` reads the host's clock
    (on the CPU the work is done when the call returns). :func:`time_runs` takes either.
    """

    def mark(self) -> object:
        """A point after all the work queued so far (it costs the host no wait)."""
        ...

    def elapsed_ms(self, start: object, end: object) -> float:
        """Milliseconds from ``start`` to ``end``; waits until ``end`` is reached."""
        ...

    def synchronize(self) -> None:
        """Waits until all queued work is done."""
        ...


class WallClock:
    """:class:`Clock` of the host: ``time.perf_counter``."""

    def mark(self) -> object:
        return time.perf_counter()

    def elapsed_ms(self, start: object, end: object) -> float:
        assert isinstance(start, float)
        assert isinstance(end, float)
        return (end - start) * 1e3

    def synchronize(self) -> None:
        pass


class CudaClock:
    """:class:`Clock` of a CUDA device: events recorded on its current stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> object:
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        return event

    def elapsed_ms(self, start: object, end: object) -> float:
        assert isinstance(start, torch.cuda.Event)
        assert isinstance(end, torch.cuda.Event)
        end.synchronize()
        return float(start.elapsed_time(end))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def time_runs(
    steps: Mapping[str, Callable[[], object]],
    clock: Clock,
    *,
    runs: int,
    run_length: int,
    order: list[str] | None = None,
    after_run: Callable[[str], object] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per step of each of ``steps``, over ``runs`` timed runs each.

    A run is ``run_length`` consecutive calls between two marks of ``clock``, with the
    device idle at its start and no wait inside it, so time the device sits idle while the
    host waits for it (a synchronization inside a step) counts; the variants take turns,
    in an order that rotates after each round, so that a load change hits all alike.

    Args:
        steps: one step function per variant.
        clock: marks and measures (:class:`CudaClock`, :class:`WallClock`).
        runs: timed runs per variant.
        run_length: consecutive steps per run.
        order: the variants' order in the first round (default: that of ``steps``);
            rotated in place, so that the next measurement can go on from it.
        after_run: called with the variant's name after each of its runs, untimed.

    Returns:
        Per variant, the mean milliseconds per step of each run, in run order.

    Example:
        >>> import torch
        >>> from snpatch.bench import WallClock, time_runs
        >>> a, b = torch.randn(64, 64), torch.randn(64, 64)
        >>> times = time_runs({"mm": lambda: a @ b}, WallClock(), runs=3, run_length=10)
        >>> len(times["mm"]), all(t > 0 for t in times["mm"])
        (3, True)
    """
    order = list(steps) if order is None else order
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name in order:
            step = steps[name]
            clock.synchronize()
            start = clock.mark()
            for _ in range(run_length):
                step()
            end = clock.mark()
            times[name].append(clock.elapsed_ms(start, end) / run_length)
            if after_run is not None:
                after_run(name)
        order.append(order.pop(0))
    return times


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


#: ``torch.compile`` modes ``run_bench(compile_mode=...)`` takes.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``: the CPU, or a CUDA device that is there."""
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InvalidArgumentError(f"device {device!r} is not a device: {error}") from error
    if checked.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device {str(checked)!r}: snpatch bench times 'cpu' or 'cuda'")
    if checked.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise MissingDependencyError(
                f"device 'cuda' needs a torch built with CUDA and a GPU; torch "
                f"{torch.__version__} is a CPU-only build (time on the CPU without --device)"
            )
        raise InvalidArgumentError(
            f"device 'cuda': no CUDA device is available here (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}, CUDA {torch.version.cuda}); time on the CPU "
            "without --device, or run on a machine with a GPU"
        )
    return checked


def _sgd_step(
    model: Callable[[Tensor], object], optimizer: torch.optim.Optimizer, x: Tensor
) -> Callable[[], None]:
    """The training step :func:`_train_step` times, as one call (for :func:`time_runs`)."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _first_tensor(model(x)).float().square().mean().backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    return step


def _no_grad_forward(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(x)

    return forward


def _patch(name: str, model: nn.Module, names: list[str]) -> list[tuple[nn.Module, str, int]]:
    """Make ``model`` the variant ``name``; torch's targets (owner, tensor name, dim)."""
    if name == "torch":
        return _torch_spectral_norm(model, names)
    if name == "snpatch":
        apply_spectral_norm(model)
    return []


def _clock_name(clock: Clock) -> str:
    if isinstance(clock, CudaClock):
        return "CUDA events"
    if isinstance(clock, WallClock):
        return "perf_counter"
    return type(clock).__name__


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _compiled_runs(
    base: nn.Module,
    names: list[str],
    x: Tensor,
    *,
    mode: str,
    clock: Clock,
    runs: int,
    run_length: int,
    warmup: int,
    order: list[str],
) -> dict[str, Any]:
    """Training steps of each variant under ``torch.compile(mode=mode)``, timed in runs.

    A variant that fails to compile or run is reported with its error, not timed.
    """
    steps: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    for name in VARIANTS:
        model = copy.deepcopy(base)
        _patch(name, model, names)
        model.to(x.device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        step = _sgd_step(torch.compile(model, mode=mode), optimizer, x)
        try:
            # Compilation, and for CUDA graphs their warmup and recording runs.
            for _ in range(max(warmup, 3)):
                step()
        except Exception as error:  # any compile or runtime failure: report it, time the rest
            errors[name] = f"{type(error).__name__}: {_one_line(error)}"
            continue
        steps[name] = step
    times = time_runs(
        steps, clock, runs=runs, run_length=run_length, order=[n for n in order if n in steps]
    )
    train = {name: _summary(values) for name, values in times.items()}
    ratios = {}
    if "torch" in train and "snpatch" in train:
        ratios["train_snpatch_vs_torch"] = train["snpatch"]["median"] / train["torch"]["median"]
    if "unpatched" in train and "snpatch" in train:
        ratios["train_snpatch_vs_unpatched"] = (
            train["snpatch"]["median"] / train["unpatched"]["median"]
        )
    return {"mode": mode, "train_ms": train, "ratios": ratios, "errors": errors}


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
    device: str | torch.device = "cpu",
    run_length: int | None = None,
    compile_mode: str | None = None,
    clock: Clock | None = None,
) -> BenchResult:
    """Build ``factory()`` three ways and measure them (see the module docstring).

    Args:
        factory: builds the (unpatched) model.
        batch_size: training batch size.
        image_size: side of the random input images (ignored for linear-first models).
        eval_batch_size: batch size of the timed eval forwards.
        steps: timed training steps and eval forwards per variant; with ``run_length``,
            timed runs per variant.
        warmup: untimed training steps and eval forwards per variant first.
        seed: seeds the model's initialization and the inputs.
        label: the model's name in the report.
        device: ``"cpu"`` or ``"cuda"``; the models are patched on the CPU, then moved.
        run_length: time runs of this many consecutive steps (:func:`time_runs`) instead
            of single steps; on CUDA always (default 20), elsewhere when given.
        compile_mode: also time a training step of each variant under
            ``torch.compile(mode=compile_mode)`` (e.g. ``"reduce-overhead"``: CUDA graphs), in
            runs of ``run_length`` steps (default 20).
        clock: what times the runs (default: :class:`CudaClock` on CUDA, else
            :class:`WallClock`).

    Returns:
        The measurements; ``as_dict()`` gives the JSON layout.

    Raises:
        InvalidArgumentError: a device other than the CPU or an available CUDA device,
            ``run_length < 1`` or an unknown ``compile_mode``.
        MissingDependencyError: ``device="cuda"`` on a CPU-only build of torch.
    """
    target = _check_device(device)
    if run_length is not None and run_length < 1:
        raise InvalidArgumentError(f"run_length must be >= 1, got {run_length}")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise InvalidArgumentError(
            f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}"
        )
    if run_length is None and (target.type == "cuda" or compile_mode is not None):
        run_length = 20
    if clock is None:
        clock = CudaClock(target) if target.type == "cuda" else WallClock()
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
    x, x_eval = x.to(target), x_eval.to(target)
    for model in models.values():
        model.to(target)

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
    if run_length is None:
        for _ in range(steps):
            for name in order:
                variants[name].train_ms.append(_train_step(variants[name], x, measure=True))
            order.append(order.pop(0))
    else:
        train_runs = time_runs(
            {name: _sgd_step(v.model, v.optimizer, x) for name, v in variants.items()},
            clock,
            runs=steps,
            run_length=run_length,
            order=order,
            # The accuracy check, on one more (untimed) step after each run.
            after_run=lambda name: _train_step(variants[name], x, measure=True),
        )
        for name, values in train_runs.items():
            variants[name].train_ms = values

    for variant in variants.values():
        variant.model.eval()
        for _ in range(warmup):
            _eval_forward(variant, x_eval)
    if run_length is None:
        for _ in range(steps):
            for name in order:
                variants[name].eval_ms.append(_eval_forward(variants[name], x_eval))
            order.append(order.pop(0))
    else:
        eval_runs = time_runs(
            {name: _no_grad_forward(v.model, x_eval) for name, v in variants.items()},
            clock,
            runs=steps,
            run_length=run_length,
            order=order,
        )
        for name, values in eval_runs.items():
            variants[name].eval_ms = values

    compiled = None
    if compile_mode is not None:
        assert run_length is not None
        compiled = _compiled_runs(
            base,
            names,
            x,
            mode=compile_mode,
            clock=clock,
            runs=steps,
            run_length=run_length,
            warmup=warmup,
            order=order,
        )

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
        "device": str(target),
        "device_name": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
        "timing": "steps" if run_length is None else "runs",
        "run_length": run_length,
        "clock": "perf_counter per step" if run_length is None else _clock_name(clock),
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
        compiled=compiled,
    )


def format_report(result: BenchResult) -> str:
    """The human-readable report of ``snpatch bench``."""
    settings, memory = result.settings, result.memory
    if settings["timing"] == "steps":
        timed = f"{settings['steps']} timed steps"
    else:
        timed = f"{settings['steps']} timed runs of {settings['run_length']} consecutive steps"
    where = "" if settings["device"] == "cpu" else f", {settings['device_name']}"
    lines = [
        f"snpatch bench {settings['model']}: input {tuple(settings['input_shape'])}, "
        f"eval batch {settings['eval_batch_size']}, {timed} "
        f"(+{settings['warmup']} warmup) per variant, interleaved; torch {settings['torch']}, "
        f"{settings['threads']} threads, {settings['device']}{where}, {settings['clock']}",
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
    if result.compiled is not None:
        compiled = result.compiled
        cells = [
            f"{name} {compiled['train_ms'][name]['median']:.3f}"
            for name in VARIANTS
            if name in compiled["train_ms"]
        ]
        line = f"torch.compile(mode={compiled['mode']!r}) train step ms (median): " + ", ".join(
            cells
        )
        if "train_snpatch_vs_torch" in compiled["ratios"]:
            line += f"; snpatch/torch {compiled['ratios']['train_snpatch_vs_torch']:.3f}"
        lines.append(line)
        for name, error in compiled["errors"].items():
            lines.append(f"torch.compile(mode={compiled['mode']!r}) {name} failed: {error}")
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


def _torch_backward_ops(shape: torch.Size, dim: int) -> int:
    """aten ops of the backward of torch's spectral norm for one weight of ``shape``.

    torch's has no backward of its own: autograd chains the derivatives of ``W / sigma``
    and ``sigma = u^T W v``, which dispatch the same aten ops on any device; counted here
    on the CPU, through the autograd engine (which does not run on fake CUDA tensors).
    """
    holder = nn.Module()
    holder.register_parameter("weight", nn.Parameter(torch.randn(shape)))
    parametrizations.spectral_norm(holder, "weight", dim=dim)
    original = parametrization_list(holder, "weight").original
    normalized = holder.weight  # a training-mode forward: the iteration is not counted
    assert isinstance(normalized, Tensor)
    recorder = _Recorder()
    with recorder:
        torch.autograd.grad(normalized, original, torch.ones_like(normalized))
    return recorder.ops.total()


def ops_report(
    factory: Callable[[], nn.Module],
    *,
    batch_size: int = 16,
    image_size: int = 64,
    seed: int = 0,
    label: str = "model",
) -> dict[str, Any]:
    """aten ops per normalized weight on the CUDA code path: torch's spectral norm, snpatch.

    Counted with :mod:`snpatch.audit` (fake CUDA tensors and a dispatch recorder: no GPU
    needed): the extra ops of one training forward (with the iteration) and of one eval
    forward of a freshly patched model over the unpatched one, and the ops of the
    normalization's backward (snpatch's backward called directly, as
    :func:`~snpatch.audit.audit_backward` does; torch's through autograd), each divided
    by the number of normalized weights.

    Args:
        factory: builds the (unpatched) model.
        batch_size: batch of the audited forwards.
        image_size: side of the random input images (ignored for linear-first models).
        seed: seeds the model's initialization.
        label: the model's name in the report.

    Returns:
        ``{"settings": ..., "ops_per_weight": {"train_forward" | "eval_forward" |
        "backward": {"torch": ..., "snpatch": ...}}}``.

    Raises:
        MissingDependencyError: torch is a CPU-only build (fake CUDA tensors need a CUDA
            build; not a GPU).
    """
    if torch.version.cuda is None:
        raise MissingDependencyError(
            "snpatch bench --ops audits the CUDA code path with fake CUDA tensors: it needs a "
            f"torch built with CUDA (no GPU needed); torch {torch.__version__} is a CPU-only "
            "build"
        )
    torch.manual_seed(seed)
    base = factory()
    names = select_layers(base)
    x = example_input(base, batch_size, image_size)
    _check_forward(base, x, training=True)
    _check_forward(base, x, training=False)

    torch_model = copy.deepcopy(base)
    torch_shapes = [
        (parametrization_list(owner, name).original.shape, dim)
        for owner, name, dim in _torch_spectral_norm(torch_model, names)
    ]
    snpatch_model = copy.deepcopy(base)
    apply_spectral_norm(snpatch_model)
    snpatch_shapes = []
    for layer in patched_layers(snpatch_model).values():
        hook = _hook(layer)
        assert hook is not None
        snpatch_shapes += [(original.shape, norm.dim) for _, norm, original in hook.norms(layer)]

    patches: dict[str, tuple[Callable[[nn.Module], object], int]] = {
        "torch": (lambda model: _torch_spectral_norm(model, names), len(torch_shapes)),
        "snpatch": (apply_spectral_norm, len(snpatch_shapes)),
    }
    shape = tuple(x.shape)
    result: dict[str, dict[str, float]] = {}
    for kind, training in (("train_forward", True), ("eval_forward", False)):
        result[kind] = {
            name: ops_per_weight(
                lambda: copy.deepcopy(base), patch, shape, count, training=training
            )
            for name, (patch, count) in patches.items()
        }
    result["backward"] = {
        "torch": statistics.fmean(_torch_backward_ops(s, d) for s, d in torch_shapes),
        "snpatch": statistics.fmean(
            audit_backward(tuple(s), dim=d).total() for s, d in snpatch_shapes
        ),
    }
    settings = {
        "model": label,
        "torch": torch.__version__,
        "input_shape": list(shape),
        "normalized_weights": len(snpatch_shapes),
    }
    return {"settings": settings, "ops_per_weight": result}


def format_ops_report(report: dict[str, Any]) -> str:
    """The human-readable report of ``snpatch bench --ops``."""
    settings, ops = report["settings"], report["ops_per_weight"]
    lines = [
        f"snpatch bench {settings['model']} --ops: aten ops per normalized weight on the CUDA "
        f"code path (fake CUDA tensors, snpatch.audit), input {tuple(settings['input_shape'])}, "
        f"{settings['normalized_weights']} normalized weights; torch {settings['torch']}",
        f"{'':<44}{'torch':>10}{'snpatch':>10}",
    ]
    titles = {
        "train_forward": "training forward, with the iteration (extra)",
        "eval_forward": "eval forward, freshly patched (extra)",
        "backward": "backward of the normalization",
    }
    for kind, title in titles.items():
        lines.append(f"{title:<44}{ops[kind]['torch']:>10.1f}{ops[kind]['snpatch']:>10.1f}")
    return "\n".join(lines)
