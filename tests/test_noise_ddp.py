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


# ---- micro-batches with different loss factors (issue 26, A.1) ------------------------------------
SIZES = {0: [5, 11, 8], 1: [9, 3]}  # unequal counts per micro-batch and per rank


def _unequal_data(seed=3, sizes=None):
    g = torch.Generator().manual_seed(seed)
    return {r: [{"x": torch.randn(n, 8, generator=g), "y": torch.randn(n, 1, generator=g)} for n in ns]
            for r, ns in (sizes or SIZES).items()}


def _unequal_reference(net, data, kind):
    """float64 (|G|², tr Σ) from E|Σ a S|² = (Σ a n)²|G|² + (Σ a² n) tr Σ, per-micro-batch gradients."""
    from bigbatch.noise import unbiased_estimates

    m64 = copy.deepcopy(net).double()
    params = list(m64.parameters())
    S, a, n = {}, {}, {}
    for r, mbs in data.items():
        for j, mb in enumerate(mbs):
            S[r, j] = torch.autograd.grad(0.5 * (m64(mb["x"].double()) - mb["y"].double()).pow(2).sum(), params)
            n[r, j], a[r, j] = len(mb["x"]), 1.0 / (len(mb["x"]) * len(mbs))

    def part(keys, div=1.0):
        g = [sum(a[key] / div * S[key][i] for key in keys) for i in range(len(params))]
        return (sum(float(v.pow(2).sum()) for v in g), sum(a[key] / div * n[key] for key in keys),
                sum((a[key] / div) ** 2 * n[key] for key in keys))

    if kind == "ddp":  # each rank's whole share
        groups = [[(r, j) for j in range(len(mbs))] for r, mbs in data.items()]
    elif kind == "micro":
        groups = [[key] for key in S]
    else:  # prefix: the first j micro-batches of each rank, j < k_r
        groups = [[(r, i) for i in range(j + 1)] for r, mbs in data.items() for j in range(len(mbs) - 1)]
    smalls = [part(gr) for gr in groups]
    small = sum(s / a_ ** 2 for s, a_, _ in smalls) / len(smalls)
    b = len(smalls) / sum(q / a_ ** 2 for _, a_, q in smalls)
    s_big, a_big, q_big = part(list(S), div=WORLD)  # DDP averages the ranks' gradients
    B = a_big ** 2 / q_big
    return list(unbiased_estimates(small, s_big / a_big ** 2, b, B)) + [b, B]


def _unequal_worker(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bigbatch.noise import NoiseMonitor

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    data = _unequal_data()
    out: dict = {}
    for kind, kw in (("ddp", {"mode": "ddp"}), ("micro", {"mode": "accumulation", "source": "micro"}),
                     ("prefix", {"mode": "accumulation", "source": "prefix"})):
        model = DDP(copy.deepcopy(net))
        mon = NoiseMonitor(model, beta=0.5, **kw)
        mbs = data[rank]
        mon.begin_step()
        for j, mb in enumerate(mbs):
            c = 1.0 / (len(mb["x"]) * len(mbs))  # a mean per micro-batch, divided by the accumulation
            ctx = model.no_sync() if j < len(mbs) - 1 else torch.enable_grad()
            with ctx, mon.micro_batch(len(mb["x"]), loss_scale=c):  # the factor before DDP divides by world
                (0.5 * (model(mb["x"]) - mb["y"]).pow(2).sum() * c).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = mon.end_step()
            out[kind] = [r.grad_sqnorm_step, r.trace_sigma_step, r.b_small, r.b_big, r.valid,
                         any("unequally" in str(w.message) for w in caught)]
        if rank == 0:
            out[f"ref_{kind}"] = _unequal_reference(net, data, kind)
    return out


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo not available")
def test_unequal_loss_factors_under_ddp_match_float64_reference():
    """Per-micro-batch mean losses, unequal counts and micro-batches per rank: DDP mode (which used
    to refuse unequal scales), accumulation mode with per-micro-batch and prefix readings."""
    r = spawn_gloo(_unequal_worker, world=WORLD)[0]
    for kind in ("ddp", "micro", "prefix"):
        g2, tr, b, B, valid, warned = r[kind]
        rg2, rtr, rb, rB = r[f"ref_{kind}"]
        assert valid and warned, kind
        assert (b, B) == pytest.approx((rb, rB), rel=1e-6), kind
        assert B < sum(map(sum, SIZES.values()))  # the effective batch of unequally weighted units
        assert g2 == pytest.approx(rg2, rel=1e-5), kind
        assert tr == pytest.approx(rtr, rel=1e-5), kind
