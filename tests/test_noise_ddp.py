"""NoiseMonitor under DDP: 2 CPU processes (gloo). DDP mode vs accumulation mode vs linreg's closed form."""

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from _dist import spawn_gloo

WORLD = 2


def _worker(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bigbatch.noise import NoiseMonitor, split_batch, unbiased_estimates
    from bigbatch.workloads.linreg import LinReg

    wl = LinReg(dim=8, noise_std=0.5, init_distance=1.0, seed=0)
    models = {name: DDP(wl.build_model()) for name in ("ddp", "acc", "acc1")}
    mons = {
        "ddp": NoiseMonitor(models["ddp"], mode="auto", beta=0.998),  # auto -> ddp on 2 ranks
        "acc": NoiseMonitor(models["acc"], mode="accumulation", source="micro", beta=0.998),
        "acc1": NoiseMonitor(models["acc1"], mode="accumulation", source="micro", beta=0.998),
    }
    B, k = 128, 2
    sampler = wl.sampler(0)
    result: dict = {"modes": {n: m.mode for n, m in mons.items()}}
    for step in range(800):
        idx = sampler.next(B)
        per_rank = B // WORLD
        local = wl.fetch(idx[rank * per_rank : (rank + 1) * per_rank])
        readings = {}
        for name, model in models.items():
            if name == "acc1" and step > 0:
                continue  # only needed for the step-0 comparison; keeps the test fast
            micro = [local] if name == "acc1" else split_batch(local, k)
            mon = mons[name]
            mon.begin_step()
            for i, mb in enumerate(micro):
                sync = i == len(micro) - 1
                ctx = model.no_sync() if not sync else torch.enable_grad()
                with ctx, mon.micro_batch(wl.count(mb)):
                    loss, _ = wl.loss(model, mb)
                    (loss * WORLD / B).backward()  # the trainer's world/N normalisation
            readings[name] = mon.end_step()
        if step == 0 and rank == 0:
            # float64 reference from the two shards' mean gradients, computed without DDP
            ref_model = wl.build_model().double()
            shards = [wl.fetch(idx[r * per_rank : (r + 1) * per_rank]) for r in range(WORLD)]
            means = []
            for sh in shards:
                loss, _ = wl.loss(ref_model, {kk: v.double() for kk, v in sh.items()})
                means.append(torch.autograd.grad(loss / per_rank, list(ref_model.parameters()))[0])
            big = (means[0] + means[1]) / 2
            small = sum(float(m.pow(2).sum()) for m in means) / 2
            g2, tr = unbiased_estimates(small, float(big.pow(2).sum()), per_rank, B)
            result["ref_step0"] = [g2, tr]
            result["ddp_step0"] = [readings["ddp"].grad_sqnorm_step, readings["ddp"].trace_sigma_step]
            result["acc1_step0"] = [readings["acc1"].grad_sqnorm_step, readings["acc1"].trace_sigma_step]
            result["grads_equal"] = all(
                torch.allclose(models["ddp"].module.weight.grad, models[n].module.weight.grad, rtol=1e-6, atol=0)
                for n in ("acc", "acc1")
            )
        for model in models.values():
            model.zero_grad(set_to_none=True)
    # per-group breakdown through the comm hook's multi-group path: equal to accumulation mode
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    nets = {m: DDP(copy.deepcopy(net)) for m in ("ddp", "accumulation")}
    gm = {m: NoiseMonitor(nets[m], mode=m, groups="parameter", beta=0.5) for m in nets}
    x = wl.fetch(sampler.next(B))["x"]
    for m in nets:
        gm[m].begin_step()
        shard = x[rank * 64 : (rank + 1) * 64]
        with gm[m].micro_batch(64):
            (nets[m](shard).pow(2).sum() * WORLD / B).backward()
        result[f"groups_{m}"] = gm[m].end_step().groups
    # float64 model: norms accumulated in float64 (one group: the bucket's flat norm; per group: foreach)
    shards64 = [x[r * 64 : (r + 1) * 64].double() for r in range(WORLD)]
    ref64 = copy.deepcopy(net).double()
    means = [torch.autograd.grad(ref64(sh).pow(2).sum() / 64, list(ref64.parameters())) for sh in shards64]
    small64 = sum(sum(float(g.pow(2).sum()) for g in m) for m in means) / WORLD
    big64 = sum(float(((a + b) / 2).pow(2).sum()) for a, b in zip(*means))
    result["ref64"] = list(unbiased_estimates(small64, big64, 64, B))
    for groups in (None, "parameter"):
        net64 = DDP(copy.deepcopy(net).double())
        mon64 = NoiseMonitor(net64, mode="ddp", groups=groups, beta=0.5)
        mon64.begin_step()
        with mon64.micro_batch(64):
            (net64(shards64[rank]).pow(2).sum() * WORLD / B).backward()
        r64 = mon64.end_step()
        result[f"f64_{groups}"] = [r64.grad_sqnorm_step, r64.trace_sigma_step]
    result.update({n: {"b_simple": r.b_simple, "b_small": r.b_small, "b_big": r.b_big, "n": r.n_updates} for n, r in readings.items()})
    result["truth"] = wl.true_b_simple(models["ddp"].module)
    # without no_sync DDP reduces in every backward: the step must give no reading
    mon = mons["ddp"]
    n_before = mon.estimator.n_updates
    mon.begin_step()
    for mb in split_batch(local, k):
        with mon.micro_batch(wl.count(mb)):
            loss, _ = wl.loss(models["ddp"], mb)
            (loss * WORLD / B).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = mon.end_step()
        result["multi_sync"] = [r.valid, mon.estimator.n_updates - n_before, any("no_sync" in str(w.message) for w in caught)]
    return result


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo not available")
def test_ddp_and_accumulation_modes_agree_with_closed_form():
    r = spawn_gloo(_worker, world=WORLD)[0]  # rank 0 holds the float64 reference
    assert r["modes"] == {"ddp": "ddp", "acc": "accumulation", "acc1": "accumulation"}
    # the DDP comm hook's reading equals the float64 reference, step by step
    assert r["ddp_step0"] == pytest.approx(r["ref_step0"], rel=1e-4)
    # one micro-batch per rank: accumulation mode's small batches are the ranks' shards too
    assert r["acc1_step0"] == pytest.approx(r["ref_step0"], rel=1e-4)
    assert r["grads_equal"], "the monitor changed the reduced gradient"
    assert (r["ddp"]["b_small"], r["ddp"]["b_big"]) == (64, 128)
    assert (r["acc"]["b_small"], r["acc"]["b_big"]) == (32, 128)
    truth = r["truth"]
    for name in ("ddp", "acc"):
        assert r[name]["n"] == 800
        assert r[name]["b_simple"] == pytest.approx(truth, rel=0.05), name
    assert r["ddp"]["b_simple"] == pytest.approx(r["acc"]["b_simple"], rel=0.07)
    assert r["multi_sync"] == [False, 0, True]
    ga, gb = r["groups_ddp"], r["groups_accumulation"]
    assert set(ga) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name in ga:
        assert ga[name]["trace_sigma"] == pytest.approx(gb[name]["trace_sigma"], rel=1e-4)
        assert ga[name]["grad_sqnorm"] == pytest.approx(gb[name]["grad_sqnorm"], rel=1e-4, abs=1e-9)
    # a float64 model is read in float64: equal to the float64 reference far below float32's rounding
    for groups in ("None", "parameter"):
        assert r[f"f64_{groups}"] == pytest.approx(r["ref64"], rel=1e-9), groups
