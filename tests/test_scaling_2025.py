"""The 2025 rules: AdamW weight-decay timescale, β2 half-life, Seesaw (issue 31)."""

import json
import math

import pytest

from bigbatch.adaptive.schedule import parse_batch_schedule
from bigbatch.cli import main
from bigbatch.scaling import (
    Recipe, half_life_decay, half_life_samples, rescale, seesaw_schedule, weight_decay_timescale,
)

ADAMW = dict(optimizer="adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)


@pytest.mark.parametrize("rule", ["linear", "sqrt", "adam-sqrt", "none"])
def test_timescale_kept_in_epochs(rule):
    # Wang & Aitchison 2024: tau_iter = 1/(eta*lambda), tau_epoch = tau_iter / M, M = D/B iterations
    # per epoch (= Bergsma et al. 2025's tau = B/(eta*lambda*D)). It must be the same at both batches.
    D = 50_000
    r = Recipe(batch_size=256, dataset_size=D, **ADAMW)
    new = rescale(r, 2048, rule, weight_decay_rule="timescale").recipe
    tau = lambda x: (1 / (x.lr * x.weight_decay)) / (D / x.batch_size)
    assert tau(new) == pytest.approx(tau(r), rel=1e-12)
    assert weight_decay_timescale(new.lr, new.weight_decay, new.batch_size) == pytest.approx(tau(r) * D)


def test_timescale_closed_forms_and_power_lines():
    r = Recipe(batch_size=256, **ADAMW)
    assert rescale(r, 2048, "adam-sqrt", weight_decay_rule="timescale").recipe.weight_decay == pytest.approx(0.1 * math.sqrt(8))
    assert rescale(r, 2048, "linear", weight_decay_rule="timescale").recipe.weight_decay == pytest.approx(0.1)
    # Bergsma et al. 2025 (abstract): at fixed eta, N, D the optimal lambda scales linearly with B.
    assert rescale(r, 2048, "none", weight_decay_rule="timescale").recipe.weight_decay == pytest.approx(0.8)
    back = rescale(rescale(r, 2048, weight_decay_rule="timescale").recipe, 256, weight_decay_rule="timescale").recipe
    assert back.weight_decay == pytest.approx(0.1, rel=1e-12) and back.lr == pytest.approx(r.lr, rel=1e-12)
    assert rescale(r, 2048).recipe.weight_decay == 0.1  # default: kept, as before


@pytest.mark.parametrize("opt", ["adam", "sgd", "lars"])
def test_timescale_refuses_l2(opt):
    r = Recipe(batch_size=256, lr=0.1, optimizer=opt, weight_decay=1e-4)
    with pytest.raises(ValueError, match="needs decoupled weight decay.*L2"):
        rescale(r, 512, "linear", weight_decay_rule="timescale")


def test_timescale_trust_ratio_optimizers_say_their_assumption():
    res = rescale(Recipe(batch_size=256, lr=1e-3, optimizer="lamb", weight_decay=0.01), 1024, weight_decay_rule="timescale")
    assert res.recipe.weight_decay == pytest.approx(0.02)
    assert any("trust ratio" in n for n in res.notes)


def test_betas_sde_and_half_life():
    r = Recipe(batch_size=256, **ADAMW)
    sde = rescale(r, 2048).recipe  # adam-sqrt: Malladi et al. 2022, 1 - beta' = k(1 - beta)
    assert sde.betas == pytest.approx((0.2, 0.992))  # issue 31: beta1 = 0.2 at 256 -> 2048
    hl = rescale(r, 2048, betas_rule="half-life").recipe
    # Marek et al. 2025: the half-life of beta2 in samples (tokens) held fixed, beta2' = beta2^(B'/B)
    assert hl.betas[0] == 0.9 and hl.betas[1] == pytest.approx(0.999**8, rel=1e-15)
    assert half_life_samples(hl.betas[1], 2048) == pytest.approx(half_life_samples(0.999, 256), rel=1e-9)
    # one function for beta2 and the model EMA (Busbridge et al. 2023, rho^k)
    e = rescale(r.replace(ema_decay=0.999), 2048, betas_rule="half-life").recipe
    assert e.ema_decay == e.betas[1] == half_life_decay(0.999, 8)
    for rule in ("sde", "half-life"):
        there = rescale(r, 1024, betas_rule=rule).recipe
        assert rescale(there, 256, betas_rule=rule).recipe.betas == pytest.approx(r.betas, rel=1e-12)


def test_betas_alternative_printed_past_threshold():
    def reason(betas):
        res = rescale(Recipe(batch_size=256, **{**ADAMW, "betas": betas}), 2048, betas_rule="half-life")
        return next(c.reason for c in res.changes if c.field == "betas")
    assert "beta2" not in reason((0.9, 0.999)).split("would give")[1]  # 86.6 vs 86.3 steps: < 10%
    assert "beta2 0.6" in reason((0.9, 0.95))  # 1 - 8*0.05 = 0.6 against 0.95^8 = 0.663
    with pytest.raises(ValueError, match="needs an Adam-family"):
        rescale(Recipe(batch_size=256, lr=0.1, optimizer="sgd"), 512, betas_rule="half-life")


def test_seesaw_step_decay_is_the_papers_rule():
    # Meterez et al. 2025 (abstract): where the scheduler would halve the LR, Seesaw multiplies it
    # by 1/sqrt(2) and doubles the batch.
    r = Recipe(batch_size=128, dataset_size=1000, budget_epochs=90, schedule="multistep", milestones=(30, 60, 80),
               gamma=0.5, **ADAMW)
    s = seesaw_schedule(r)
    assert s.rule == "sqrt" and s.schedule == ((0, 128), (30000, 256), (60000, 512), (80000, 1024))
    lrs = [s.lr_at(n) for n, _ in s.schedule]
    for a, b in zip(lrs, lrs[1:]):
        assert a / b == pytest.approx(math.sqrt(2), rel=1e-12)
    assert parse_batch_schedule(s.text()) == list(s.schedule)
    # linear rule: Smith et al. 2017, the LR held while the batch doubles
    sl = seesaw_schedule(r, rule="linear")
    assert [sl.lr_at(n) for n, _ in sl.schedule] == pytest.approx([1e-3] * 4)


def test_seesaw_cuts_cosine_into_halvings_and_warns_past_b_crit():
    r = Recipe(batch_size=256, dataset_size=100_000, budget_epochs=10, schedule="cosine", **ADAMW)
    s = seesaw_schedule(r, b_crit=1500, max_batch=4096)
    assert [b for _, b in s.schedule] == [256, 512, 1024, 2048, 4096]
    for j, (n, _) in enumerate(s.schedule[1:], start=1):
        assert r.lr_at(n) <= 1e-3 * 2**-j < r.lr_at(n - 1)
    assert any(n.startswith("WARNING:") and "2048" in n for n in s.notes)
    assert not any(n.startswith("WARNING:") for n in seesaw_schedule(r, b_crit=1e6, max_batch=4096).notes)
    with pytest.raises(ValueError, match="constant"):
        seesaw_schedule(r.replace(schedule="constant", budget_epochs=None))


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


ISSUE = ["scale", "--from-batch", "256", "--to-batch", "2048", "--lr", "1e-3", "--optimizer", "adamw",
         "--weight-decay", "0.1", "--weight-decay-rule", "timescale"]


def test_cli_issue_example_prints_lambda_and_beta2(capsys):
    code, out, _ = run(capsys, *ISSUE)
    assert code == 0
    wd = next(line for line in out.splitlines() if line.startswith("weight_decay "))
    assert "0.283" in wd and "Wang & Aitchison" in wd
    betas = next(line for line in out.splitlines() if line.startswith("betas "))
    assert "0.992" in betas and "Malladi" in betas and "half-life rule would give beta1 0.9" in betas
    code, out, _ = run(capsys, *ISSUE, "--json")
    d = json.loads(out)
    assert d["weight_decay_rule"] == "timescale" and d["betas_rule"] == "sde"
    assert d["weight_decay_timescale_samples"]["old"] == pytest.approx(d["weight_decay_timescale_samples"]["new"])
    code, _, err = run(capsys, *ISSUE[:-1], "keep", "--optimizer", "adam", "--weight-decay-rule", "timescale")
    assert code == 2 and "needs decoupled weight decay" in err


def test_cli_seesaw_file(capsys, tmp_path):
    f = tmp_path / "seesaw.txt"
    code, out, _ = run(capsys, "scale", "--from-batch", "256", "--to-batch", "256", "--lr", "1e-3", "--optimizer", "adamw",
                       "--dataset-size", "100000", "--budget-epochs", "10", "--schedule", "cosine", "--seesaw", str(f),
                       "--seesaw-max-batch", "1024")
    assert code == 0 and parse_batch_schedule(f.read_text())[:2] == [(0, 256), (500000, 512)]
    code, _, err = run(capsys, "scale", "--from-batch", "256", "--to-batch", "256", "--lr", "1e-3", "--seesaw", str(f))
    assert code == 2 and "exists" in err



def _tau_note(res):
    return next(n for n in res.notes if n.startswith("weight-decay timescale"))


def test_timescale_in_epochs_is_noted_against_wang_aitchison_range():
    # Wang & Aitchison 2024 (abstract): the timescale should be neither much shorter than one epoch
    # nor much longer than the run. tau = B/(lr*wd)/D = 256/(1e-3*0.1)/50000 = 51.2 epochs.
    r = Recipe(batch_size=256, dataset_size=50_000, budget_epochs=200, **ADAMW)
    kept = _tau_note(rescale(r, 2048, "sqrt"))  # wd kept, lr x sqrt(8): tau x sqrt(8) = 144.8 epochs
    assert "51.2 -> 145 epochs" in kept and "outside" not in kept
    assert "51.2 -> 51.2 epochs" in _tau_note(rescale(r, 2048, "sqrt", weight_decay_rule="timescale"))
    assert "outside that range" in _tau_note(rescale(r.replace(budget_epochs=100), 2048, "sqrt"))
    assert "outside that range" in _tau_note(rescale(r.replace(weight_decay=60.0), 256 * 64, "linear"))  # 0.0853 epochs
    # no note without decoupled decay, without decay, or without dataset_size
    assert not any(n.startswith("weight-decay") for n in rescale(r.replace(weight_decay=0.0), 512).notes)
    assert not any(n.startswith("weight-decay") for n in rescale(r.replace(dataset_size=None), 512).notes)
    sgd = Recipe(batch_size=256, lr=0.1, optimizer="sgd", weight_decay=1e-4, dataset_size=50_000)
    assert not any(n.startswith("weight-decay") for n in rescale(sgd, 512).notes)


def test_seesaw_rules_come_from_the_registry(monkeypatch):
    from bigbatch import rules
    from bigbatch.rules import RuleInfo

    r = Recipe(batch_size=128, dataset_size=1000, budget_epochs=90, schedule="multistep", milestones=(30, 60),
               gamma=0.5, **ADAMW)
    for bad in ("legw", "adam-sqrt", "none"):  # warmup or betas moved, or no LR growth
        with pytest.raises(ValueError, match="seesaw rule must be one of linear, sqrt"):
            seesaw_schedule(r, rule=bad)
    monkeypatch.setitem(rules._RULES, "quarter", RuleInfo("quarter", "a test rule", 0.25))
    s = seesaw_schedule(r, rule="quarter")  # LR x 2^0.25 / 2 at each doubling
    assert s.lr_at(30000) / s.lr_at(0) == pytest.approx(2**0.25 / 2, rel=1e-12)
    assert "LR x 0.595 and batch x 2 per milestone" in s.notes[0]
