"""Decisions of the noise-scale and norm-test controllers on synthetic noise-scale traces."""

import json
import math
import random
import warnings
from types import SimpleNamespace

import pytest

from bigbatch.adaptive import (
    ControllerState,
    NoiseScaleController,
    NormTestController,
    create_controller,
)


def run_trace(ctrl, readings, batch, *, start_samples=0, step_fn=None):
    """Drive ``ctrl`` as the trainer does: one decision after every step; returns per-step batches.

    ``readings`` is a list of dicts of noise readings, or a function samples -> dict.
    """
    samples, out = start_samples, []
    n = len(readings) if isinstance(readings, list) else step_fn
    for i in range(n):
        samples += batch
        r = readings[i] if isinstance(readings, list) else readings(samples)
        batch = ctrl.next_batch_size(ControllerState(samples=samples, batch_size=batch, step=i + 1, **r))
        out.append((samples, batch))
    return out


def batches(trace):
    return [b for _, b in trace]


# ---------------------------------------------------------------- ControllerState


def test_state_validates_and_converts():
    s = ControllerState(samples=10, batch_size=4, step=2, b_simple=3, grad_sqnorm=None, trace_sigma=float("nan"))
    assert s.b_simple == 3.0 and isinstance(s.b_simple, float)
    assert s.grad_sqnorm is None and math.isnan(s.trace_sigma)
    with pytest.raises(ValueError, match="samples must be an integer >= 0"):
        ControllerState(samples=-1, batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ControllerState(samples=0, batch_size=0)
    with pytest.raises(ValueError, match="b_simple must be a number or None"):
        ControllerState(samples=0, batch_size=4, b_simple="big")


def test_state_from_estimator():
    est = SimpleNamespace(b_simple=12.5, grad_sqnorm=2.0, trace_sigma=25.0, n_updates=3)
    s = ControllerState.from_estimator(est, samples=64, batch_size=32, step=2)
    assert (s.samples, s.batch_size, s.step, s.b_simple, s.grad_sqnorm, s.trace_sigma) == (64, 32, 2, 12.5, 2.0, 25.0)
    s = ControllerState.from_estimator(None, samples=0, batch_size=32)
    assert s.b_simple is None and s.grad_sqnorm is None and s.trace_sigma is None


# ---------------------------------------------------------------- NoiseScaleController: decisions


def decide(ctrl, batch, samples=1000, **readings):
    return ctrl.next_batch_size(ControllerState(samples=samples, batch_size=batch, **readings))


def test_noise_dead_band_and_target():
    c = NoiseScaleController(max_batch=4096)
    assert decide(c, 32, b_simple=63.9) == 32  # below growth·B: inside the hysteresis band
    assert decide(c, 32, b_simple=64.0) == 64  # exactly growth·B
    assert decide(c, 64, b_simple=300.7) == 300  # the target itself (rounded down), more than ×2
    assert decide(c, 300, b_simple=500.0) == 300  # 500 < 600
    assert decide(c, 300, b_simple=1e9) == 4096  # capped at max_batch


def test_noise_c_and_granularity_round_down():
    c = NoiseScaleController(c=2.0, granularity=8, max_batch=4096)
    assert decide(c, 32, b_simple=40.0) == 80  # c·B_simple = 80
    assert decide(c, 80, b_simple=150.0) == 296  # 300 → 296, a multiple of 8
    assert decide(c, 296, b_simple=296.0) == 592  # 592 ≥ 2×296 exactly
    # a target just above growth·B that rounds below it still moves by at least ×growth
    c2 = NoiseScaleController(granularity=24, max_batch=4800)
    assert decide(c2, 24, b_simple=49.0) == 48
    assert decide(c2, 48, b_simple=100.0) == 96  # floor(100/24)*24 = 96 = 2×48


def test_noise_growth_factor_steps():
    c = NoiseScaleController(growth=4.0, max_batch=10_000)
    assert decide(c, 100, b_simple=399.0) == 100
    assert decide(c, 100, b_simple=450.0) == 450
    with pytest.raises(ValueError, match="growth must be > 1"):
        NoiseScaleController(growth=1.0)


def test_noise_last_step_lands_on_max():
    c = NoiseScaleController(max_batch=768)
    # growth·B = 1024 > max: the target only needs to reach the cap, and the step may be < ×2
    assert decide(c, 512, b_simple=700.0) == 512
    assert decide(c, 512, b_simple=768.0) == 768
    assert decide(c, 768, b_simple=1e12) == 768


def test_noise_bounds_are_hard_even_without_readings():
    c = NoiseScaleController(min_batch=64, max_batch=256)
    assert decide(c, 32) == 64
    assert decide(c, 512, b_simple=float("nan")) == 256
    assert [(ch.old, ch.new) for ch in c.changes] == [(32, 64), (512, 256)]


def test_noise_follows_growing_trace_monotone_bounded_realisable():
    # B_simple grows linearly with samples (McCandlish Fig. 5 shape); the batch must track it.
    ctrl = NoiseScaleController(min_batch=32, max_batch=2048, granularity=16)
    trace = run_trace(ctrl, lambda s: {"b_simple": 20 + s / 200}, 32, step_fn=4000)
    bs = batches(trace)
    assert all(b % 16 == 0 and 32 <= b <= 2048 for b in bs)
    assert all(b2 >= b1 for b1, b2 in zip(bs, bs[1:]))
    assert bs[-1] == 2048
    for ch in ctrl.changes:
        target = 20 + ch.samples / 200
        assert ch.new >= 2 * ch.old or ch.new == 2048
        assert ch.new <= max(target, 2 * ch.old) or ch.new == 2048
        assert target >= min(2 * ch.old, 2048)  # it only grew when the target had moved ×2
    # between changes the batch stays within a factor `growth` of the target (tracks it)
    for s, b in trace:
        if b < 2048:
            assert b <= max(32, 20 + s / 200) and 20 + s / 200 < 2 * b + 2 / 200 * b


def test_noise_no_oscillation_on_alternating_trace():
    # Readings flip across the threshold every step: one growth, then the dead band holds.
    ctrl = NoiseScaleController(max_batch=4096)
    bs = batches(run_trace(ctrl, [{"b_simple": 130.0 if i % 2 == 0 else 70.0} for i in range(400)], 64))
    assert bs[0] == 130 and set(bs) == {130}
    assert len(ctrl.changes) == 1


def test_noise_no_oscillation_on_noisy_trace():
    rng = random.Random(0)
    # An EMA-smoothed estimate around a constant B_simple = 300 with 10% noise.
    readings = [{"b_simple": 300.0 * math.exp(rng.gauss(0, 0.1))} for _ in range(3000)]
    ctrl = NoiseScaleController(max_batch=1 << 20, granularity=4)
    bs = batches(run_trace(ctrl, readings, 32))
    changes = [(c.old, c.new) for c in ctrl.changes]
    assert 1 <= len(changes) <= 2, changes
    assert 200 <= bs[-1] <= 600
    # a naive follower (batch = reading, no band) would change at almost every step
    naive = [int(r["b_simple"]) // 4 * 4 for r in readings]
    assert sum(a != b for a, b in zip(naive, naive[1:])) > 1000


def test_noise_patience_ignores_isolated_spikes():
    readings = [{"b_simple": 1000.0 if i % 50 == 10 else 50.0} for i in range(500)]
    ctrl = NoiseScaleController(max_batch=4096, patience=2)
    assert set(batches(run_trace(ctrl, readings, 64))) == {64}
    ctrl1 = NoiseScaleController(max_batch=4096, patience=1)
    assert batches(run_trace(ctrl1, readings, 64))[-1] == 1000
    # two consecutive high readings do trigger with patience 2
    readings[100] = readings[101] = {"b_simple": 1000.0}
    ctrl2 = NoiseScaleController(max_batch=4096, patience=2)
    trace = run_trace(ctrl2, readings, 64)
    assert batches(trace)[100] == 64 and batches(trace)[101] == 1000


def test_noise_min_interval():
    # B_simple doubles every 2000 samples; changes must be ≥ 4000 samples apart.
    def readings(s):
        return {"b_simple": 16.0 * 2 ** min(s // 2000, 12)}

    ctrl = NoiseScaleController(max_batch=1 << 16, min_interval=4000)
    trace = run_trace(ctrl, readings, 16, step_fn=600)
    at = [c.samples for c in ctrl.changes]
    assert len(at) >= 3
    # the batch the trainer is handed switches exactly where the log says it does
    assert [s for (s, b), prev in zip(trace, [16] + batches(trace)) if b != prev] == at
    assert at[0] >= 4000  # the clock starts at the first call (samples=16)
    assert all(b - a >= 4000 for a, b in zip(at, at[1:]))
    fast = NoiseScaleController(max_batch=1 << 16, min_interval=0)
    run_trace(fast, readings, 16, step_fn=600)
    assert fast.changes[0].samples < 4000 and len(fast.changes) > len(at)


def test_start_samples_delays_decisions():
    ctrl = NoiseScaleController(max_batch=1024, start_samples=1000)
    trace = run_trace(ctrl, lambda s: {"b_simple": 500.0}, 100, step_fn=20)
    assert trace[8] == (900, 100) and trace[9] == (1000, 500)


def test_invalid_readings_are_ignored():
    bad = [{"b_simple": None}, {"b_simple": float("nan")}, {"b_simple": float("inf")}, {"b_simple": -50.0}, {"b_simple": 0.0}]
    ctrl = NoiseScaleController(max_batch=1024, patience=2)
    assert set(batches(run_trace(ctrl, bad * 20, 32))) == {32}
    # NaN between two high readings neither counts towards patience nor resets it
    ctrl = NoiseScaleController(max_batch=1024, patience=2)
    seq = [{"b_simple": 200.0}, {"b_simple": float("nan")}, {"b_simple": None}, {"b_simple": 200.0}]
    assert batches(run_trace(ctrl, seq, 32)) == [32, 32, 32, 200]


def test_current_batch_must_be_realisable():
    ctrl = NoiseScaleController(granularity=8, max_batch=64)
    with pytest.raises(ValueError, match="not a multiple of granularity 8"):
        decide(ctrl, 12, b_simple=100.0)


# ---------------------------------------------------------------- NormTestController


def norm_test_fails(g2, tr, b, eta, sample_norm=False):
    """Float64 reference from the equations: E‖g_B − ∇F‖² = tr(Σ)/B vs η²·(|G|² or E‖g_B‖²)."""
    rhs = g2 + tr / b if sample_norm else g2
    return tr / b > eta**2 * rhs


def test_normtest_closed_form():
    c = NormTestController(eta=0.5, max_batch=4096)
    # tr(Σ)/(η²|G|²) = 100/(0.25·1) = 400: the batch at which the test holds
    assert decide(c, 64, grad_sqnorm=1.0, trace_sigma=100.0) == 400
    assert decide(c, 400, grad_sqnorm=1.0, trace_sigma=100.0) == 400  # tr/B = η²|G|²: passes
    assert decide(c, 400, grad_sqnorm=1.0, trace_sigma=100.5) == 800  # fails barely: ×2 minimum
    # rounded up to granularity so the test holds at the new batch
    c8 = NormTestController(eta=0.5, granularity=48, max_batch=4800)
    assert decide(c8, 48, grad_sqnorm=1.0, trace_sigma=100.0) == 432
    assert not norm_test_fails(1.0, 100.0, 432, 0.5)


def test_normtest_sample_norm_closed_form():
    c = NormTestController(eta=0.5, sample_norm=True, max_batch=1 << 20)
    # requested = tr/(η²(|G|² + tr/B)) = 100/(0.25·(1 + 100/50)) = 133.33 → 134 (up)
    assert decide(c, 50, grad_sqnorm=1.0, trace_sigma=100.0) == 134


@pytest.mark.parametrize("sample_norm", [False, True])
def test_normtest_grows_iff_reference_test_fails(sample_norm):
    rng = random.Random(1)
    for _ in range(500):
        g2 = 10 ** rng.uniform(-3, 1)
        tr = 10 ** rng.uniform(-1, 4)
        b = rng.randint(1, 512)
        eta = rng.uniform(0.1, 2.0)
        c = NormTestController(eta=eta, sample_norm=sample_norm)
        new = decide(c, b, grad_sqnorm=g2, trace_sigma=tr)
        assert (new > b) == norm_test_fails(g2, tr, b, eta, sample_norm)
        if new > b:
            rhs = g2 + tr / b if sample_norm else g2
            assert new == max(math.ceil(tr / (eta**2 * rhs) - 1e-9), 2 * b)


def test_normtest_invalid_and_negative_readings():
    c = NormTestController(eta=0.5, max_batch=4096, patience=2)
    seq = [
        {"grad_sqnorm": 1.0, "trace_sigma": 100.0},  # fails (streak 1)
        {"grad_sqnorm": None, "trace_sigma": 100.0},  # ignored
        {"grad_sqnorm": -1.0, "trace_sigma": 100.0},  # |G|² ≤ 0: ignored
        {"grad_sqnorm": 1.0, "trace_sigma": float("nan")},  # ignored
        {"grad_sqnorm": 1.0, "trace_sigma": 100.0},  # fails again (streak 2): grow
    ]
    assert batches(run_trace(c, seq, 64)) == [64, 64, 64, 64, 400]
    c = NormTestController(eta=0.5, max_batch=4096, patience=2)
    seq[2] = {"grad_sqnorm": 1.0, "trace_sigma": -3.0}  # no measurable noise: test passes, streak resets
    assert batches(run_trace(c, seq, 64)) == [64, 64, 64, 64, 64]


def test_normtest_noisy_trace_monotone_bounded():
    rng = random.Random(2)
    readings = [{"grad_sqnorm": math.exp(rng.gauss(0, 0.1)), "trace_sigma": 100.0 * math.exp(rng.gauss(0, 0.1))} for _ in range(2000)]
    ctrl = NormTestController(eta=0.5, max_batch=8192, granularity=8, min_interval=5000)
    bs = batches(run_trace(ctrl, readings, 64))
    assert all(b2 >= b1 for b1, b2 in zip(bs, bs[1:]))
    assert all(b % 8 == 0 and b <= 8192 for b in bs)
    assert all(c.new >= 2 * c.old or c.new == 8192 for c in ctrl.changes)
    at = [c.samples for c in ctrl.changes]
    assert all(b - a >= 5000 for a, b in zip(at, at[1:]))


# ---------------------------------------------------------------- state_dict round trip


@pytest.mark.parametrize(
    "name,kwargs,key",
    [
        ("noise", {"max_batch": 1 << 14, "granularity": 4, "min_interval": 3000, "patience": 3}, "noise"),
        ("normtest", {"eta": 0.7, "max_batch": 1 << 14, "granularity": 4, "min_interval": 3000, "patience": 3}, "norm"),
    ],
)
def test_state_dict_round_trip_mid_trace(name, kwargs, key):
    rng = random.Random(3)

    def reading(i):
        level = 20.0 * 1.003**i
        if key == "noise":
            return {"b_simple": level * math.exp(rng.gauss(0, 0.3)) if i % 7 else float("nan")}
        return {"grad_sqnorm": math.exp(rng.gauss(0, 0.3)), "trace_sigma": level * math.exp(rng.gauss(0, 0.3))}

    readings = [reading(i) for i in range(1500)]
    a = create_controller(name, **kwargs)
    samples, batch = 0, 16
    for i in range(700):
        samples += batch
        batch = a.next_batch_size(ControllerState(samples=samples, batch_size=batch, step=i + 1, **readings[i]))
    assert a.changes, "the trace must have moved the batch before the snapshot"
    sd = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable (goes into checkpoints)
    b = create_controller(name, **kwargs)
    b.load_state_dict(sd)
    assert sd["last_change"] is not None
    ba = bb = batch
    for i in range(700, 1500):
        samples += ba
        kw = dict(samples=samples, step=i + 1, **readings[i])
        ba = a.next_batch_size(ControllerState(batch_size=ba, **kw))
        bb = b.next_batch_size(ControllerState(batch_size=bb, **kw))
        assert ba == bb
    assert a.changes == b.changes and len(a.changes) > len(sd["changes"])


def test_state_dict_carries_the_interval_clock_and_streak():
    kw = {"max_batch": 4096, "min_interval": 1000, "patience": 2}
    a = NoiseScaleController(**kw)
    assert decide(a, 32, samples=0, b_simple=100.0) == 32  # clock starts, streak 1
    assert decide(a, 32, samples=1000, b_simple=100.0) == 100  # streak 2, interval passed
    assert decide(a, 100, samples=1100, b_simple=400.0) == 100  # streak 1
    sd = a.state_dict()
    assert (sd["last_change"], sd["streak"]) == (1000, 1)
    b = NoiseScaleController(**kw)
    b.load_state_dict(sd)
    fresh = NoiseScaleController(**kw)
    for s in (1200, 1900, 2000):
        assert decide(a, 100, samples=s, b_simple=400.0) == decide(b, 100, samples=s, b_simple=400.0)
    assert [c.samples for c in b.changes] == [1000, 2000]
    # without the state, the clock and the streak restart: the decision comes at a different time
    assert [decide(fresh, 100, samples=s, b_simple=400.0) for s in (1200, 1900, 2000, 2200)] == [100, 100, 100, 400]


def test_load_state_dict_rejects_other_controller():
    with pytest.raises(ValueError, match="state_dict is for controller 'noise', not 'normtest'"):
        NormTestController().load_state_dict(NoiseScaleController().state_dict())


# ---------------------------------------------------------------- settled estimates


def test_noisy_first_reading_is_not_acted_on_until_settled():
    from bigbatch.noise import NoiseScale

    # A stream whose first readings are far off (B_simple 284 at batch 128, as in a real mnist1d run)
    # and then settle around 300: the controller must wait for min_readings and a small spread.
    est = NoiseScale(beta=0.99)
    ctrl = NoiseScaleController(min_readings=20, max_rse=0.1)
    rng = random.Random(0)
    batch, samples, changed_at = 128, 0, None
    for i in range(400):
        g2 = (1.0 if i else 0.35) + rng.gauss(0, 0.1)
        tr = 300.0 + rng.gauss(0, 30.0)
        est.update(g2 + tr / 64, g2 + tr / 128, 64, 128)
        samples += batch
        state = ControllerState.from_estimator(est, samples=samples, batch_size=batch, step=i + 1)
        new = ctrl.next_batch_size(state)
        if i == 0:
            assert est.b_simple > 2 * 128 and new == 128  # a request for growth, but one reading
            assert ctrl.settled == {"settled": False, "readings": 1, "rse": math.inf}
        if new != batch and changed_at is None:
            changed_at = i + 1
            assert state.n_readings >= 20 and state.b_simple_rse <= 0.1
        batch = new
    # one change, to c·B_simple ≈ 300, once 20 readings had settled it
    assert changed_at == 20 and 256 <= batch <= 330 and len(ctrl.changes) == 1
    assert ctrl.state_dict()["readings_at_change"] == changed_at  # the count restarts at a change


def test_settled_needs_min_readings_since_the_last_change():
    ctrl = NoiseScaleController(min_readings=5, max_rse=0.2)
    kw = {"b_simple_rse": 0.05}
    assert decide(ctrl, 32, b_simple=100.0, n_readings=4, **kw) == 32
    assert ctrl.settled == {"settled": False, "readings": 4, "rse": 0.05}
    assert decide(ctrl, 32, b_simple=100.0, n_readings=5, **kw) == 100
    # the next change needs 5 readings counted from the change (at reading 5)
    assert decide(ctrl, 100, b_simple=1000.0, n_readings=9, **kw) == 100
    assert decide(ctrl, 100, b_simple=1000.0, n_readings=10, **kw) == 1000
    # a wide spread is not settled, NaN neither; an unsettled reading does not reset the patience streak
    assert decide(ctrl, 1000, b_simple=5000.0, n_readings=100, b_simple_rse=0.3) == 1000
    assert decide(ctrl, 1000, b_simple=5000.0, n_readings=100, b_simple_rse=float("nan")) == 1000
    assert ctrl.settled["settled"] is False


def test_settled_state_round_trip_and_resume():
    a = NormTestController(min_readings=3, max_rse=0.5)
    b = NormTestController(min_readings=3, max_rse=0.5)
    kw = {"grad_sqnorm": 1.0, "trace_sigma": 500.0, "b_simple_rse": 0.1}
    assert decide(a, 64, n_readings=3, **kw) == 500
    assert decide(a, 500, n_readings=4, grad_sqnorm=1.0, trace_sigma=5000.0, b_simple_rse=0.1) == 500
    sd = json.loads(json.dumps(a.state_dict()))
    assert sd["settled"] == {"settled": False, "readings": 1, "rse": 0.1}
    assert sd["config"]["min_readings"] == 3 and sd["config"]["max_rse"] == 0.5
    b.load_state_dict(sd)
    assert b.settled == a.settled
    for n in (5, 6):
        assert decide(a, 500, n_readings=n, grad_sqnorm=1.0, trace_sigma=5000.0, b_simple_rse=0.1) == \
            decide(b, 500, n_readings=n, grad_sqnorm=1.0, trace_sigma=5000.0, b_simple_rse=0.1)
    assert a.changes == b.changes and a.changes[-1].new == 5000


def test_state_without_spread_fields_warns_once():
    ctrl = NoiseScaleController()
    with pytest.warns(RuntimeWarning, match="no n_readings") as caught:
        assert decide(ctrl, 32, b_simple=100.0) == 100  # the caller vouches: criterion skipped, but said so
        decide(ctrl, 100, b_simple=100.0)
    assert len([w for w in caught if "n_readings" in str(w.message)]) == 1
    quiet = NoiseScaleController(min_readings=0, max_rse=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decide(quiet, 32, b_simple=100.0) == 100


def test_needs_noise_and_settled_arguments():
    from bigbatch.adaptive import RampController

    assert NoiseScaleController.needs_noise and NormTestController.needs_noise
    assert not RampController(start_batch=8, end_batch=16, ramp_samples=10).needs_noise
    with pytest.raises(ValueError, match="min_readings must be"):
        NoiseScaleController(min_readings=-1)
    with pytest.raises(ValueError, match="max_rse must be > 0"):
        NormTestController(max_rse=0.0)
    with pytest.raises(ValueError, match="unknown argument.*max_batch_size"):
        create_controller("noise", max_batch_size=64)
    c = create_controller("normtest", eta=0.5, max_rse=0.3, min_readings=4, granularity=8)
    assert (c.eta, c.max_rse, c.min_readings, c.granularity) == (0.5, 0.3, 4, 8)
    # the growth arguments are forwarded, not repeated: one signature, errors still name the argument
    with pytest.raises(ValueError, match="patience must be"):
        NormTestController(patience=0)


def test_defaults_on_recorded_mnist1d_readings():
    # (step, readings, B_simple, rse) recorded from `bigbatch train --workload mnist1d --adaptive noise
    # --noise-scale` with the batch held at 128: the early high readings were not settled, a later one is.
    ctrl = NoiseScaleController()
    for step, n, b, rse in [(20, 10, 284.2, 0.28), (30, 20, 361.9, 0.565), (40, 30, 161.0, 0.259)]:
        assert decide(ctrl, 128, samples=128 * step, b_simple=b, n_readings=n, b_simple_rse=rse) == 128
    assert decide(ctrl, 128, samples=128 * 1290, b_simple=267.7, n_readings=1280, b_simple_rse=0.113) == 267


def test_state_from_estimator_carries_settledness_and_converts_units():
    from bigbatch.noise import NoiseScale

    est = NoiseScale(beta=0.9)
    for i in range(5):
        est.update(3.0 + 0.1 * i, 1.0, 8, 64)
    s = ControllerState.from_estimator(est, samples=64, batch_size=32, step=2, units_per_sample=4.0)
    assert s.n_readings == 5 and s.b_simple_rse == est.b_simple_rse and math.isfinite(s.b_simple_rse)
    assert s.b_simple == pytest.approx(est.b_simple / 4) and s.trace_sigma == pytest.approx(est.trace_sigma / 4)
    assert s.grad_sqnorm == est.grad_sqnorm  # |G|² has no unit of batch
    nan_ups = ControllerState.from_estimator(est, samples=64, batch_size=32, units_per_sample=float("nan"))
    assert nan_ups.b_simple == est.b_simple  # unknown units per sample: no conversion
    with pytest.raises(ValueError, match="n_readings must be an integer >= 0"):
        ControllerState(samples=0, batch_size=4, n_readings=-1)
