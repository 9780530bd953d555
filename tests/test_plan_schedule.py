"""Batch-size schedules: parsing the threshold form, deriving one from B_crit per target, the controller."""

import warnings

import pytest

from bigbatch.adaptive.base import ControllerState
from bigbatch.adaptive.schedule import (
    ScheduleController,
    format_batch_schedule,
    load_batch_schedule,
    parse_batch_schedule,
)
from bigbatch.plan import TargetFit, derive_schedule, fits_from_results


@pytest.mark.parametrize(
    "text, pairs",
    [
        ("0:64,20000:128", [(0, 64), (20000, 128)]),
        ("0:768 250B:1536", [(0, 768), (250 * 10**9, 1536)]),  # Megatron's example, tokens
        ("0:8, 2.5M:16,\n1T:32", [(0, 8), (2_500_000, 16), (10**12, 32)]),
        ("0:8 1k:16 3m:32", [(0, 8), (1000, 16), (3_000_000, 32)]),
        ("# from bigbatch plan\n0:64   # start\n1000:128\n", [(0, 64), (1000, 128)]),
        ("0:64", [(0, 64)]),
        ("0:64,500:32", [(0, 64), (500, 32)]),  # shrinking is allowed: the schedule is the user's
    ],
)
def test_parse_good(text, pairs):
    assert parse_batch_schedule(text) == pairs
    assert parse_batch_schedule(format_batch_schedule(pairs)) == pairs


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "batch schedule is empty"),
        ("# only a comment", "batch schedule is empty"),
        ("100:64,200:128", "must start at threshold 0"),
        ("0:64,2000:128,1000:256", "strictly increasing, got 1000 after 2000"),
        ("0:64,1000:128,1K:256", "strictly increasing, got 1000 after 1000"),
        ("0:0", "batch size at 0 samples must be a positive integer, got 0"),
        ("0:-4", "must be a positive integer"),
        ("0:64,1e3:128", "threshold '1e3'"),
        ("0:64,abc:128", "threshold 'abc'"),
        ("0:64,100:12.5", "batch size '12.5'"),
        ("0:64;100:128", "must be SAMPLES:BATCH"),
        ("0:64,100", "must be SAMPLES:BATCH"),
        ("0:64,1.5:128", "not a whole number of samples"),
        ("0:64,10X:128", "threshold '10X'"),
    ],
)
def test_parse_bad_one_line(text, message):
    with pytest.raises(ValueError) as e:
        parse_batch_schedule(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_load_from_file_or_inline(tmp_path):
    p = tmp_path / "sched.txt"
    p.write_text("# header\n0:32,100:64\n")
    assert load_batch_schedule(str(p)) == [(0, 32), (100, 64)]
    assert load_batch_schedule("0:32,100:64") == [(0, 32), (100, 64)]
    with pytest.raises(FileNotFoundError, match="batch_schedule file not found"):
        load_batch_schedule(str(tmp_path / "missing.txt"))
    p.write_text("0:32,10:64,5:128")
    with pytest.raises(ValueError, match="sched.txt: batch schedule thresholds must be strictly increasing"):
        load_batch_schedule(p)


def test_controller_follows_thresholds_in_a_loop():
    c = ScheduleController(schedule="0:16,100:32,1000:64", granularity=16)
    samples, batch = 0, c.next_batch_size(ControllerState(samples=0, batch_size=16))
    seen = []
    while samples < 1500:
        samples += batch
        batch = c.next_batch_size(ControllerState(samples=samples, batch_size=batch))
        seen.append((samples, batch))
    assert all(b == (16 if s < 100 else 32 if s < 1000 else 64) for s, b in seen)
    assert [(ch.samples, ch.old, ch.new) for ch in c.changes] == [(112, 16, 32), (1008, 32, 64)]
    assert "threshold 100" in c.changes[0].reason
    assert c.batch_size_at(0) == 16 and c.batch_size_at(99) == 16 and c.batch_size_at(100) == 32 and c.batch_size_at(10**15) == 64


def test_controller_validation():
    with pytest.raises(ValueError, match="multiples of granularity 8"):
        ScheduleController(schedule=[(0, 8), (100, 12)], granularity=8)
    with pytest.raises(ValueError, match="must start at threshold 0"):
        ScheduleController(schedule=[(5, 8)])
    c = ScheduleController(schedule="0:8", granularity=8)
    with pytest.raises(ValueError, match="not a multiple of granularity 8"):
        c.next_batch_size(ControllerState(samples=0, batch_size=12))


def test_controller_state_dict_round_trip_and_resume_mid_schedule():
    sched = "0:8,50:16,200:32,800:64"
    a = ScheduleController(schedule=sched, granularity=8)
    samples, batch = 0, a.next_batch_size(ControllerState(samples=0, batch_size=8))
    while samples < 300:  # stop mid-schedule: past 200, before 800
        samples += batch
        batch = a.next_batch_size(ControllerState(samples=samples, batch_size=batch, step=len(a.changes)))
    sd = a.state_dict()
    assert sd["name"] == "schedule" and sd["schedule"] == sched and len(sd["changes"]) == 2

    b = ScheduleController(schedule=sched, granularity=8)
    b.load_state_dict(sd)
    assert b.changes == a.changes and b.state_dict() == sd
    # Both continue identically from the resumed samples and batch.
    for ctl in (a, b):
        s, bb = samples, batch
        while s < 1000:
            s += bb
            bb = ctl.next_batch_size(ControllerState(samples=s, batch_size=bb))
    assert a.changes == b.changes and [ch.new for ch in b.changes] == [16, 32, 64]

    with pytest.raises(ValueError, match="for controller 'ramp'"):
        b.load_state_dict({**sd, "name": "ramp"})
    edited = ScheduleController(schedule="0:8,50:16,400:32", granularity=8)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        edited.load_state_dict(sd)
    assert any("differs from this run's" in str(x.message) for x in w)


def fit(target, b_noise, s_min):
    return TargetFit(target=target, s_min=s_min, e_min=s_min * b_noise, b_crit=b_noise)


def test_derive_schedule_thresholds_from_the_previous_fit():
    fits = [fit(1.0, 100.0, 100.0), fit(0.7, 300.0, 200.0), fit(0.5, 800.0, 300.0)]
    d = derive_schedule(fits, factor=1.0, granularity=8)
    # batches: round(100/8)*8 = 96, round(300/8)*8 = 304, 800
    # thresholds: E_1(96) = 1e4(1 + 96/100) = 19600; E_2(304) = 6e4(1 + 304/300) = 120800 exactly
    assert d.schedule == [(0, 96), (19600, 304), (120800, 800)]
    assert d.text() == "0:96,19600:304,120800:800"
    assert parse_batch_schedule(d.file_text("runs/study")) == d.schedule
    d2 = derive_schedule(fits, factor=0.5, granularity=1)
    # batches 50, 150, 400; thresholds E_1(50) = 15000, E_2(150) = 90000
    assert d2.schedule == [(0, 50), (15000, 150), (90000, 400)]


def test_derive_schedule_merges_non_growing_and_orders_by_metric():
    res = {"higher_is_better": True, "by_target": [
        {"target": 0.9, "b_crit": 200.0, "s_min": 50.0, "e_min": 1.0e4},
        {"target": 0.8, "b_crit": 100.0, "s_min": 40.0, "e_min": 4.0e3},
        {"target": 0.85, "b_crit": 90.0, "s_min": 45.0, "e_min": 4.05e3},  # noisy: smaller than 0.8's
        {"target": 0.95, "b_crit": None, "reason": "not reached"},
    ]}
    d = derive_schedule(fits_from_results(res), granularity=10)
    # order 0.8, 0.85, 0.9: 0.85 rounds to 90 <= 100, kept at 100; it is passed at E(100) = 4.05e3(1 + 100/90) = 8550
    assert d.schedule == [(0, 100), (8550, 200)]
    assert any("0.85" in n and "only grows" in n for n in d.notes)
    assert any("0.95" in n and "not reached" in n for n in d.notes)


def test_derive_schedule_bad_inputs():
    with pytest.raises(ValueError, match="--factor must be > 0"):
        derive_schedule([fit(1.0, 100.0, 10.0)], factor=0.0)
    with pytest.raises(ValueError, match="--granularity must be a positive integer"):
        derive_schedule([fit(1.0, 100.0, 10.0)], granularity=0)
    with pytest.raises(ValueError, match="none is determined"):
        derive_schedule([TargetFit(target=1.0, s_min=None, e_min=None, b_crit=None, reason="x")])
    one = derive_schedule([fit(1.0, 100.0, 10.0)])
    assert one.schedule == [(0, 100)] and any("constant batch" in n for n in one.notes)
