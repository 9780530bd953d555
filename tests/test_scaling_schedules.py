"""Schedules of samples seen: closed forms, properties, and the LRScheduler adapter."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.schedules import DECAYS, SampleLR, Schedule

T = 10_000.0


def make(decay, warmup="linear", W=1_000.0, **kw):
    base = dict(
        peak_lr=0.5, decay=decay, warmup=warmup, warmup_samples=W, total_samples=T, epoch_samples=500.0,
        milestones=(3_000.0, 6_000.0, 8_000.0), power_a=200.0, power_b=-0.6,
    )
    base.update(kw)
    return Schedule(**base)


# -- closed forms, written from the equations in the module docstring -----------------------
def test_linear_warmup_and_constant():
    s = make("constant", W=1000.0)
    assert s(0) == 0.0
    assert s(250) == pytest.approx(0.125)
    assert s(1000) == s(5000) == 0.5


def test_exponential_warmup_is_geometric():
    s = make("constant", warmup="exponential", W=1000.0, warmup_start_factor=0.001)
    assert s(0) == pytest.approx(0.5e-3)
    assert s(500) == pytest.approx(0.5 * 0.001**0.5)
    assert s(1000) == pytest.approx(0.5)


def test_poly_cosine_exp_multistep_closed_forms():
    W = 1000.0
    u = (4000.0 - W) / (T - W)
    assert make("poly", poly_power=2.0)(4000) == pytest.approx(0.5 * (1 - u) ** 2)
    assert make("cosine", min_lr_ratio=0.1)(4000) == pytest.approx(0.05 + 0.45 * 0.5 * (1 + math.cos(math.pi * u)))
    assert make("exp", exp_gamma=0.9)(4000) == pytest.approx(0.5 * 0.9 ** (3000 / 500))
    ms = make("multistep", gamma=0.1)
    assert [ms(x) for x in (2999, 3000, 6500, 9000)] == pytest.approx([0.5, 0.05, 0.005, 0.0005])


def test_wsd_shapes():
    # stable until T(1 - f) = 8000, then to the floor at T.
    for shape, g in (("linear", lambda t: 1 - t), ("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t))),
                     ("sqrt", lambda t: 1 - math.sqrt(t))):
        s = make("wsd", decay_fraction=0.2, wsd_decay_shape=shape)
        assert s(7999) == 0.5
        assert s(9000) == pytest.approx(0.5 * g(0.5))
        assert s(T) == pytest.approx(0.0, abs=1e-15)


def test_power_schedule_is_min_of_peak_and_power_law():
    s = Schedule(peak_lr=0.02, decay="power", power_a=4.0, power_b=-0.51)
    for n in (1e3, 1e6, 1e9, 1e12):
        assert s(n) == pytest.approx(min(0.02, 4.0 * n**-0.51))
    # warmup ramps to the power curve at W (Shen et al. 2024, eq. 4), not to the peak
    w = Schedule(peak_lr=1.0, decay="power", warmup_samples=1e6, power_a=4.0, power_b=-0.51)
    assert w(5e5) == pytest.approx(0.5 * 4.0 * 1e6**-0.51)


# -- properties -------------------------------------------------------------------------------
shapes = st.sampled_from(DECAYS)
warmups = st.sampled_from(["linear", "exponential", "none"])


@settings(max_examples=150, deadline=None)
@given(shapes, warmups, st.floats(1.0, 9_000.0), st.floats(0.0, 0.9))
def test_continuous_at_warmup_end_and_nonnegative(decay, warmup, W, floor):
    s = make(decay, warmup=warmup, W=W, min_lr_ratio=floor)
    eps = 1e-7 * W
    assert abs(s(W - eps) - s(W + eps)) <= 1e-5 * s.peak_lr
    for n in (0.0, W / 3, W, (W + T) / 2, T, 2 * T):
        assert s(n) >= 0.0


@settings(max_examples=100, deadline=None)
@given(shapes, warmups, st.floats(1.0, 5_000.0), st.lists(st.floats(0, 2 * T), min_size=2, max_size=20))
def test_monotone_in_warmup_and_in_decay(decay, warmup, W, points):
    s = make(decay, warmup=warmup, W=W)
    pts = sorted(points)
    up = [s(p) for p in pts if p <= W]
    down = [s(p) for p in pts if p >= W]
    if warmup != "none":
        assert all(a <= b * (1 + 1e-12) for a, b in zip(up, up[1:]))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(down, down[1:]))


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(1, 5), st.integers(1, 40))
def test_same_lr_at_same_epoch_for_every_batch_size(decay, log2_batch, quarter_epochs):
    # A loop stepping SampleLR once per batch of B samples: after e epochs the LR is the same
    # for every B (a step-count schedule would be off by the factor between the batch sizes).
    N = 512  # samples per epoch (= make()'s epoch_samples is 500; any fixed unit works)
    lrs = []
    for B in (2**log2_batch, 2 ** (log2_batch + 2), 128):
        opt = _opt()
        sched = SampleLR(opt, make(decay), batch_size=B)
        for _ in range(quarter_epochs * N // 4 // B):
            opt.step()
            sched.step()
        lrs.append(sched.get_last_lr())
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12) and lrs[1] == pytest.approx(lrs[2], rel=1e-12)
    assert lrs[0][0] == pytest.approx(make(decay)(quarter_epochs * N / 4), rel=1e-12)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(peak_lr=-1.0), "peak_lr must be"),
        (dict(decay="cosin"), "did you mean cosine"),
        (dict(warmup="lin"), "unknown warmup shape"),
        (dict(warmup_samples=20_000.0), "warmup_samples must be <= total_samples"),
        (dict(milestones=(5.0, 3.0)), "milestones must be strictly increasing"),
        (dict(total_samples=None, decay="cosine"), "total_samples must be set"),
        (dict(exp_gamma=1.5), "exp_gamma must be in"),
        (dict(warmup_start_factor=float("nan")), "warmup_start_factor must be a number"),
    ],
)
def test_bad_schedule_arguments(kw, match):
    base = dict(peak_lr=0.1, total_samples=T, warmup_samples=100.0)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        Schedule(**base)


def test_bad_samples():
    s = make("cosine")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="samples must be"):
            s(bad)


# -- SampleLR ------------------------------------------------------------------------------------
def _opt():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a], "lr": 0.5}, {"params": [b], "lr": 0.05}], momentum=0.9)


def test_sample_lr_param_groups_keep_their_ratio():
    opt = _opt()
    sched = SampleLR(opt, make("cosine"))
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # linear warmup starts at 0
    opt.step()
    sched.step(samples=4000)
    expect = make("cosine")(4000) / 0.5
    assert sched.get_last_lr() == pytest.approx([0.5 * expect, 0.05 * expect])


def test_plain_step_assumes_fixed_batch():
    opt = _opt()
    sched = SampleLR(opt, make("poly"), batch_size=250)
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.samples == 2500
    assert opt.param_groups[0]["lr"] == pytest.approx(make("poly")(2500))
    with pytest.raises(ValueError, match="samples=..."):
        SampleLR(_opt(), make("poly")).step()


def test_changing_batch_size_keeps_schedule_position():
    # 3 steps of 100 then 2 of 400 samples = 1100 samples: same LR as a run of 11 steps of 100.
    s = make("multistep")
    o1, o2 = _opt(), _opt()
    s1, s2 = SampleLR(o1, s), SampleLR(o2, s)
    o1.step(), o2.step()
    n = 0
    for b in (100, 100, 100, 400, 400):
        n += b
        s1.step(samples=n)
    for i in range(11):
        s2.step(samples=100 * (i + 1))
    assert s1.get_last_lr() == s2.get_last_lr()


def test_state_dict_round_trip(tmp_path):
    opt = _opt()
    sched = SampleLR(opt, make("wsd"), batch_size=300)
    for _ in range(7):
        opt.step()
        sched.step()
    path = tmp_path / "s.pt"
    torch.save(sched.state_dict(), path)
    opt2 = _opt()
    sched2 = SampleLR(opt2, make("wsd"), batch_size=300)
    sched2.load_state_dict(torch.load(path, weights_only=True))
    assert sched2.samples == sched.samples == 2100
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    opt.step(), opt2.step()
    sched.step(), sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_sample_lr_rejects_nan_samples():
    sched = SampleLR(_opt(), make("cosine"))
    with pytest.raises(ValueError, match="samples must be a number"):
        sched.step(samples=float("nan"))
    assert sched.samples == 0.0


# -- one shape dataclass for Recipe (epochs) and Schedule (samples) -------------------------------
def test_recipe_and_schedule_share_one_shape_declaration():
    import dataclasses

    from bigbatch.schedules import SHAPE_FIELDS, ScheduleShape
    from bigbatch.scaling import Recipe

    assert issubclass(Recipe, ScheduleShape) and issubclass(Schedule, ScheduleShape)
    for cls in (Recipe, Schedule):
        own = {f.name for f in dataclasses.fields(cls)} - set(SHAPE_FIELDS)
        # No field of the shape is declared again, under this or another name.
        assert not own & {"warmup", "poly_power", "exp_gamma", "gamma", "min_lr_ratio", "decay_fraction",
                          "wsd_decay_shape", "power_a", "power_b", "warmup_start_factor"}
    shape = dict(warmup="exponential", warmup_start_factor=0.05, poly_power=2.0, exp_gamma=0.9, gamma=0.5,
                 min_lr_ratio=0.1, decay_fraction=0.2, wsd_decay_shape="sqrt", power_a=3.0, power_b=-0.4)
    r = Recipe(batch_size=64, lr=0.1, dataset_size=1000, warmup_epochs=1, budget_epochs=10, schedule="wsd", **shape)
    sched = r.to_schedule()
    assert sched.shape() == r.shape() == shape
    assert (sched.warmup_samples, sched.total_samples) == (1000.0, 10000.0)
    assert list(r.to_dict())[:3] == ["batch_size", "lr", "optimizer"]  # own fields first, then the shape
    assert Recipe.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("kw, match", [(dict(poly_power=0.0), "poly_power must be > 0"),
                                       (dict(wsd_decay_shape="cos"), "did you mean cosine"),
                                       (dict(warmup="exp"), "unknown warmup shape 'exp'")])
def test_a_bad_shape_field_gives_the_same_error_from_recipe_and_schedule(kw, match):
    from bigbatch.scaling import Recipe

    with pytest.raises(ValueError, match=match):
        Recipe(batch_size=64, lr=0.1, **kw)
    with pytest.raises(ValueError, match=match):
        Schedule(peak_lr=0.1, **kw)
