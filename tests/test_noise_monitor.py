"""NoiseMonitor on one process: accumulation and split modes, against float64 references and linreg's closed form."""

import copy
import math

import pytest
import torch
from torch import nn

from bigbatch.noise import NoiseMonitor, split_batch, unbiased_estimates
from bigbatch.workloads.linreg import LinReg


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny ops are far slower with intra-op threads on a loaded 2-core CI box.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3))


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 5, generator=g), "y": torch.randn(n, 3, generator=g)}


def sum_loss(model, mb):
    return 0.5 * ((model(mb["x"]) - mb["y"]) ** 2).sum()


def chunks(batch, sizes):
    out, start = [], 0
    for s in sizes:
        out.append({k: v[start : start + s] for k, v in batch.items()})
        start += s
    return out


def run_step(mon, model, micro, *, scale_mode="global"):
    """One step as the bigbatch trainer does it: Σ loss / N over the whole step."""
    n_total = sum(mb["x"].shape[0] for mb in micro)
    mon.begin_step()
    for mb in micro:
        n = mb["x"].shape[0]
        if scale_mode == "global":
            with mon.micro_batch(n):
                (sum_loss(model, mb) / n_total).backward()
        else:  # HF style: per-micro-batch mean divided by the number of micro-batches
            c = 1.0 / (n * len(micro))
            with mon.micro_batch(n, loss_scale=c):
                (sum_loss(model, mb) * c).backward()
    return mon.end_step()


def reference_step(model, micro, group_of, source):
    """float64 from the equations: mean gradients of the small batches by separate autograd.grad
    calls (each micro-batch for source="micro"; the first j micro-batches together, j < k, for
    source="prefix"), the mean over the whole step as the big one, then App. A.1."""
    m64 = copy.deepcopy(model).double()
    params = [p for p in m64.parameters()]
    d64 = [{k: v.double() for k, v in mb.items()} for mb in micro]
    if source == "prefix":
        d64 = [{k: torch.cat([mb[k] for mb in d64[: j + 1]]) for k in d64[0]} for j in range(len(d64) - 1)]
    n = [mb["x"].shape[0] for mb in d64]
    N = sum(mb["x"].shape[0] for mb in micro)
    full = {k: torch.cat([mb[k].double() for mb in micro]) for k in micro[0]}
    mean_grads = [torch.autograd.grad(sum_loss(m64, mb) / nj, params) for mb, nj in zip(d64, n)]
    big = torch.autograd.grad(sum_loss(m64, full) / N, params)
    names = sorted(set(group_of))
    out = {}
    for name in names + [None]:
        sel = [i for i, gname in enumerate(group_of) if name is None or gname == name]
        small = sum(sum(float(g[i].pow(2).sum()) for i in sel) for g in mean_grads) / len(d64)
        bigsq = sum(float(big[i].pow(2).sum()) for i in sel)
        b_small = len(d64) / sum(1.0 / nj for nj in n)
        out[name] = unbiased_estimates(small, bigsq, b_small, N) + (b_small, N)
    return out


@pytest.mark.parametrize("source", ["prefix", "micro"])
def test_step_reading_matches_float64_reference_with_unequal_micro_batches(source):
    model = mlp()
    mon = NoiseMonitor(model, groups="module_type", beta=0.9, source=source)
    micro = chunks(data(24), [10, 8, 6])
    r = run_step(mon, model, micro)
    group_of = ["Linear", "Linear", "LayerNorm", "LayerNorm", "Linear", "Linear"]
    ref = reference_step(model, micro, group_of, source)
    g2, tr, b_small, b_big = ref[None]
    assert r.valid and r.n_updates == 1
    assert r.b_small == pytest.approx(b_small) and r.b_big == 24
    assert r.grad_sqnorm_step == pytest.approx(g2, rel=1e-4)
    assert r.trace_sigma_step == pytest.approx(tr, rel=1e-4)
    # After one update the debiased EMAs equal the single reading.
    assert r.grad_sqnorm == pytest.approx(g2, rel=1e-4) and r.b_simple == pytest.approx(tr / g2, rel=1e-4)
    for name in ("Linear", "LayerNorm"):
        assert r.groups[name]["grad_sqnorm"] == pytest.approx(ref[name][0], rel=1e-4)
        assert r.groups[name]["trace_sigma"] == pytest.approx(ref[name][1], rel=1e-4)
    d = r.as_dict()
    assert {"b_simple", "grad_sqnorm", "trace_sigma", "b_simple/Linear", "trace_sigma/LayerNorm"} <= set(d)


