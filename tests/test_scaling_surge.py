"""The surge check of ``rescale``/``bigbatch scale --b-noise`` (Li et al. 2024, arXiv:2405.14578).

Eq. 2: eps_opt(B) = eps_max / (1/2 (sqrt(B_noise/B) + sqrt(B/B_noise))) for Adam-style optimizers;
Eq. 15: its peak is at B = B_noise; Eq. 4: for B << B_noise it tends to 2 eps_max sqrt(B/B_noise)
(square-root scaling); Eq. 3 is SGD's linear limit, not used here.
"""

import math

import pytest

import bigbatch.cli as cli
from bigbatch.recipe import Recipe
from bigbatch.scaling import rescale, surge_lr_factor


def test_peak_is_at_b_noise():
    # Eq. 15: B_peak = B_noise. The ratio to the value at B_noise is <= 1 everywhere and 1 only there.
    bn = 1000.0
    grid = [bn * 2 ** (i / 8) for i in range(-40, 41)]
    ratios = [surge_lr_factor(bn, b, bn) for b in grid]
    assert max(ratios) == pytest.approx(1.0) and grid[ratios.index(max(ratios))] == pytest.approx(bn)
    assert all(r <= 1.0 + 1e-12 for r in ratios)
    assert surge_lr_factor(bn, 4 * bn, bn) == pytest.approx(surge_lr_factor(bn, bn / 4, bn))  # symmetric in log B


def test_small_batch_limit_is_square_root_scaling():
    # Eq. 4: eps_opt(B) ~ 2 eps_max sqrt(B/B_noise) for B << B_noise, so the ratio tends to sqrt(k).
    assert surge_lr_factor(1.0, 4.0, 1e7) == pytest.approx(2.0, rel=1e-5)
    # Eq. 2 at B = B_noise/4 against B = B_noise: 1 / (1/2 (2 + 1/2)) = 0.8.
    assert surge_lr_factor(1000.0, 250.0, 1000.0) == pytest.approx(0.8)


def test_sqrt_overshoot_is_the_closed_form():
    # sqrt(b1/b0) / (eps(b1)/eps(b0)) = (B_noise + b1)/(B_noise + b0), from Eq. 2.
    for b0, b1, bn in ((64, 4096, 512), (256, 2048, 1000), (1000, 1e6, 1000)):
        assert math.sqrt(b1 / b0) / surge_lr_factor(b0, b1, bn) == pytest.approx((bn + b1) / (bn + b0))


def _adamw(batch=256):
    return Recipe(batch_size=batch, lr=3e-4, optimizer="adamw", betas=(0.9, 0.999), eps=1e-8)


def _surge_notes(res):
    return [n for n in res.notes if "Li et al. 2024" in n]


def test_warns_when_adam_sqrt_goes_past_b_noise():
    res = rescale(_adamw(), 2048, "adam-sqrt", b_noise=1000.0)
    (note,) = _surge_notes(res)
    assert note.startswith("WARNING: batch 2048 is past B_noise = 1000")
    assert f"x{(1000 + 2048) / (1000 + 256):.3g}" in note  # the overshoot
    assert res.recipe.lr == pytest.approx(3e-4 * math.sqrt(8))  # the rule itself is unchanged
    lamb = Recipe(batch_size=256, lr=1e-3, optimizer="lamb")
    assert _surge_notes(rescale(lamb, 16384, "sqrt", b_noise=1000.0))[0].startswith("WARNING:")


@pytest.mark.parametrize("recipe, batch, rule, b_noise, starts", [
    (_adamw(), 512, "adam-sqrt", 1000.0, "surge check (Li et al. 2024): batch 512 is not past"),  # below the peak
    (_adamw(4096), 2048, "sqrt", 1000.0, "surge check (Li et al. 2024): batch 2048 is not past"),  # going down
    (_adamw(), 2048, "linear", 1000.0, "b_noise 1000 given, but the surge check"),  # not a sqrt rule
    (Recipe(batch_size=256, lr=0.1), 4096, "sqrt", 1000.0, "b_noise 1000 given, but the surge check"),  # SGD
])
def test_no_warning_but_a_stated_reason(recipe, batch, rule, b_noise, starts):
    (note,) = _surge_notes(rescale(recipe, batch, rule, b_noise=b_noise))
    assert note.startswith(starts) and not note.startswith("WARNING")


def test_without_b_noise_no_check_at_all():
    assert _surge_notes(rescale(_adamw(), 2048, "adam-sqrt")) == []
    with pytest.raises(ValueError, match="b_noise must be > 0"):
        rescale(_adamw(), 2048, "adam-sqrt", b_noise=0.0)


def test_cli_scale_b_noise(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["scale", "--from-batch", "256", "--to-batch", "2048", "--lr", "3e-4", "--optimizer", "adamw",
                  "--b-noise", "1000"])
    out = capsys.readouterr().out
    assert (e.value.code or 0) == 0 and "note: WARNING: batch 2048 is past B_noise = 1000" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["scale", "--from-batch", "256", "--to-batch", "2048", "--lr", "3e-4", "--b-noise", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --b-noise must be > 0") and err.count("\n") == 1
