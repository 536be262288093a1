"""One line on a pretrained model: patch, fine-tune, export, and publish a plain checkpoint.

    python examples/patch_pretrained.py --weights resnet18.pth     # your local checkpoint
    python examples/patch_pretrained.py                            # makes one (runs offline)
    python examples/patch_pretrained.py --quick                    # seconds; the test suite

Steps: build a torchvision model, load the checkpoint with ``torch.load(weights_only=True)``,
``snpatch.apply_spectral_norm(model, exclude="fc")``, fine-tune a few steps on synthetic data,
export with ``torch.export`` and ONNX inside ``snpatch.exported(model)`` and check both against
the patched model, then write ``snpatch.plain_state_dict(model)``, which the unpatched
architecture loads with ``strict=True``.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
import torchvision
from torch import nn

import snpatch

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """tqdm when installed (extra "examples"), else a plain counter."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, item in enumerate(items):
            print(f"{desc}: {i + 1}/{total}", end="\r" if i + 1 < total else "\n")
            yield item
    else:
        yield from tqdm(items, total=total, desc=desc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", help="torchvision model name")
    parser.add_argument("--weights", type=Path, help="state_dict file (made when absent)")
    parser.add_argument("--exclude", nargs="*", default=["fc"], help="layers left unpatched")
    parser.add_argument("--lipschitz", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "snpatch-out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps")
    args = parser.parse_args(argv)
    steps, size = (2, 32) if args.quick else (args.steps, args.image_size)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    weights = args.weights
    if weights is None:
        weights = args.out / f"{args.model}-pretrained.pth"
        torch.save(torchvision.models.get_model(args.model, weights=None).state_dict(), weights)
        print(f"no --weights given: made a stand-in checkpoint at {weights}")
    model = torchvision.models.get_model(args.model, weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))

    snpatch.apply_spectral_norm(model, exclude=args.exclude, lipschitz=args.lipschitz)
    print(f"patched {len(snpatch.patched_layers(model))} layers (excluded {args.exclude})")

    model.eval()
    with torch.no_grad():  # eval: no iteration step, no BatchNorm statistics
        num_classes = model(torch.randn(1, 3, size, size)).shape[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    for _ in progress(range(steps), steps, "fine-tuning"):
        x = torch.randn(8, 3, size, size)
        y = torch.randint(0, num_classes, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model(torch.randn(8, 3, size, size))  # refresh the estimate for the last weights
    print(f"last loss {loss.item():.4f}")

    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    onnx_path = args.out / f"{args.model}.onnx"
    with snpatch.exported(model):
        program = torch.export.export(model, (x,))
        onnx_error = export_onnx(model, x, onnx_path)
    assert snpatch.is_patched(model)
    with torch.no_grad():
        exported_diff = (program.module()(x) - expected).abs().max().item()
    print(f"torch.export: max |diff| vs patched model {exported_diff:.2e}")
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
    if onnx_error is None:
        onnx_diff = check_onnx(onnx_path, x, expected)
        print(f"ONNX (onnxruntime): max |diff| vs patched model {onnx_diff:.2e}  -> {onnx_path}")
    else:
        print(f"ONNX skipped: {onnx_error}")

    plain_path = args.out / f"{args.model}-sn-plain.pth"
    torch.save(snpatch.plain_state_dict(model), plain_path)
    fresh = torchvision.models.get_model(args.model, weights=None).eval()
    fresh.load_state_dict(torch.load(plain_path, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    print(f"plain checkpoint loads into an unpatched {args.model} (strict=True): {plain_path}")


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> str | None:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "install the onnx extra (onnx, onnxscript, onnxruntime)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    return None


def check_onnx(path: Path, x: torch.Tensor, expected: torch.Tensor) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)
    return float((torch.from_numpy(out) - expected).abs().max())


if __name__ == "__main__":
    main()