@pytest.mark.parametrize("mode,source", [("accumulation", "micro"), ("accumulation", "prefix"), ("split", "micro"),
                                         ("split", "prefix")])
def test_float64_model_is_read_in_float64(mode, source):
    # vector_norm(dtype=float32) refuses a float64 tensor; the norms must be summed in float64 too.
    model = mlp().double()
    mon = NoiseMonitor(model, groups="module_type", beta=0.9, mode=mode, source=source)
    batch = {k: v.double() for k, v in data(24).items()}
    micro = mon.split_batch(batch) if mode == "split" else chunks(batch, [10, 8, 6])
    assert len(micro) == (2 if mode == "split" else 3)
    r = run_step(mon, model, micro)
    ref = reference_step(model, micro, ["Linear", "Linear", "LayerNorm", "LayerNorm", "Linear", "Linear"], source)
    g2, tr, b_small, _ = ref[None]
    assert r.valid and r.b_small == pytest.approx(b_small)
    # float32 accumulation would be off by ~1e-7 relative; float64 agrees to rounding
    assert r.grad_sqnorm_step == pytest.approx(g2, rel=1e-10)
    assert r.trace_sigma_step == pytest.approx(tr, rel=1e-10)
    assert r.groups["LayerNorm"]["trace_sigma"] == pytest.approx(ref["LayerNorm"][1], rel=1e-10)


def test_split_mode_does_not_split_unmeasured_steps():
    model = mlp()
    mon = NoiseMonitor(model, mode="split", every=3)
    batch = data(16)
    sizes = []
    for _ in range(6):
        pieces = mon.split_batch(batch)  # before begin_step, as a loop that plans its micro-batches
        sizes.append([p["x"].shape[0] for p in pieces])
        run_step(mon, model, pieces)
        model.zero_grad(set_to_none=True)
    assert sizes == [[8, 8], [16], [16], [8, 8], [16], [16]]
    mon.flush()
    assert mon.estimator.n_updates == 2


def test_set_mode_switches_between_split_and_accumulation():
    model = mlp()
    mon = NoiseMonitor(model, mode="split")
    assert (mon.mode, mon.splits) == ("split", 2)
    run_step(mon, model, mon.split_batch(data(16)))
    mon.set_mode("accumulation")
    assert (mon.mode, mon.splits, len(mon.split_batch(data(16)))) == ("accumulation", 1, 1)
    model.zero_grad(set_to_none=True)
    r = run_step(mon, model, chunks(data(16, seed=2), [8, 8]))
    assert r.valid and mon.estimator.n_updates == 2  # the estimators carry on
    with pytest.raises(ValueError, match="noise monitor mode"):
        mon.set_mode("ddp")
    mon.begin_step()
    with pytest.raises(RuntimeError, match="between end_step"):
        mon.set_mode("split")


def test_tied_weights_gradient_seen_once_in_full():
    from bigbatch.workloads.bytelm import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, context=8, vocab=32))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (12, 9), generator=g)
    micro = [{"x": tokens[i : i + 4, :-1], "y": tokens[i : i + 4, 1:]} for i in (0, 4, 8)]
    loss = lambda m, mb: nn.functional.cross_entropy(m(mb["x"]).flatten(0, 1), mb["y"].flatten(), reduction="sum")  # noqa: E731
    mon = NoiseMonitor(model, beta=0.5, source="micro")  # per-parameter hooks
    N = sum(mb["y"].numel() for mb in micro)
    mon.begin_step()
    for mb in micro:
        with mon.micro_batch(mb["y"].numel()):
            (loss(model, mb) / N).backward()
    r = mon.end_step()
    params = list(model.parameters())  # the tied weight once
    means = [torch.autograd.grad(loss(model, mb) / mb["y"].numel(), params) for mb in micro]
    small = sum(sum(float(x.double().pow(2).sum()) for x in gs) for gs in means) / 3
    big = sum(float(p.grad.double().pow(2).sum()) for p in params)
    g2, tr = unbiased_estimates(small, big, 32, 96)
    assert r.grad_sqnorm_step == pytest.approx(g2, rel=1e-3)
    assert r.trace_sigma_step == pytest.approx(tr, rel=1e-3)


