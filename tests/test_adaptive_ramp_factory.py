"""RampController exactness, the factory and argument validation of every controller."""

import pytest

from bigbatch.adaptive import (
    CONTROLLERS,
    ControllerState,
    NoiseScaleController,
    NormTestController,
    RampController,
    create_controller,
)


def megatron_ramp(start, increment, ramp_samples, end, consumed):
    """Megatron-LM's RampupBatchsizeNumMicroBatches.update, transcribed (float arithmetic)."""
    num_increments = (end - start) // increment
    per_increment = ramp_samples / num_increments
    if consumed > ramp_samples:
        return end
    return start + int(consumed / per_increment) * increment


def test_ramp_matches_megatron_formula():
    r = RampController(start_batch=32, end_batch=256, increment=32, ramp_samples=7000)
    for s in range(0, 9000, 7):
        assert r.batch_size_at(s) == megatron_ramp(32, 32, 7000, 256, s), s
    assert r.batch_size_at(0) == 32 and r.batch_size_at(999) == 32 and r.batch_size_at(1000) == 64
    assert r.batch_size_at(6999) == 224 and r.batch_size_at(7000) == 256 and r.batch_size_at(10**12) == 256


def test_ramp_exact_where_floats_round():
    # 3 increments over 10 samples: per-increment 10/3 is not representable; exact boundaries are
    # ceil(10k/3) = 4, 7, 10.
    r = RampController(start_batch=8, end_batch=32, increment=8, ramp_samples=10)
    assert [r.batch_size_at(s) for s in range(12)] == [8, 8, 8, 8, 16, 16, 16, 24, 24, 24, 32, 32]


def test_ramp_in_a_loop_and_changes_logged():
    r = RampController(start_batch=16, end_batch=64, increment=16, ramp_samples=600, granularity=16)
    samples, batch = 0, r.next_batch_size(ControllerState(samples=0, batch_size=16))
    seen = []
    while samples < 1000:
        samples += batch
        batch = r.next_batch_size(ControllerState(samples=samples, batch_size=batch, b_simple=float("nan")))
        seen.append((samples, batch))
    assert all(b == megatron_ramp(16, 16, 600, 64, s) for s, b in seen)
    assert [(c.old, c.new) for c in r.changes] == [(16, 32), (32, 48), (48, 64)]
    assert [c.samples for c in r.changes] == [208, 400, 640]  # first sample counts at or past 200, 400, 600


def test_ramp_default_increment_and_constant():
    r = RampController(start_batch=8, end_batch=16, ramp_samples=100, granularity=4)
    assert r.increment == 4 and r.batch_size_at(50) == 12
    flat = RampController(start_batch=64, end_batch=64, ramp_samples=100)
    assert {flat.batch_size_at(s) for s in range(0, 300, 10)} == {64}


def test_ramp_state_dict_round_trip():
    a = RampController(start_batch=8, end_batch=32, ramp_samples=100, increment=8)
    a.next_batch_size(ControllerState(samples=40, batch_size=8))
    b = RampController(start_batch=8, end_batch=32, ramp_samples=100, increment=8)
    b.load_state_dict(a.state_dict())
    assert b.changes == a.changes
    for s in range(40, 200, 9):
        assert a.next_batch_size(ControllerState(samples=s, batch_size=16)) == b.next_batch_size(
            ControllerState(samples=s, batch_size=16)
        )
    assert a.changes == b.changes


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"start_batch": 0, "end_batch": 8, "ramp_samples": 10}, "start_batch must be a positive integer"),
        ({"start_batch": 16, "end_batch": 8, "ramp_samples": 10}, "end_batch must be >= start_batch 16"),
        ({"start_batch": 8, "end_batch": 16, "ramp_samples": 0}, "ramp_samples must be a positive integer"),
        ({"start_batch": 8, "end_batch": 20, "ramp_samples": 10, "increment": 8}, "increment must divide end_batch - start_batch = 12"),
        ({"start_batch": 6, "end_batch": 16, "ramp_samples": 10, "granularity": 4}, "start_batch must be a multiple of granularity 4"),
        ({"start_batch": 8, "end_batch": 16, "ramp_samples": 10, "granularity": 4, "increment": 2}, "increment must be a multiple"),
    ],
)
def test_ramp_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RampController(**kwargs)


@pytest.mark.parametrize("cls", [NoiseScaleController, NormTestController])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"min_batch": 0}, "min_batch must be a positive integer"),
        ({"max_batch": -4}, "max_batch must be a positive integer"),
        ({"min_batch": 64, "max_batch": 32}, "max_batch must be >= min_batch 64"),
        ({"min_batch": 12, "granularity": 8}, "min_batch must be a multiple of granularity 8"),
        ({"max_batch": 100, "granularity": 8}, "max_batch must be a multiple of granularity 8"),
        ({"growth": 1.0}, "growth must be > 1"),
        ({"growth": float("inf")}, "growth must be > 1"),
        ({"growth": "x"}, "growth must be a number > 1"),
        ({"min_interval": -1}, "min_interval must be an integer >= 0"),
        ({"granularity": 0}, "granularity must be a positive integer"),
        ({"patience": 0}, "patience must be a positive integer"),
        ({"start_samples": 1.5}, "start_samples must be an integer >= 0"),
    ],
)
def test_growth_controller_validation(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_c_and_eta_validation(bad):
    with pytest.raises(ValueError, match="c must be"):
        NoiseScaleController(c=bad)
    with pytest.raises(ValueError, match="eta must be"):
        NormTestController(eta=bad)
    with pytest.raises(ValueError, match="sample_norm must be true or false"):
        NormTestController(sample_norm="yes")


def test_factory_names_and_errors():
    assert set(CONTROLLERS) == {"noise", "normtest", "ramp", "schedule"}
    assert isinstance(create_controller("noise", c=2, max_batch=64), NoiseScaleController)
    assert isinstance(create_controller("normtest", eta=0.5), NormTestController)
    r = create_controller("ramp", start_batch=8, end_batch=16, ramp_samples=10)
    assert isinstance(r, RampController) and "RampController(start_batch=8" in repr(r)
    with pytest.raises(ValueError, match="unknown adaptive controller 'noize' \\(did you mean noise"):
        create_controller("noize")
    with pytest.raises(ValueError, match="unknown argument\\(s\\) eta for controller 'noise'; valid: c, min_batch"):
        create_controller("noise", eta=0.5)
    with pytest.raises(ValueError, match="controller 'ramp' needs argument\\(s\\) start_batch, end_batch, ramp_samples"):
        create_controller("ramp")


def test_controller_config_in_state_dict():
    c = create_controller("noise", c=2.0, max_batch=256, granularity=8)
    sd = c.state_dict()
    assert sd["name"] == "noise" and sd["config"]["c"] == 2.0 and sd["config"]["max_batch"] == 256
