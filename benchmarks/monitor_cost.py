"""What watching sigma costs on resnet18: sigma_estimates (median of 5) vs exact_sigmas (of 3).

python benchmarks/monitor_cost.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torchvision

import snpatch


def median_time(call: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    model = snpatch.apply_spectral_norm(torchvision.models.resnet18(weights=None))
    weights = len(snpatch.sigma_estimates(model))
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, resnet18, {weights} weights")
    floats = median_time(lambda: snpatch.sigma_estimates(model), 5)
    tensors = median_time(lambda: snpatch.sigma_estimates(model, as_tensors=True), 5)
    exact = median_time(lambda: snpatch.exact_sigmas(model), 3)
    print(f"sigma_estimates: {floats * 1e3:.2f} ms")
    print(f"sigma_estimates(as_tensors=True): {tensors * 1e3:.2f} ms")
    print(f"exact_sigmas: {exact:.2f} s")


if __name__ == "__main__":
    main()