def test_monitor_never_changes_gradients():
    micro = chunks(data(16), [4, 4, 8])
    a = mlp()
    for mb in micro:
        (sum_loss(a, mb) / 16).backward()
    for source in ("prefix", "micro"):
        b = mlp()
        run_step(NoiseMonitor(b, groups="parameter", source=source), b, micro)
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa.grad, pb.grad)


@pytest.mark.parametrize("source", ["prefix", "micro"])
def test_explicit_loss_scale_gives_the_same_readings(source):
    micro = chunks(data(24), [8, 8, 8])
    m1, m2 = mlp(), mlp()
    r1 = run_step(NoiseMonitor(m1, source=source), m1, micro)
    r2 = run_step(NoiseMonitor(m2, source=source), m2, micro, scale_mode="micro")
    assert r1.grad_sqnorm_step == pytest.approx(r2.grad_sqnorm_step, rel=1e-5)
    assert r1.trace_sigma_step == pytest.approx(r2.trace_sigma_step, rel=1e-5)


def test_mixing_explicit_and_default_loss_scale_is_an_error():
    model = mlp()
    mon = NoiseMonitor(model)
    micro = chunks(data(8), [4, 4])
    mon.begin_step()
    with mon.micro_batch(4):
        sum_loss(model, micro[0]).backward()
    with mon.micro_batch(4, loss_scale=1.0):
        sum_loss(model, micro[1]).backward()
    with pytest.raises(ValueError, match="loss_scale"):
        mon.end_step()


def test_split_mode_equals_accumulation_with_the_same_pieces():
    batch = data(20)
    m1, m2 = mlp(), mlp()
    split = NoiseMonitor(m1, mode="split", splits=2)
    acc = NoiseMonitor(m2, mode="accumulation")
    assert split.split_batch(batch)[0]["x"].shape[0] == 10 and len(acc.split_batch(batch)) == 1
    for _ in range(3):
        r1 = run_step(split, m1, split.split_batch(batch))
        r2 = run_step(acc, m2, split_batch(batch, 2))
        m1.zero_grad(set_to_none=True)  # a gradient left from the last step would be read as stale
        m2.zero_grad(set_to_none=True)
    assert r1.trace_sigma == pytest.approx(r2.trace_sigma, rel=1e-6)
    assert r1.grad_sqnorm == pytest.approx(r2.grad_sqnorm, rel=1e-6)
    assert r1.n_updates == 3 and r1.b_small == 10 and r1.b_big == 20


def linreg_run(d, sigma, B, k, steps, beta=0.998, mode="accumulation", seed=0, source="micro"):
    wl = LinReg(dim=d, noise_std=sigma, init_distance=1.0, seed=seed)
    model = wl.build_model()  # frozen: no optimizer step, so the truth stays fixed
    mon = NoiseMonitor(model, beta=beta, mode=mode, splits=k, source=source)
    sampler = wl.sampler(seed)
    for _ in range(steps):
        batch = wl.fetch(sampler.next(B))
        micro = mon.split_batch(batch) if mode == "split" else split_batch(batch, k)
        mon.begin_step()
        for mb in micro:
            with mon.micro_batch(wl.count(mb)):
                loss, _ = wl.loss(model, mb)
                (loss / B).backward()
        r = mon.end_step()
        model.zero_grad(set_to_none=True)
    return r, wl, model


