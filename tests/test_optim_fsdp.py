"""A LAMB / LARS / MERIT step on FSDP2 shards (``fully_shard``, 2 CPU processes, gloo) equals the
unsharded step: per-tensor norms and max-norms must be all-reduced over the shard group.
Skipped where torch.distributed / gloo / FSDP2 are unavailable."""

import pytest
import torch
from _dist import WorkerError, spawn_gloo

try:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    HAVE_FSDP2 = dist.is_available() and dist.is_gloo_available()
except Exception:  # pragma: no cover
    HAVE_FSDP2 = False

pytestmark = pytest.mark.skipif(not HAVE_FSDP2, reason="needs torch.distributed with gloo and FSDP2")


def _model():
    torch.manual_seed(0)
    # Odd row counts make the shards uneven (FSDP2 pads dim 0), 1-D params are sharded too.
    return torch.nn.Sequential(
        torch.nn.Linear(6, 11), torch.nn.LayerNorm(11), torch.nn.Tanh(), torch.nn.Linear(11, 3)
    ).double()


def _build(name, model):
    from bigbatch.optim import LAMB, LARS, MERIT, param_groups

    groups = param_groups(model, 0.01)
    if name == "lamb":
        return LAMB(groups, lr=0.05, grad_prenorm=0.5)
    if name == "lars":
        return LARS(groups, lr=0.5, momentum=0.9, trust_coefficient=0.02)
    return MERIT(groups, lr=0.05)


def _steps(model, opt, n=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64)
        y = torch.randn(16, 3, generator=g, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _worker(rank: int) -> float:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    worst = 0.0
    for name in ("lamb", "lars", "merit"):
        ref = _model()
        _steps(ref, _build(name, ref))
        sharded = _model()
        fully_shard(sharded, mesh=mesh)
        _steps(sharded, _build(name, sharded))
        for (n, a), b in zip(sharded.named_parameters(), ref.parameters()):
            full = a.full_tensor()
            err = ((full - b).abs().max() / b.abs().max()).item()
            worst = max(worst, err)
            assert err <= 1e-6, (name, n, err)
    return worst


def test_fsdp2_step_equals_unsharded_step():
    try:
        worst = spawn_gloo(_worker)
    except WorkerError as e:
        if "fully_shard" in str(e) and "not supported" in str(e).lower():
            pytest.skip("FSDP2 on CPU/gloo not supported by this torch: " + str(e).strip().splitlines()[-1])
        raise
    assert max(worst) <= 1e-6
