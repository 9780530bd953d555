"""Scaling rules against the papers' numbers, invertibility, the EMA rule and ScalingPlan."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.scaling import RULES, Recipe, ScalingPlan, default_rule, rescale


def rel(a, b, tol=1e-12):
    return math.isclose(a, b, rel_tol=tol)


# -- published numbers ----------------------------------------------------------------------------
def test_goyal_linear_rule_256_to_8k():
    # Goyal et al. 2017, §2.1/§5.1: η = 0.1·kn/256 → 3.2 at kn = 8192; 5-epoch warmup kept.
    r = rescale(Recipe(batch_size=256, lr=0.1, optimizer="sgd", momentum=0.9, warmup_epochs=5,
                       budget_epochs=90, schedule="multistep", milestones=(30, 60, 80)), 8192, "linear").recipe
    assert r.lr == pytest.approx(3.2, rel=1e-12)
    assert r.warmup_epochs == 5 and r.milestones == (30, 60, 80) and r.momentum == 0.9


# LEGW as published for ImageNet/ResNet-50 by its authors in the LAMB paper (You et al. 2020,
# "Large Batch Optimization for Deep Learning", untuned LAMB table): batch 512 … 32K with
# LR 5/2^3 … 5/2^0 and warmup 0.3125 … 20 epochs — √k LR and k× warmup epochs from the 512 row.
LEGW_IMAGENET = [
    (512, 5 / 2**3.0, 0.3125),
    (1024, 5 / 2**2.5, 0.625),
    (2048, 5 / 2**2.0, 1.25),
    (4096, 5 / 2**1.5, 2.5),
    (8192, 5 / 2**1.0, 5.0),
    (16384, 5 / 2**0.5, 10.0),
    (32768, 5 / 2**0.0, 20.0),
]


@pytest.mark.parametrize("batch, lr, warmup", LEGW_IMAGENET)
def test_legw_reproduces_published_table(batch, lr, warmup):
    base = Recipe(batch_size=512, lr=5 / 2**3, optimizer="lamb", warmup_epochs=0.3125, budget_epochs=90, schedule="poly")
    r = rescale(base, batch, "legw").recipe
    assert r.lr == pytest.approx(lr, rel=1e-12)
    assert r.warmup_epochs == pytest.approx(warmup, rel=1e-12)


def test_issue_example_legw_and_linear():
    base = Recipe(batch_size=256, lr=0.1, optimizer="sgd", warmup_epochs=0.25)
    legw = rescale(base, 8192, "legw").recipe
    assert round(legw.lr, 3) == 0.566 and legw.warmup_epochs == 8.0
    lin = rescale(base, 8192, "linear").recipe
    assert lin.lr == pytest.approx(3.2) and lin.warmup_epochs == 0.25


def test_adam_sqrt_matches_malladi_definition():
    # Malladi et al. 2022, square-root scaling rule, float64 reference:
    # η' = √κ η, 1-β' = κ(1-β) for β1 and β2, ε' = ε/√κ.
    b1, b2, eps, lr, kappa = 0.9, 0.999, 1e-8, 3e-4, 4.0
    r = rescale(Recipe(batch_size=64, lr=lr, optimizer="adamw", betas=(b1, b2), eps=eps), 256, "adam-sqrt").recipe
    assert rel(r.lr, math.sqrt(kappa) * lr)
    assert rel(1 - r.betas[0], kappa * (1 - b1)) and rel(1 - r.betas[1], kappa * (1 - b2), 1e-9)
    assert rel(r.eps, eps / math.sqrt(kappa))
    # closed form: 0.9 → 0.6, 0.999 → 0.996, 1e-8 → 5e-9
    assert r.betas == pytest.approx((0.6, 0.996)) and r.eps == pytest.approx(5e-9)


def test_adam_sqrt_refuses_beta_leaving_range():
    with pytest.raises(ValueError, match=r"beta1 .* outside \[0, 1\).*batch_size <= 640"):
        rescale(Recipe(batch_size=64, lr=1e-3, optimizer="adam", betas=(0.9, 0.999)), 1024, "adam-sqrt")
    with pytest.raises(ValueError, match="needs an Adam-family optimizer"):
        rescale(Recipe(batch_size=64, lr=0.1, optimizer="sgd"), 128, "adam-sqrt")


@pytest.mark.parametrize("rule", sorted(RULES))
def test_ema_rule_under_every_rule(rule):
    # Busbridge et al. 2023: ρ' = ρ^κ (same EMA horizon in samples).
    base = Recipe(batch_size=128, lr=1e-3, optimizer="adamw", ema_decay=0.9999)
    r = rescale(base, 1024, rule).recipe
    assert rel(r.ema_decay, 0.9999**8)
    # horizon in samples 1/(1-ρ)·B is (to first order) unchanged
    assert (1024 / (1 - r.ema_decay)) / (128 / (1 - 0.9999)) == pytest.approx(1.0, rel=1e-3)


def test_sqrt_rule_and_none():
    base = Recipe(batch_size=100, lr=0.2, optimizer="sgd", warmup_epochs=1.0)
    assert rel(rescale(base, 400, "sqrt").recipe.lr, 0.4)
    assert rescale(base, 400, "none").recipe == base.replace(batch_size=400)


def test_default_rule_per_family_and_said():
    assert [default_rule(o) for o in ("sgd", "lars", "adam", "adamw", "lamb", "merit")] == [
        "linear", "legw", "adam-sqrt", "adam-sqrt", "sqrt", "sqrt"]
    # LARS takes LEGW (You et al. 2019): sqrt LR and warmup stretched x k. With the linear rule LARS
    # stayed at chance on MNIST-1D at batch 4096 from a base tuned at 128 (BENCHMARKS.md).
    res = rescale(Recipe(batch_size=32, lr=0.1, optimizer="lars", warmup_epochs=0.5), 128)
    assert res.rule == "legw" and any("default for optimizer 'lars'" in n for n in res.notes)
    assert res.recipe.lr == pytest.approx(0.2) and res.recipe.warmup_epochs == pytest.approx(2.0)
    # Issue 16: an unknown optimizer is refused when the recipe is made, naming the valid ones.
    with pytest.raises(ValueError, match=r"unknown optimizer 'rmsprop'.*valid: sgd, adam, adamw, lars, lamb, merit"):
        Recipe(batch_size=32, lr=0.1, optimizer="rmsprop")
    # A known optimizer without a default rule (Adagrad: neither momentum nor betas) asks for one.
    with pytest.raises(ValueError, match="no default scaling rule.*pass rule="):
        rescale(Recipe(batch_size=32, lr=0.1, optimizer="torch.optim:Adagrad"), 64)
    assert rescale(Recipe(batch_size=32, lr=0.1, optimizer="torch.optim:Adagrad"), 128, "sqrt").recipe.lr == pytest.approx(0.2)


def test_every_change_has_a_reason_with_its_source():
    res = rescale(Recipe(batch_size=256, lr=1e-3, optimizer="adamw", betas=(0.9, 0.98), eps=1e-6,
                         ema_decay=0.999, warmup_epochs=1), 2048)
    changed = {c.field for c in res.changes if c.changed}
    assert changed == {"batch_size", "lr", "betas", "eps", "ema_decay"}
    for line in res.reasons:
        assert "->" in line or line.startswith("rule")
    assert any("Malladi" in c.reason for c in res.changes if c.field == "betas")


# -- legw decay stretch -------------------------------------------------------------------------
def test_legw_stretches_multistep_and_exp_onto_new_warmup():
    base = Recipe(batch_size=256, lr=0.1, warmup_epochs=2, budget_epochs=90, schedule="multistep", milestones=(30, 60, 80))
    r = rescale(base, 1024, "legw").recipe  # warmup 2 → 8: [2, 90] maps affinely onto [8, 90]
    assert r.milestones == pytest.approx(tuple(8 + (m - 2) * 82 / 88 for m in (30, 60, 80)))
    e = Recipe(batch_size=256, lr=0.1, warmup_epochs=2, budget_epochs=90, schedule="exp", exp_gamma=0.95)
    er = rescale(e, 1024, "legw").recipe
    # same total decay from warmup end to the budget
    assert er.lr_at_epoch(90) / er.lr == pytest.approx(e.lr_at_epoch(90) / e.lr, rel=1e-12)


def test_legw_warmup_longer_than_run_is_refused():
    with pytest.raises(ValueError, match="longer than budget_epochs"):
        rescale(Recipe(batch_size=256, lr=0.1, warmup_epochs=5, budget_epochs=90, schedule="cosine"), 8192, "legw")


def test_linear_rule_schedule_same_shape_in_epochs():
    # The rescaled schedule is the old one times k at every epoch (shape kept in epochs).
    base = Recipe(batch_size=128, lr=0.05, warmup_epochs=3, budget_epochs=30, schedule="cosine", min_lr_ratio=0.1)
    new = rescale(base, 1024, "linear").recipe
    for e in (0.5, 3, 10, 29.9):
        assert rel(new.lr_at_epoch(e), 8 * base.lr_at_epoch(e))
    # legw: LR at k·e in warmup is √k times the old LR at e
    lg = rescale(base.replace(budget_epochs=60), 256, "legw").recipe
    assert rel(lg.lr_at_epoch(2 * 1.0), math.sqrt(2) * base.lr_at_epoch(1.0))


# -- invertibility ------------------------------------------------------------------------------
def _close(a: Recipe, b: Recipe) -> bool:
    for f in a.to_dict():
        x, y = getattr(a, f), getattr(b, f)
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif isinstance(x, tuple) and isinstance(y, tuple):
            if len(x) != len(y) or not all(math.isclose(p, q, rel_tol=1e-9, abs_tol=1e-12) for p, q in zip(x, y)):
                return False
        elif x != y:
            return False
    return True


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(RULES)),
    st.integers(1, 4096),
    st.integers(1, 4096),
    st.sampled_from(["constant", "cosine", "multistep", "exp", "poly", "wsd", "power"]),
)
def test_every_rule_is_invertible(rule, b0, b1, schedule):
    opt = "adamw" if rule == "adam-sqrt" else "sgd"
    # keep the betas valid for the largest k drawn: 1 - β ≤ 1/4096
    base = Recipe(batch_size=b0, lr=0.01, optimizer=opt, betas=(0.9999, 0.99999) if opt == "adamw" else None,
                  eps=1e-8 if opt == "adamw" else None, ema_decay=0.999, warmup_epochs=0.001, budget_epochs=4096.0 * 0.001 * 4096 / b0 + 1,
                  schedule=schedule, milestones=(1.0, 2.0), exp_gamma=0.9)
    there = rescale(base, b1, rule).recipe
    back = rescale(there, b0, rule).recipe
    assert _close(back, base), (base, back)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_k_equal_one_is_the_identity(rule):
    opt = "adamw" if rule == "adam-sqrt" else "sgd"
    base = Recipe(batch_size=300, lr=0.3, optimizer=opt, betas=(0.9, 0.95) if opt == "adamw" else None,
                  eps=1e-8 if opt == "adamw" else None, warmup_epochs=2, budget_epochs=50, schedule="multistep",
                  milestones=(10, 20), ema_decay=0.99)
    assert rescale(base, 300, rule).recipe == base


# -- Recipe validation and IO -------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(betas=(0.9, 1.0)), r"beta2\) must be in \[0.0, 1.0\)"),
        (dict(betas=(-0.1, 0.9)), r"beta1\) must be in"),
        (dict(milestones=(20, 10), schedule="multistep"), "milestones must be strictly increasing"),
        (dict(warmup_epochs=100.0), "warmup_epochs must be <= budget_epochs"),
        (dict(schedule="cosne"), "did you mean cosine"),
        (dict(ema_decay=1.0), "ema_decay must be in"),
    ],
)
def test_bad_recipe(kw, match):
    base = dict(batch_size=128, lr=0.1, budget_epochs=90.0)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        Recipe(**base)


def test_bad_rescale_arguments():
    r = Recipe(batch_size=128, lr=0.1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        rescale(r, -5, "linear")
    with pytest.raises(ValueError, match="unknown rule 'sqr'"):
        rescale(r, 256, "sqr")


def test_toml_round_trip(tmp_path):
    r = Recipe(batch_size=128, lr=1e-3, optimizer="adamw", betas=(0.9, 0.95), eps=1e-8, dataset_size=50_000,
               warmup_epochs=0.5, budget_epochs=10, schedule="wsd", ema_decay=0.999, milestones=(1.0,))
    p = tmp_path / "r.toml"
    p.write_text(r.to_toml())
    assert Recipe.from_toml(p) == r
    p.write_text("[recipe]\nbatch_size = 64\nlr = 0.1\nlearning_rate = 3\n")
    with pytest.raises(ValueError, match="unknown recipe field 'learning_rate'"):
        Recipe.from_toml(p)


def test_from_samples_and_lr_at_samples():
    r = Recipe.from_samples(dataset_size=1000, batch_size=32, lr=0.1, warmup_samples=500, budget_samples=10_000,
                            schedule="cosine")
    assert r.warmup_epochs == 0.5 and r.budget_epochs == 10
    assert r.lr_at(250) == pytest.approx(0.05)
    assert r.lr_at(5250) == pytest.approx(0.05)  # cosine midpoint
    with pytest.raises(ValueError, match="dataset_size must be set"):
        Recipe(batch_size=32, lr=0.1).lr_at(10)


# -- the trainer's helper -----------------------------------------------------------------------
def test_scaling_plan_follows_batch_changes():
    base = Recipe.from_samples(dataset_size=10_000, batch_size=64, lr=1e-3, optimizer="adamw", betas=(0.9, 0.999),
                               eps=1e-8, warmup_samples=2_000, budget_samples=100_000, schedule="cosine")
    plan = ScalingPlan(base)  # default rule for adamw: adam-sqrt
    assert plan.rule == "adam-sqrt"
    for batch in (64, 128, 256):
        k = batch / 64
        assert rel(plan.lr_at(50_000, batch), math.sqrt(k) * base.lr_at(50_000))
        hp = plan.hparams_for(batch)
        assert rel(1 - hp["betas"][0], k * 0.1) and rel(hp["eps"], 1e-8 / math.sqrt(k))
        assert "lr" not in hp and hp["weight_decay"] == 0.0
    assert plan.recipe_for(256) is plan.recipe_for(256)  # cached
    with pytest.raises(ValueError, match="unknown rule"):
        ScalingPlan(base, "quadratic")


def test_goyal_gradual_warmup_from_small_batch_lr():
    # Goyal et al. 2017, §2.2: warmup from η to kη over 5 epochs (start factor 1/k).
    base = Recipe(batch_size=256, lr=0.1, warmup_epochs=5, budget_epochs=90, schedule="multistep", milestones=(30, 60, 80))
    big = rescale(base, 8192, "linear").recipe.replace(warmup_start_factor=1 / 32)
    assert big.lr_at_epoch(0) == pytest.approx(0.1)
    assert big.lr_at_epoch(2.5) == pytest.approx(0.1 + (3.2 - 0.1) / 2)
    assert big.lr_at_epoch(5) == pytest.approx(3.2) and big.lr_at_epoch(30) == pytest.approx(0.32)