@pytest.mark.parametrize("d,sigma,B,k", [(8, 0.5, 64, 4), (32, 1.0, 128, 8), (16, 0.0, 64, 4)])
def test_linreg_oracle_accumulation(d, sigma, B, k):
    r, wl, model = linreg_run(d, sigma, B, k, steps=800)
    truth = wl.true_b_simple(model)  # 1 + d(1 + σ²/|δ|²)
    assert r.b_simple == pytest.approx(truth, rel=0.05)
    assert r.trace_sigma == pytest.approx(wl.true_trace_sigma(model), rel=0.05)
    assert r.grad_sqnorm == pytest.approx(float(wl.delta(model).pow(2).sum()), rel=0.05)


def test_linreg_oracle_prefix_source():
    # Nested prefixes do not cancel the signal |G|² the way disjoint micro-batches do, so the
    # readings are noisier (docs/noise.md): more steps for the same 5%.
    r, wl, model = linreg_run(16, 1.0, 64, 4, steps=3000, beta=0.9995, source="prefix")
    assert r.b_simple == pytest.approx(wl.true_b_simple(model), rel=0.05)


def test_every_measures_one_step_in_n():
    model = mlp()
    mon = NoiseMonitor(model, every=3)
    rs = []
    for s in range(7):
        rs.append(run_step(mon, model, chunks(data(16, seed=s), [8, 8])))
        assert not mon._handles  # hooks only live inside measured steps
        model.zero_grad()
    assert [r.valid for r in rs] == [True, False, False, True, False, False, True]
    assert mon.estimator.n_updates == 3 and mon.estimator.n_skipped == 0


def test_linreg_oracle_split_mode():
    r, wl, model = linreg_run(8, 0.5, 64, 2, steps=800, mode="split")
    assert r.b_simple == pytest.approx(wl.true_b_simple(model), rel=0.05)


def test_one_micro_batch_gives_no_estimate_and_warns():
    model = mlp()
    mon = NoiseMonitor(model)
    with pytest.warns(RuntimeWarning, match="one micro-batch"):
        r = run_step(mon, model, [data(8)])
        assert not r.valid
    assert math.isnan(r.b_simple) and mon.estimator.n_updates == 0


def test_nan_gradient_step_is_skipped_not_folded():
    model = mlp()
    mon = NoiseMonitor(model, groups="module_type")
    micro = chunks(data(16), [8, 8])
    r0 = run_step(mon, model, micro)
    model.zero_grad()
    before = (r0.grad_sqnorm, r0.trace_sigma)
    mon.begin_step()
    with mon.micro_batch(8):
        (sum_loss(model, micro[0]) * math.nan).backward()
    with mon.micro_batch(8):
        sum_loss(model, micro[1]).backward()
    r = mon.end_step()
    assert not r.valid
    assert (r.grad_sqnorm, r.trace_sigma) == before and mon.estimator.n_updates == 1 and mon.estimator.n_skipped == 1
    assert all(e.n_skipped == 1 and e.n_updates == 1 for e in mon.group_estimators.values())
    model.zero_grad()
    r = run_step(mon, model, micro)  # recovers on the next finite step
    assert r.valid and mon.estimator.n_updates == 2


def test_exception_inside_micro_batch_voids_the_step():
    model = mlp()
    mon = NoiseMonitor(model)
    mon.begin_step()
    with pytest.raises(RuntimeError, match="boom"):
        with mon.micro_batch(4):
            raise RuntimeError("boom")
    assert not mon.end_step().valid


def test_tokens_and_samples():
    micro = chunks(data(24), [12, 12])
    model = mlp()
    mon = NoiseMonitor(model)
    mon.begin_step()
    for mb in micro:  # pretend each example is 8 tokens: counts in tokens, samples in examples
        with mon.micro_batch(12 * 8, samples=12):
            (sum_loss(model, mb) / 24).backward()
    r = mon.end_step()
    assert r.b_big == 192 and r.b_small == 96
    assert r.b_simple_samples == pytest.approx(r.b_simple / 8)
    assert r.as_dict()["b_simple_samples"] == pytest.approx(r.b_simple / 8)


