"""Command line: ``snpatch inspect`` and ``snpatch bench`` (also ``python -m snpatch``).

``snpatch inspect [MODEL]`` builds a model (a torchvision model name, or
``package.module:factory``), loads ``--weights`` if given, patches it and prints each
patched layer's top singular value before and after. ``snpatch bench [MODEL]`` times
the model unpatched, with torch's spectral norm and with snpatch, on the CPU or a CUDA
device, or with ``--ops`` counts the aten ops they dispatch (see :mod:`snpatch.bench`).
Bad input gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import bench
from .errors import MissingDependencyError, SnpatchError
from .patch import apply_spectral_norm, layer_targets, patched_layers
from .report import SpectralReport, matrix_sigma, spectral_report
from .select import select_layers

__all__ = ["build_model", "main"]

EXIT_USAGE = 2


class _UsageError(Exception):
    """A problem with the command line's input: reported as one line, exit code 2."""


def build_model(spec: str) -> nn.Module:
    """A model from a torchvision name (``resnet18``) or ``package.module:factory``."""
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise _UsageError(f"cannot load model factory {spec!r}: {error}") from error
    else:
        try:
            import torchvision  # type: ignore[import-untyped]
        except ImportError as error:  # pragma: no cover - torchvision is in the vision extra
            raise _UsageError(
                f"model {spec!r} needs torchvision (pip install 'snpatch[vision]')"
            ) from error
        names = torchvision.models.list_models(module=torchvision.models)
        if spec not in names:
            raise _UsageError(
                f"unknown model {spec!r}: not a torchvision classification model "
                "(e.g. resnet18, vgg16) and not of the form package.module:factory"
            )
        model: nn.Module = torchvision.models.get_model(spec, weights=None)
        return model
    model = factory() if callable(factory) else factory
    if not isinstance(model, nn.Module):
        raise _UsageError(f"{spec!r} gave {type(model).__name__}, not an nn.Module")
    return model


def _load_weights(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _UsageError(f"cannot read weights file {path!r}: {reason}") from error
    if not isinstance(state, dict):
        raise _UsageError(f"weights file {path!r} holds {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise _UsageError(
            f"weights file {path!r} does not fit the model: {' '.join(first[:3])}"
        ) from error


def _top_singular_values(model: nn.Module, names: Sequence[str]) -> dict[str, float]:
    """Exact top singular value of each layer's (effective) weights, max over its tensors."""
    values = {}
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name) if name else model
            sigma = 0.0
            for target in layer_targets(layer):
                owner = layer.get_submodule(target.path) if target.path else layer
                sigma = max(sigma, matrix_sigma(getattr(owner, target.tensor_name), target.dim))
            values[name] = sigma
    return values


def _check_plot_path(text: str | None) -> Path | None:
    """``--plot``: matplotlib installed and the folder there, before any work is done."""
    if text is None:
        return None
    try:
        importlib.import_module("matplotlib")
    except ImportError as error:
        raise MissingDependencyError(
            "--plot needs matplotlib, which is not installed: pip install 'snpatch[plot]'"
        ) from error
    path = Path(text)
    if not path.parent.is_dir():
        raise _UsageError(f"--plot {text!r}: folder {str(path.parent)!r} does not exist")
    return path


def _plot_sigmas(
    rows: Sequence[dict[str, Any]],
    report: SpectralReport | None,
    lipschitz: float,
    title: str,
) -> Any:
    """A bar chart (a matplotlib ``Figure``): each layer's sigma before and after patching.

    With a report, also its certified bound per layer, where it has one.
    """
    from matplotlib.figure import Figure  # optional: the plot extra

    names = [row["name"] or "(model)" for row in rows]
    bounds = {row.name: row.bound for row in report} if report is not None else {}
    series = [
        ("sigma before (matrix)", [row["sigma_before"] for row in rows]),
        ("sigma after (matrix)", [row["sigma_after"] for row in rows]),
    ]
    if any(bound is not None for bound in bounds.values()):
        values = [bounds.get(row["name"]) for row in rows]
        series.append(("certified bound", [float("nan") if v is None else v for v in values]))
    figure = Figure(figsize=(max(6.0, 0.2 * len(rows) * len(series) + 2.0), 4.5))
    axes = figure.subplots()
    width = 0.8 / len(series)
    for i, (label, heights) in enumerate(series):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(rows))]
        axes.bar(positions, heights, width, label=label)
    axes.axhline(lipschitz, color="black", linestyle="--", linewidth=1, label="target")
    axes.set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
    axes.set_ylabel("sigma")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _inspect(args: argparse.Namespace) -> int:
    input_shape = _input_shape(args.input_shape)
    plot = _check_plot_path(args.plot)
    model = build_model(args.model)
    if args.weights:
        _load_weights(model, args.weights)
    model.eval()
    names = select_layers(model, args.include, args.exclude)
    before = _top_singular_values(model, names)
    apply_spectral_norm(
        model,
        args.include,
        args.exclude,
        lipschitz=args.lipschitz,
        mode=args.mode,
        method=args.method,
    )
    # The report (exact operator norms, certified bounds) is what --input-shape asks for.
    report = None if input_shape is None else spectral_report(model, input_shape)
    patched = list(patched_layers(model))
    after = _top_singular_values(model, patched)
    rows = [
        {
            "name": name,
            "layer_type": type(model.get_submodule(name)).__name__.removeprefix("Parametrized"),
            "sigma_before": before[name],
            "sigma_after": after[name],
        }
        for name in patched
    ]
    if plot is not None:
        title = f"{args.model}: sigma per layer (lipschitz={args.lipschitz:g}, {args.method})"
        try:
            _plot_sigmas(rows, report, args.lipschitz, title).savefig(plot, dpi=120)
        except (OSError, ValueError) as error:
            raise _UsageError(f"cannot write plot {str(plot)!r}: {error}") from error
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "lipschitz": args.lipschitz,
                    "mode": args.mode,
                    "method": args.method,
                    "input_shape": None if input_shape is None else list(input_shape),
                    "layers": rows,
                    "report": None if report is None else report.to_dict(),
                },
                indent=2,
            )
        )
        return 0
    width = max(len("layer"), *(len(name) for name in patched))
    print(
        f"{args.model}: {len(rows)} layers patched (lipschitz={args.lipschitz:g}, mode={args.mode})"
    )
    print(f"{'layer':<{width}}  {'type':<18}  {'sigma before':>12}  {'sigma after':>11}")
    for row in rows:
        print(
            f"{row['name']:<{width}}  {row['layer_type']:<18}  "
            f"{row['sigma_before']:>12.4f}  {row['sigma_after']:>11.4f}"
        )
    if args.method == "matrix":
        worst = max(abs(row["sigma_after"] - args.lipschitz) for row in rows) / args.lipschitz
        print(f"worst |sigma - target| / target after patching: {worst:.2e}")
    if report is not None:
        shape = ",".join(map(str, input_shape or ()))
        print(f"\nspectral report (method={args.method}, input {shape}):")
        print(report)
    return 0


