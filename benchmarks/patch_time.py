"""Time to patch large torchvision models: snpatch vs torch's spectral_norm on the same layers.

python benchmarks/patch_time.py
"""

from __future__ import annotations

import time

import torch
import torchvision
from torch.nn.utils import parametrizations

import snpatch


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in ("resnet50", "resnet50", "vgg16"):
        model = torchvision.models.get_model(name)
        start = time.perf_counter()
        snpatch.apply_spectral_norm(model)
        ours = time.perf_counter() - start
        model = torchvision.models.get_model(name)
        start = time.perf_counter()
        for module in list(model.modules()):
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                parametrizations.spectral_norm(module)
        theirs = time.perf_counter() - start
        print(f"{name}: snpatch {ours:.2f} s, torch {theirs:.2f} s")


if __name__ == "__main__":
    main()