def test_bf16_parameters():
    micro = chunks(data(32), [16, 16])
    m32 = mlp()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    r32 = run_step(NoiseMonitor(m32), m32, micro)
    mon16 = NoiseMonitor(m16)
    mon16.begin_step()
    for mb in micro:
        with mon16.micro_batch(16):
            (sum_loss(m16, {k: v.bfloat16() for k, v in mb.items()}).float() / 32).backward()
    r16 = mon16.end_step()
    # bf16 gradients differ from fp32 ones by ~1%; the norms are reduced in fp32 either way.
    assert r16.valid and r16.trace_sigma_step == pytest.approx(r32.trace_sigma_step, rel=0.05)
    assert abs(r16.grad_sqnorm_step - r32.grad_sqnorm_step) < 0.05 * r32.trace_sigma_step / 16


def test_state_round_trip():
    batches = [chunks(data(16, seed=s), [8, 8]) for s in range(10)]
    ma, mb_ = mlp(), mlp()
    a = NoiseMonitor(ma, groups="module_type", beta=0.8)
    for micro in batches[:5]:
        run_step(a, ma, micro)
        ma.zero_grad()
    b = NoiseMonitor(mb_, groups="module_type", beta=0.8)
    b.load_state_dict(a.state_dict())
    for micro in batches[5:]:
        ra = run_step(a, ma, micro)
        ma.zero_grad()
        rb = run_step(b, mb_, micro)
        mb_.zero_grad()
    assert ra.as_dict() == rb.as_dict()
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="groups"):
        NoiseMonitor(mlp()).load_state_dict(a.state_dict())


def test_readings_are_lazy_and_ordered():
    model = mlp()
    mon = NoiseMonitor(model, beta=0.5, max_pending=100)
    readings = []
    for s in range(4):
        readings.append(run_step(mon, model, chunks(data(16, seed=s), [8, 8])))
        model.zero_grad()
    assert "pending" in repr(readings[0])
    assert [r.n_updates for r in readings] == [1, 2, 3, 4]  # reading the first resolves all, in order
    assert readings[-1].b_simple == mon.estimator.b_simple
    assert readings[0].b_simple != readings[-1].b_simple


def test_usage_errors():
    model = mlp()
    with pytest.raises(ValueError, match="did you mean"):
        NoiseMonitor(model, mode="acumulation")
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        NoiseMonitor(model, mode="ddp")
    with pytest.raises(ValueError, match="splits must be >= 2"):
        NoiseMonitor(model, mode="split", splits=1)
    with pytest.raises(ValueError, match="groups must be"):
        NoiseMonitor(model, groups="layers")
    mon = NoiseMonitor(model)
    with pytest.raises(RuntimeError, match="begin_step"):
        mon.micro_batch(4)
    with pytest.raises(RuntimeError, match="begin_step"):
        mon.end_step()
    mon.begin_step()
    with pytest.raises(ValueError, match="count must be >= 0"):
        mon.micro_batch(-1)
    mon.close()
    with pytest.raises(RuntimeError, match="closed"):
        mon.begin_step()


@pytest.mark.cuda
@pytest.mark.parametrize("source", ["micro", "prefix"])
def test_cuda_bf16_autocast_matches_cpu_reference(source):
    micro = chunks(data(64), [16, 16, 16, 16])
    cpu_model = mlp()
    ref = reference_step(cpu_model, micro, ["Linear", "Linear", "LayerNorm", "LayerNorm", "Linear", "Linear"], source)
    model = copy.deepcopy(cpu_model).cuda()
    mon = NoiseMonitor(model, source=source, groups="module_type")
    mon.begin_step()
    for mb in micro:
        with mon.micro_batch(16), torch.autocast("cuda", dtype=torch.bfloat16):
            (sum_loss(model, {k: v.cuda() for k, v in mb.items()}).float() / 64).backward()
    r = mon.end_step()
    assert r.valid
    # bf16 matmuls: ~1% on the gradients; the norms themselves are reduced in fp32
    assert r.trace_sigma_step == pytest.approx(ref[None][1], rel=0.05)