def _bench(args: argparse.Namespace) -> int:
    builtin = bench.BUILTINS.get(args.model)
    factory = builtin.factory if builtin is not None else lambda: build_model(args.model)
    batch_size = args.batch_size or (builtin.batch_size if builtin is not None else 16)
    image_size = args.image_size or (builtin.image_size if builtin is not None else 64)
    if args.ops:
        timing = [
            flag
            for flag, given in (
                ("--device", args.device != "cpu"),
                ("--compile", args.compile is not None),
                ("--run-length", args.run_length is not None),
            )
            if given
        ]
        if timing:
            raise _UsageError(f"--ops counts ops and times nothing: drop {', '.join(timing)}")
        report = bench.ops_report(
            factory, batch_size=batch_size, image_size=image_size, label=args.model
        )
        print(json.dumps(report, indent=2) if args.json else bench.format_ops_report(report))
        return 0
    result = bench.run_bench(
        factory,
        batch_size=batch_size,
        image_size=image_size,
        eval_batch_size=args.eval_batch_size,
        steps=args.steps,
        warmup=args.warmup,
        label=args.model,
        device=args.device,
        run_length=args.run_length,
        compile_mode=args.compile,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(bench.format_report(result))
    return 0


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    """``"3,32,32"`` -> ``(3, 32, 32)``: one sample's shape, positive ints."""
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise _UsageError(
            f"--input-shape must be positive integers separated by commas (e.g. 3,32,32), "
            f"got {text!r}"
        )
    return shape


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snpatch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="patch a model and show its layers' sigmas")
    inspect.add_argument(
        "model",
        nargs="?",
        default="resnet18",
        help="torchvision model name or package.module:factory (default resnet18)",
    )
    inspect.add_argument("--include", action="append", default=None, metavar="PATTERN")
    inspect.add_argument("--exclude", action="append", default=None, metavar="PATTERN")
    inspect.add_argument("--lipschitz", type=float, default=1.0)
    inspect.add_argument("--mode", choices=["hard", "soft"], default="hard")
    inspect.add_argument(
        "--method",
        choices=["matrix", "operator"],
        default="matrix",
        help="convolutions: kernel matrix norm (torch's) or true operator norm",
    )
    inspect.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="run one forward on a random input of this shape (one sample) before the report",
    )
    inspect.add_argument("--weights", metavar="PATH", help="state_dict file (torch.save)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument(
        "--plot",
        metavar="PATH",
        help="also save a bar chart of each layer's sigma (needs matplotlib: the plot extra)",
    )
    inspect.set_defaults(run=_inspect)
    timing = commands.add_parser(
        "bench", help="time training steps and eval forwards: unpatched, torch's, snpatch"
    )
    builtins = ", ".join(
        f"{name} ({b.description}; batch {b.batch_size})" for name, b in bench.BUILTINS.items()
    )
    timing.add_argument(
        "model",
        nargs="?",
        default="resnet18",
        help=f"torchvision model name, package.module:factory, or one of {builtins}",
    )
    timing.add_argument(
        "--batch-size", type=_count(1), help="training batch (default: the model's, else 16)"
    )
    timing.add_argument(
        "--image-size", type=_count(1), help="input side (default: the model's, else 64)"
    )
    timing.add_argument("--eval-batch-size", type=_count(1), default=1, help="eval batch")
    timing.add_argument(
        "--steps", type=_count(1), default=20, help="timed steps (or runs) per variant"
    )
    timing.add_argument("--warmup", type=_count(0), default=3, help="untimed steps first")
    timing.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: time runs of consecutive steps with CUDA events (needs a GPU)",
    )
    timing.add_argument(
        "--run-length",
        type=_count(1),
        help="time runs of N consecutive steps, not single steps (default 20 on cuda)",
    )
    timing.add_argument(
        "--compile",
        choices=bench.COMPILE_MODES,
        metavar="MODE",
        help="also time a training step under torch.compile(mode=MODE), e.g. reduce-overhead",
    )
    timing.add_argument(
        "--ops",
        action="store_true",
        help="count aten ops per normalized weight on the CUDA code path instead of timing "
        "(needs a CUDA build of torch, not a GPU)",
    )
    timing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    timing.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``snpatch`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (_UsageError, SnpatchError) as error:
        print(f"snpatch: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
