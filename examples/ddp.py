"""DistributedDataParallel with a patched model: patch first, then wrap.

torchrun --nproc_per_node=2 examples/ddp.py     # CPU (gloo); on GPUs use "nccl" and .cuda()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import snpatch


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    snpatch.apply_spectral_norm(model, exclude="fc")  # 1. patch ...
    ddp = DistributedDataParallel(model)  # 2. ... then wrap (broadcast_buffers=True: default)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)

    torch.manual_seed(1 + rank)  # each rank its own data shard
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for step in range(3):
        loss = nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    # Every rank holds the same weights and the same iteration state (u, v, block, sigma).
    # (BatchNorm's running statistics are per rank until the next forward broadcasts them.)
    norms = [m for m in model.modules() if isinstance(m, snpatch.SpectralNorm)]
    tensors = [*model.parameters(), *(b for norm in norms for b in norm.buffers())]
    state = torch.cat([t.detach().flatten() for t in tensors])
    copies = [torch.empty_like(state) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, state)
    if rank == 0:
        print("identical on all ranks:", all(torch.equal(c, state) for c in copies))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
