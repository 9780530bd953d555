"""``bigbatch train`` across the nodes of a Ray cluster: one torchrun per node, joined by c10d.

    python examples/ray_train_nodes.py --nodes 4 --gpus-per-node 8 -- \\
        --workload bytelm --batch-size 1024 --optimizer lamb --out /shared/runs/lm

Reserves one bundle per node (a placement group, ``STRICT_SPREAD``: each on its own node), asks
the first bundle's node for its address, then starts on every node
``bigbatch train --nnodes N --node-rank i --rdzv-endpoint ADDR:PORT --nproc G ARGS``. Ray gives
each launch its node's GPUs (``CUDA_VISIBLE_DEVICES``), which torchrun's processes inherit.
Exits with the first non-zero exit code of a node, else 0. docs/cluster.md explains the rest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True, help="nodes to train on (one torchrun each)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node = processes per node (0: CPU)")
    p.add_argument("--nproc", type=int, default=None, help="processes per node (default: the GPUs, or 1)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--strategy", default="STRICT_SPREAD", help="placement strategy (SPREAD lets nodes share a host)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of bigbatch train")
    a = p.parse_args(argv)
    train_args = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    nproc = a.nproc or max(1, a.gpus_per_node)

    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address=a.address)
    bundle = {"CPU": 1, **({"GPU": a.gpus_per_node} if a.gpus_per_node else {})}
    pg = placement_group([bundle] * a.nodes, strategy=a.strategy)
    ray.get(pg.ready())

    def on(i: int) -> dict:
        return dict(num_cpus=1, num_gpus=a.gpus_per_node,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i))

    @ray.remote
    def address() -> str:
        return ray.util.get_node_ip_address()

    @ray.remote
    def launch(rank: int, endpoint: str) -> int:
        cmd = [sys.executable, "-m", "bigbatch", "train", "--nnodes", str(a.nodes), "--node-rank", str(rank),
               "--rdzv-endpoint", endpoint, "--nproc", str(nproc), *train_args]
        return subprocess.call(cmd)

    endpoint = f"{ray.get(address.options(**on(0)).remote())}:{a.port}"
    codes = ray.get([launch.options(**on(i)).remote(i, endpoint) for i in range(a.nodes)])
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
