"""The batch-size-aware weight EMA (Busbridge et al. 2023): scaling rule, buffers, state."""

import math

import pytest
import torch
from torch import nn

from bigbatch.averaging import EMA


def _set(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _lin(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Linear(3, 2).to(dtype)


@pytest.mark.parametrize("B,n", [(1, 50), (8, 25), (64, 7)])
def test_batch_B_n_steps_equals_batch_1_nB_steps_on_constant_target(B, n):
    horizon = 100.0
    m = _lin()
    theta0 = {k: v.clone() for k, v in m.state_dict().items()}
    big, small = EMA(m, horizon_samples=horizon), EMA(m, horizon_samples=horizon)
    _set(m, 2.5)  # the constant target θ*
    for _ in range(n):
        big.update(m, B)
    for _ in range(n * B):
        small.update(m, 1)
    assert big.samples == small.samples == n * B
    for k in theta0:
        torch.testing.assert_close(big.shadow[k], small.shadow[k], rtol=1e-12, atol=1e-12)
        # closed form: θ* + ρ^{nB} (θ0 − θ*) with ρ = exp(−1/H)
        ref = 2.5 + math.exp(-n * B / horizon) * (theta0[k] - 2.5)
        torch.testing.assert_close(big.shadow[k], ref, rtol=1e-12, atol=1e-12)


def test_float64_reference_with_varying_batch_sizes():
    m = _lin(torch.float32)
    ema = EMA(m, decay_per_sample=0.99)
    ref = {k: v.detach().double().clone() for k, v in m.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for B in [1, 4, 32, 7, 128, 3]:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update(m, B)
        rho_b = 0.99**B  # written from the definition, not from the module
        for k, p in m.named_parameters():
            ref[k] = rho_b * ref[k] + (1 - rho_b) * p.detach().double()
    for k in ref:
        torch.testing.assert_close(ema.shadow[k].double(), ref[k], rtol=1e-6, atol=1e-6)


def test_decay_parametrisations_agree():
    m = _lin()
    a = EMA(m, horizon_samples=1000)
    assert a.decay_per_sample**1000 == pytest.approx(math.exp(-1))
    assert a.horizon_samples == pytest.approx(1000)
    # a step-based recipe: 0.9999 at batch 256, carried to 1024 by ρ̂ = ρ^κ, κ = 4
    b = EMA(m, decay=0.9999, batch_size=256)
    assert b.decay_at(256) == pytest.approx(0.9999, rel=1e-12)
    assert b.decay_at(1024) == pytest.approx(0.9999**4, rel=1e-12)
    c = EMA(m, decay_per_sample=b.decay_per_sample)
    assert c.decay_at(77) == pytest.approx(b.decay_at(77), rel=1e-12)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({}, "exactly one"),
        ({"horizon_samples": 10, "decay_per_sample": 0.9}, "exactly one"),
        ({"horizon_samples": -1}, "horizon_samples must be > 0"),
        ({"decay_per_sample": 1.0}, r"decay_per_sample must be in \(0.0, 1.0\)"),
        ({"decay_per_sample": float("nan")}, "decay_per_sample must be a number"),
        ({"decay": 0.99}, "needs the batch_size"),
        ({"decay": 0.99, "batch_size": 0}, "batch_size must be a positive integer"),
        ({"horizon_samples": 10, "batch_size": 4}, "only used with decay"),
        ({"horizon_samples": 10, "buffers": "mean"}, "unknown buffers mode 'mean'"),
    ],
)
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        EMA(_lin(), **kw)


def test_update_rejects_bad_batch_and_other_models():
    m = _lin()
    ema = EMA(m, horizon_samples=10)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ema.update(m, 0)
    with pytest.raises(ValueError, match="does not match the EMA"):
        ema.update(nn.Sequential(m), 4)
    with pytest.raises(ValueError, match="shape"):
        ema.update(nn.Linear(3, 5).double(), 4)


def test_buffers_copy_and_average():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    copy, avg = EMA(net, horizon_samples=8, buffers="copy"), EMA(net, horizon_samples=8, buffers="average")
    mean0 = net[1].running_mean.clone()
    net(torch.randn(16, 4) + 3)  # train mode: the running statistics move
    copy.update(net, 16)
    avg.update(net, 16)
    rho = math.exp(-16 / 8)
    assert torch.equal(copy.shadow["1.running_mean"], net[1].running_mean)
    torch.testing.assert_close(avg.shadow["1.running_mean"], rho * mean0 + (1 - rho) * net[1].running_mean)
    for _ in range(2):
        net(torch.randn(16, 4))
        copy.update(net, 16)
        avg.update(net, 16)
    # integer buffers are counters, never averaged
    assert int(copy.shadow["1.num_batches_tracked"]) == int(avg.shadow["1.num_batches_tracked"]) == 3
    assert copy.shadow["1.num_batches_tracked"].dtype == torch.int64


def test_applied_swaps_and_restores():
    m = _lin()
    ema = EMA(m, horizon_samples=4)
    _set(m, 1.0)
    ema.update(m, 4)
    _set(m, 3.0)
    x = torch.randn(5, 3, dtype=torch.float64)
    live = m(x)
    with ema.applied(m) as same:
        assert same is m
        for k, p in m.named_parameters():
            assert torch.equal(p, ema.shadow[k])
        inside = m(x)
    assert torch.equal(m(x), live) and not torch.allclose(inside, live)
    with pytest.raises(RuntimeError):
        with ema.applied(m):
            raise RuntimeError("boom")
    assert torch.equal(m(x), live)  # restored on an exception too


def test_low_precision_model_is_averaged_in_fp32():
    m = _lin(torch.bfloat16)
    ema = EMA(m, horizon_samples=1e6)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    before = ema.shadow["weight"].clone()
    _set(m, 1.0)
    ema.update(m, 1)  # a 1e-6 step that bf16 would round away
    assert not torch.equal(ema.shadow["weight"], before)
    ema.copy_to(m)
    assert m.weight.dtype == torch.bfloat16


def test_nonfinite_weights_raise_or_skip_and_never_enter_the_average():
    m = _lin()
    ema = EMA(m, horizon_samples=10)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        m.bias[0] = float("nan")
    with pytest.raises(ValueError, match="'bias' has NaN or inf"):
        ema.update(m, 2)
    assert all(torch.equal(before[k], ema.shadow[k]) for k in before) and ema.samples == 0
    skip = EMA(_lin(), horizon_samples=10, on_nonfinite="skip")
    kept = {k: v.clone() for k, v in skip.shadow.items()}
    skip.update(m, 2)
    assert skip.skipped == 1
    assert all(torch.equal(kept[k], skip.shadow[k]) for k in kept)
    with torch.no_grad():
        m.bias[0] = 0.0
    skip.update(m, 2)  # finite again: applied
    assert skip.skipped == 1 and not torch.equal(kept["bias"], skip.shadow["bias"])
    # a non-finite buffer is not copied either
    bn = nn.BatchNorm1d(2)
    e = EMA(bn, horizon_samples=10, on_nonfinite="skip")
    with torch.no_grad():
        bn.running_mean.fill_(float("inf"))
    e.update(bn, 1)
    assert e.skipped == 1 and torch.isfinite(e.shadow["running_mean"]).all()
    with pytest.raises(ValueError, match="not finite"):
        EMA(nn.BatchNorm1d(2), horizon_samples=10).update(bn, 1)


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(3)
    shapes = {"weight": (2, 3), "bias": (2,)}
    states = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    m = _lin(torch.float32)
    a = EMA(m, horizon_samples=50)
    for sd, B in zip(states[:2], (4, 8)):
        m.load_state_dict(sd)
        a.update(m, B)
    b = EMA(_lin(torch.float32), horizon_samples=1)  # another decay and other weights: all overwritten
    b.load_state_dict(a.state_dict())
    assert b.horizon_samples == pytest.approx(50) and b.samples == 12 and b.updates == 2
    m.load_state_dict(states[2])
    a.update(m, 16)
    b.update(m, 16)
    for k in a.shadow:
        assert torch.equal(a.shadow[k], b.shadow[k]), k
    with pytest.raises(ValueError, match="does not match"):
        EMA(nn.Sequential(nn.Linear(3, 2)), horizon_samples=1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="shape"):
        EMA(nn.Linear(3, 3), horizon_samples=1).load_state_dict(a.state_dict())
