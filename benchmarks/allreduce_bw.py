"""All-reduce bandwidth between the GPUs of this host (run under torchrun): explains DDP scaling.

    torchrun --standalone --nproc-per-node 2 benchmarks/allreduce_bw.py
"""

import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    for mb in (25, 100, 344):
        x = torch.ones(mb * 2**20 // 4, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = 10
        for _ in range(n):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / n
        bus = x.numel() * 4 * 2 * (world - 1) / world / dt / 1e9
        if rank == 0:
            print(f"| {world} | {mb} MB | {dt*1e3:.2f} ms | {bus:.0f} GB/s |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
