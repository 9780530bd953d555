"""NoiseMonitor under FSDP2 (fully_shard): 2 CPU processes (gloo). FSDP mode vs DDP mode vs linreg's closed form."""

import copy

import pytest
import torch
import torch.distributed as dist
from _dist import spawn_gloo

WORLD = 2
STEPS = 600


def _worker(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as _fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bigbatch.noise import NoiseMonitor, split_batch, unbiased_estimates
    from bigbatch.workloads.linreg import LinReg

    mesh = init_device_mesh("cpu", (WORLD,))  # explicit: the default mesh is CUDA's on a GPU machine

    def fully_shard(module):
        return _fully_shard(module, mesh=mesh)

    wl = LinReg(dim=8, noise_std=0.5, init_distance=1.0, seed=0)
    models = {"fsdp": fully_shard(wl.build_model()), "fsdp_acc": fully_shard(wl.build_model()), "ddp": DDP(wl.build_model())}
    mons = {name: NoiseMonitor(m, mode="auto", beta=0.998) for name, m in models.items()}
    result: dict = {"modes": {n: m.mode for n, m in mons.items()}}
    B, k = 128, 2
    per_rank = B // WORLD
    sampler = wl.sampler(0)
    for step in range(STEPS):
        idx = sampler.next(B)
        local = wl.fetch(idx[rank * per_rank : (rank + 1) * per_rank])
        readings = {}
        for name, model in models.items():
            micro = split_batch(local, k) if name == "fsdp_acc" else [local]
            mon = mons[name]
            mon.begin_step()
            for i, mb in enumerate(micro):
                if name == "fsdp_acc":
                    model.set_requires_gradient_sync(i == len(micro) - 1)
                with mon.micro_batch(wl.count(mb)):
                    loss, _ = wl.loss(model, mb)
                    (loss * WORLD / B).backward()  # the trainer's world/N normalisation
            readings[name] = mon.end_step()
        if step == 0:
            full = {n: models[n].weight.grad.full_tensor() for n in ("fsdp", "fsdp_acc")}  # collectives: every rank
            if rank == 0:
                # float64 references from the shards' (and the micro-batches') mean gradients, without FSDP
                ref_model = wl.build_model().double()
                shards = [wl.fetch(idx[r * per_rank : (r + 1) * per_rank]) for r in range(WORLD)]

                def mean_grad(batch, ref_model=ref_model):
                    loss, _ = wl.loss(ref_model, {kk: v.double() for kk, v in batch.items()})
                    return torch.autograd.grad(loss / wl.count(batch), list(ref_model.parameters()))[0]

                big = sum(mean_grad(sh) for sh in shards) / WORLD
                for name, pieces in (("fsdp", shards), ("fsdp_acc", [p for sh in shards for p in split_batch(sh, k)])):
                    small = sum(float(mean_grad(p).pow(2).sum()) for p in pieces) / len(pieces)
                    result[f"ref_{name}"] = list(unbiased_estimates(small, float(big.pow(2).sum()), B // len(pieces), B))
                    result[f"got_{name}"] = [readings[name].grad_sqnorm_step, readings[name].trace_sigma_step]
                result["grads_equal"] = all(
                    torch.allclose(full[n], models["ddp"].module.weight.grad, rtol=1e-6, atol=0) for n in full)
        for model in models.values():
            model.zero_grad(set_to_none=True)
    result.update({n: {"b_simple": r.b_simple, "b_small": r.b_small, "b_big": r.b_big, "n": r.n_updates,
                       "ema": [mons[n].estimator.grad_sqnorm, mons[n].estimator.trace_sigma]}
                   for n, r in readings.items()})
    result["truth"] = wl.true_b_simple(models["fsdp"])  # a collective (full_tensor)

    # Per-group sums through real shards (6×8 and 1×6 weights over 2 ranks, nested units): equal to DDP.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    nets = {"ddp": DDP(copy.deepcopy(net)), "fsdp": copy.deepcopy(net)}
    fully_shard(nets["fsdp"][0])
    fully_shard(nets["fsdp"])
    gm = {m: NoiseMonitor(nets[m], groups="parameter", beta=0.5) for m in nets}
    x = wl.fetch(sampler.next(B))["x"]
    shard = x[rank * per_rank : (rank + 1) * per_rank]
    for m, net_m in nets.items():
        gm[m].begin_step()
        with gm[m].micro_batch(per_rank):
            (net_m(shard).pow(2).sum() * WORLD / B).backward()
        result[f"groups_{m}"] = gm[m].end_step().groups

    # The guard: a torch that stops registering unsharded parameters is named, not silently unmeasured.
    mon = NoiseMonitor(nets["fsdp"], beta=0.5)
    mon._fsdp._pre_hook = lambda *a: None
    mon.begin_step()
    with mon.micro_batch(per_rank):
        nets["fsdp"](shard).sum().backward()
    try:
        mon.end_step()
        result["guard"] = "no error"
    except RuntimeError as e:
        result["guard"] = str(e)
    errors = []
    for kwargs in ({"mode": "accumulation"}, {"mode": "ddp"}, {"mode": "split"}, {"source": "prefix"}):
        try:
            NoiseMonitor(nets["fsdp"], **kwargs)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    result["errors"] = errors
    return result


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo not available")
def test_fsdp_mode_agrees_with_ddp_and_closed_form():
    r = spawn_gloo(_worker, world=WORLD)[0]  # rank 0 holds the float64 references
    assert r["modes"] == {"fsdp": "fsdp", "fsdp_acc": "fsdp", "ddp": "ddp"}
    # the unsharded-gradient hooks and the shard sums give the float64 reference, step by step
    for name in ("fsdp", "fsdp_acc"):
        assert r[f"got_{name}"] == pytest.approx(r[f"ref_{name}"], rel=1e-4), name
    assert r["grads_equal"], "the monitor changed the reduced gradient"
    assert (r["fsdp"]["b_small"], r["fsdp"]["b_big"]) == (64, 128)  # the rank's local batch vs the global one
    assert (r["fsdp_acc"]["b_small"], r["fsdp_acc"]["b_big"]) == (32, 128)  # a micro-batch on a rank
    for name in ("fsdp", "fsdp_acc", "ddp"):
        assert r[name]["n"] == STEPS
        assert r[name]["b_simple"] == pytest.approx(r["truth"], rel=0.05), name
    # without accumulation FSDP mode reads exactly what DDP mode reads
    assert r["fsdp"]["ema"] == pytest.approx(r["ddp"]["ema"], rel=1e-5)
    assert r["fsdp"]["b_simple"] == pytest.approx(r["ddp"]["b_simple"], rel=1e-5)
    ga, gb = r["groups_fsdp"], r["groups_ddp"]
    assert set(ga) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name in ga:
        assert ga[name]["trace_sigma"] == pytest.approx(gb[name]["trace_sigma"], rel=1e-4), name
        assert ga[name]["grad_sqnorm"] == pytest.approx(gb[name]["grad_sqnorm"], rel=1e-4, abs=1e-9), name
    assert "saw no unsharded parameter" in r["guard"] and torch.__version__ in r["guard"]
    e_acc, e_ddp, e_split, e_prefix = r["errors"]
    assert "needs mode='fsdp'" in e_acc and "needs mode='fsdp'" in e_split
    assert "DistributedDataParallel" in e_ddp
    assert "source='micro'" in e_prefix


# ---- micro-batches with different loss factors (issue 26, A.1) ------------------------------------
def _unequal_worker(rank: int) -> dict:
    import warnings

    from test_noise_ddp import _unequal_data, _unequal_reference
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bigbatch.noise import NoiseMonitor

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    # FSDP all-gathers in every forward: the ranks run as many micro-batches, of unequal sizes
    data = _unequal_data(sizes={0: [5, 11, 8], 1: [9, 3, 6]})
    model = copy.deepcopy(net)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    mon = NoiseMonitor(model, beta=0.5)
    mbs = data[rank]
    mon.begin_step()
    for j, mb in enumerate(mbs):
        c = 1.0 / (len(mb["x"]) * len(mbs))  # a mean per micro-batch, divided by the accumulation
        model.set_requires_gradient_sync(j == len(mbs) - 1)
        with mon.micro_batch(len(mb["x"]), loss_scale=c):
            (0.5 * (model(mb["x"]) - mb["y"]).pow(2).sum() * c).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = mon.end_step()
        out = {"got": [r.grad_sqnorm_step, r.trace_sigma_step, r.b_small, r.b_big, r.valid],
               "warned": any("unequally" in str(w.message) for w in caught), "mode": mon.mode}
    if rank == 0:
        out["ref"] = _unequal_reference(net, data, "micro")
    return out


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo not available")
def test_fsdp_unequal_loss_factors_match_float64_reference():
    """Per-micro-batch mean losses over unequal counts and unequal micro-batches per rank, under FSDP2."""
    r = spawn_gloo(_unequal_worker, world=WORLD)[0]
    g2, tr, b, B, valid = r["got"]
    rg2, rtr, rb, rB = r["ref"]
    assert r["mode"] == "fsdp" and valid
    assert (b, B) == pytest.approx((rb, rB), rel=1e-6)
    assert g2 == pytest.approx(rg2, rel=1e-5)
    assert tr == pytest.approx(rtr, rel=1e-5)
    assert r["warned"]  # training itself weights the units unequally: said once
