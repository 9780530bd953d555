"""Priors before any study: the published fits, their ranges, and ``bigbatch plan --params/--tokens``.

The constants are the papers' as printed:
  * Step Law (Li et al. 2025, arXiv:2503.04715): eta = 1.79 N^-0.713 D^0.307, B = 0.58 D^0.571 (tokens);
    the authors' prediction tool (step-law/steplaw, code/fit_tool.py, ``pred_opt_lr_bs``) gives the batch
    in sequences as bs / seq_len.
  * MiniCPM (Hu et al. 2024, arXiv:2404.06395, §3.2): bs = 1.21e9 / L^6.24 (tokens, L = C4 loss);
    §3.3: optimal base LR 0.01 under their muP.
  * Token horizons (Bjorck et al. 2024, arXiv:2409.19913): LR*(D) = B D^-beta with the recommended
    beta = 0.32, B from an LR tuned at a shorter horizon (the paper's rule of thumb; its text was not
    reachable here, the exponent is the one its ICLR 2025 reviews quote and later work reuses).
  * Critical batch size (Zhang et al. 2024, arXiv:2410.21676), Chinchilla path: B* = 93.20 N^0.47 as the
    paper's ICLR 2025 reviews quote it; N in millions and B* in sequences of 512 tokens per the authors'
    notebook (github.com/hlzhang109/critical-batch-size, plots/chinchilla.ipynb), whose data are below.
Each test below states which printed number it checks.
"""

import json
import math

import pytest

import bigbatch.cli as cli
from bigbatch.plan import PRIORS, PlanConfig, estimate_priors, plan_priors
from bigbatch.cli import plan as plan_cli

if not any(c.name == "plan" for c in cli.app.registered_commands):
    plan_cli.register(cli.app)


def by_key(estimates):
    return {e.prior.key: e for e in estimates}


def test_step_law_reproduces_the_printed_constants():
    # Step Law fit as printed: B(D) = 0.58 D^0.571 tokens and eta(N, D) = 1.79 N^-0.713 D^0.307.
    # At D = 1 and N = 1 the formulas return their printed prefactors; each decade of D multiplies B by
    # 10^0.571 and eta by 10^0.307, each decade of N multiplies eta by 10^-0.713 (the printed exponents).
    est = by_key(estimate_priors(params=1.0, tokens=1.0))
    assert est["step-law-batch"].value == pytest.approx(0.58, rel=1e-12)
    assert est["step-law-lr"].value == pytest.approx(1.79, rel=1e-12)
    a = by_key(estimate_priors(params=1e8, tokens=1e10))
    b = by_key(estimate_priors(params=1e9, tokens=1e11))
    assert b["step-law-batch"].value / a["step-law-batch"].value == pytest.approx(10 ** 0.571, rel=1e-12)
    assert b["step-law-lr"].value / a["step-law-lr"].value == pytest.approx(10 ** (0.307 - 0.713), rel=1e-12)
    # The paper's held-out test point (1B parameters, 100B tokens): log10 B = log10 0.58 + 11 * 0.571.
    assert b["step-law-batch"].value == pytest.approx(10 ** (math.log10(0.58) + 11 * 0.571), rel=1e-12)
    assert b["step-law-batch"].value == pytest.approx(1.108e6, rel=1e-3)
    assert b["step-law-lr"].value == pytest.approx(1.632e-3, rel=1e-3)
    assert b["step-law-batch"].outside == () and b["step-law-lr"].outside == ()  # the test point is in range


def test_step_law_batch_in_sequences_as_the_authors_tool_gives_it():
    # fit_tool.pred_opt_lr_bs: bs_in_sample = bs / seq_len (the fit is in tokens).
    e = by_key(estimate_priors(tokens=1e11, seq_len=2048))["step-law-batch"]
    assert e.sequences == pytest.approx(e.value / 2048) and e.prior.unit.startswith("tokens")
    assert by_key(estimate_priors(tokens=1e11, seq_len=2048))["step-law-lr"].sequences is None


def test_minicpm_batch_reproduces_the_printed_fit():
    # §3.2: bs = 1.21e9 / L^6.24 tokens. At L = 1 the prefactor 1.21e9; halving the loss multiplies bs by 2^6.24.
    assert by_key(estimate_priors(target_loss=1.0))["minicpm-batch"].value == pytest.approx(1.21e9, rel=1e-12)
    r = by_key(estimate_priors(target_loss=1.5))["minicpm-batch"].value / by_key(estimate_priors(target_loss=3.0))["minicpm-batch"].value
    assert r == pytest.approx(2 ** 6.24, rel=1e-12)
    # §6.2 trains MiniCPM-2.4B at 3.93M tokens per batch; the fit gives that batch at a C4 loss of about 2.5
    # (a consistency check of units: tokens, not sequences; the paper prints no loss for that run).
    loss = (1.21e9 / 3.93e6) ** (1 / 6.24)
    assert loss == pytest.approx(2.50, abs=0.01)


def test_minicpm_lr_is_the_printed_constant_and_needs_nothing():
    # §3.3: the optimal base LR stays around 0.01 from 0.04B to 0.5B (muP), confirmed at 2.1B.
    e = by_key(estimate_priors(params=3e8))["minicpm-lr"]
    assert e.value == 0.01 and e.outside == () and "muP" in e.prior.unit
    assert by_key(estimate_priors(params=7e9))["minicpm-lr"].outside  # past 2.1B


# Zhang et al. 2024, Chinchilla path. Steps to the target C4 loss at batches 2^6..2^14 sequences of 512 tokens
# for the five model sizes, as the authors' fitting cell lists them (github.com/hlzhang109/critical-batch-size,
# plots/chinchilla.ipynb, the cell that prints "Critical batch size"; a few entries there differ slightly from
# the notebook's earlier wandb print-out, e.g. 2528 vs 2500 at 85M and batch 2048; these are the ones fitted).
ZHANG_BATCHES = [2 ** i for i in range(6, 15)]
ZHANG_STEPS = {  # N in millions -> steps to target at each batch of ZHANG_BATCHES
    85: [46000, 23000, 13282, 7000, 3840, 2528, 1917, 1600, 1600],
    151: [96000, 49000, 24000, 12000, 7128, 4350, 2940, 2400, 2300],
    302: [196000, 90000, 46000, 23400, 13300, 7224, 4980, 3400, 2879],
    604: [311000, 166000, 81000, 37440, 21320, 11400, 7199, 4700, 3800],
    1200: [642000, 331000, 176000, 94000, 46500, 25000, 15360, 8900, 6500],
}
# The CBS the notebook prints for those five models (its cbs_list), and the law it fits to them.
ZHANG_NOTEBOOK_CBS = {85: 745.32, 151: 955.16, 302: 1393.73, 604: 1888.52, 1200: 2533.41}


def cbs_by_the_papers_recipe(batches, steps, b_opt=256):
    """Fit S(B) = a + b/B by least squares on log S over all batches (scipy curve_fit, as the notebook does),
    then the batch whose steps exceed linear scaling from b_opt by 20%:
    a + b/B = 1.2 (a + b/b_opt) b_opt / B  <=>  a B = 1.2 a b_opt + 0.2 b  <=>  B = b/(5a) + 1.2 b_opt."""
    import numpy as np
    from scipy.optimize import curve_fit

    bs, y = np.asarray(batches, float), np.asarray(steps, float)
    (a, b), _ = curve_fit(lambda x, a, b: np.log(a + b / x), bs, np.log(y), maxfev=5000)
    cbs = b / (5 * a) + 1.2 * b_opt
    # The definition itself, not only the closed form: at B* the fitted steps are 1.2x linear scaling from b_opt.
    assert a + b / cbs == pytest.approx(1.2 * (a + b / b_opt) * b_opt / cbs, rel=1e-9)
    return cbs


@pytest.mark.parametrize("n_million", sorted(ZHANG_STEPS))
def test_zhang_cbs_reproduces_the_cbs_recomputed_from_the_authors_data(n_million):
    cbs = cbs_by_the_papers_recipe(ZHANG_BATCHES, ZHANG_STEPS[n_million])
    assert cbs == pytest.approx(ZHANG_NOTEBOOK_CBS[n_million], rel=1e-3)  # the recipe is the notebook's
    e = by_key(estimate_priors(params=n_million * 1e6, tokens=20 * n_million * 1e6, seq_len=512))["zhang-cbs-chinchilla"]
    # The prior (tokens per step) over 512 is the CBS in sequences: within 5% of the recomputed one at every size
    # (the units are what makes this hold: with N in parameters instead of millions it would be 10^(6 x 0.47) = 660x larger).
    assert e.sequences == pytest.approx(e.value / 512)
    assert e.sequences == pytest.approx(cbs, rel=0.05)
    assert e.outside == ()  # every model is in range, on the Chinchilla path


def test_zhang_cbs_formula_value_and_units():
    # 93.20 * N^0.47 with N in millions, in sequences of 512 tokens: at 604M that is 93.20 * 604^0.47 = 1890.2
    # sequences = 967,772 tokens per step.
    e = by_key(estimate_priors(params=6.04e8))["zhang-cbs-chinchilla"]
    assert e.value == pytest.approx(512 * 93.20 * 604 ** 0.47, rel=1e-12)
    assert e.value == pytest.approx(9.678e5, rel=1e-3) and e.prior.unit == "tokens per optimizer step"
    assert e.outside == ()  # no --tokens given: the path is not checked, N is in range
    # A doubling of N multiplies B* by 2^0.47.
    r = by_key(estimate_priors(params=1.2e9))["zhang-cbs-chinchilla"].value / by_key(estimate_priors(params=6e8))["zhang-cbs-chinchilla"].value
    assert r == pytest.approx(2 ** 0.47, rel=1e-12)
    assert by_key(estimate_priors(tokens=1e10))["zhang-cbs-chinchilla"].missing == ("params",)
    notes = " ".join(e.prior.notes)
    assert "not McCandlish" in notes and "B_crit" in notes


@pytest.mark.parametrize("tokens, flagged", [
    (2.4e10, False),  # D = 20 N: the path the law was fitted on
    (1.2e10, False),  # 10 N: at the 2x edge
    (4.8e10, False),  # 40 N: at the 2x edge
    (1.1e10, True),   # 9.2 N: below
    (1e11, True),     # 83 N: far above
])
def test_zhang_cbs_flags_tokens_off_the_chinchilla_path(tokens, flagged):
    e = by_key(estimate_priors(params=1.2e9, tokens=tokens))["zhang-cbs-chinchilla"]
    assert e.value == pytest.approx(512 * 93.20 * 1200 ** 0.47)  # the value does not read D
    msgs = [m for m in e.outside if m.startswith("--tokens / --params")]
    assert bool(msgs) == flagged, e.outside
    if flagged:
        ratio = tokens / 1.2e9
        assert f"{ratio:.3g}" in msgs[0] and "Chinchilla path" in msgs[0]
        assert ("below" if ratio < 10 else "above") in msgs[0]


def test_a_ratio_range_is_checked_only_when_both_inputs_are_given():
    from bigbatch.plan import FittedRange

    r = FittedRange("tokens", 10.0, 40.0, "test", per="params")
    assert r.value({"tokens": 2e10, "params": 1e9}) == 20.0
    assert r.value({"tokens": 2e10, "params": None}) is None and r.value({"params": 1e9}) is None
    assert r.label() == ("--tokens / --params", "training tokens / non-embedding parameters")
    assert r.outside(50.0).startswith("--tokens / --params 50 is above the fitted range (10 to 40 training tokens")
    plain = FittedRange("tokens", None, 1e11, "test")
    assert plain.value({"tokens": 3e10}) == 3e10 and plain.label() == ("--tokens", "training tokens")


def test_token_horizon_lr_moves_a_tuned_lr_by_the_rule_of_thumb():
    # Rule of thumb: LR*(D) = B * D^-0.32 with B fixed by the LR tuned at the reference horizon, so
    # LR*(D) / LR*(D_ref) = (D / D_ref)^-0.32 whatever the unit of D.
    same = by_key(estimate_priors(tokens=2.5e10, ref_lr=3e-4, ref_tokens=2.5e10))["token-horizon-lr"]
    assert same.value == pytest.approx(3e-4, rel=1e-12) and same.outside == ()
    four = by_key(estimate_priors(tokens=1e11, ref_lr=3e-4, ref_tokens=2.5e10))["token-horizon-lr"]
    assert four.value == pytest.approx(3e-4 * 4 ** -0.32, rel=1e-12)
    assert four.value == pytest.approx(1.925e-4, rel=1e-3)  # a 4x longer run: the LR falls by 36%
    decade = by_key(estimate_priors(tokens=1e11, ref_lr=1e-3, ref_tokens=1e10))["token-horizon-lr"].value
    assert decade == pytest.approx(1e-3 * 10 ** -0.32, rel=1e-12)
    shorter = by_key(estimate_priors(tokens=1e10, ref_lr=1e-3, ref_tokens=1e11))["token-horizon-lr"].value
    assert shorter == pytest.approx(1e-3 * 10 ** 0.32, rel=1e-12) and shorter > 1e-3  # works both ways
    # N does not enter; it is only checked against the paper's largest model.
    big = by_key(estimate_priors(params=7e9, tokens=1e11, ref_lr=3e-4, ref_tokens=2.5e10))["token-horizon-lr"]
    assert big.value == four.value and any("--params 7e+09 is above the fitted range" in m for m in big.outside)


def test_token_horizon_lr_needs_both_reference_inputs():
    e = by_key(estimate_priors(tokens=1e11))["token-horizon-lr"]
    assert e.value is None and e.missing == ("ref_lr", "ref_tokens")
    for kwargs in ({"ref_lr": 3e-4}, {"ref_tokens": 1e10}):
        with pytest.raises(ValueError, match="--ref-lr and --ref-tokens go together"):
            estimate_priors(tokens=1e11, **kwargs)
    with pytest.raises(ValueError, match="ref_tokens must be > 0"):
        estimate_priors(tokens=1e11, ref_lr=3e-4, ref_tokens=0.0)


@pytest.mark.parametrize("kwargs, key, fragment", [
    ({"params": 2e9, "tokens": 1e10}, "step-law-lr", "--params 2e+09 is above the fitted range"),
    ({"params": 3e7, "tokens": 1e10}, "step-law-lr", "--params 3e+07 is below the fitted range"),
    ({"params": 3e8, "tokens": 4e11}, "step-law-batch", "--tokens 4e+11 is above the fitted range"),
    ({"params": 1e9, "target_loss": 2.5}, "minicpm-batch", "--params 1e+09 is above the fitted range"),
    ({"tokens": 1e12, "ref_lr": 3e-4, "ref_tokens": 1e11}, "token-horizon-lr", "--tokens 1e+12 is above the fitted range"),
    ({"tokens": 1e11, "ref_lr": 3e-4, "ref_tokens": 9e11}, "token-horizon-lr",
     "--ref-tokens 9e+11 is above the fitted range"),
])
def test_out_of_range_inputs_are_flagged(kwargs, key, fragment):
    e = by_key(estimate_priors(**kwargs))[key]
    assert e.value is not None and any(fragment in m for m in e.outside), e.outside


def test_in_range_inputs_are_not_flagged_and_missing_inputs_are_named():
    est = by_key(estimate_priors(params=3e8, tokens=3e10))
    assert est["step-law-batch"].outside == () and est["step-law-lr"].outside == ()
    assert est["minicpm-batch"].value is None and est["minicpm-batch"].missing == ("target_loss",)
    only_d = by_key(estimate_priors(tokens=3e10))
    assert only_d["step-law-lr"].value is None and only_d["step-law-lr"].missing == ("params",)
    assert only_d["step-law-batch"].value is not None


def test_every_prior_records_source_conditions_unit_and_range():
    for p in PRIORS:
        assert "arXiv:" in p.source and p.conditions and p.unit and p.ranges, p.key
        assert p.quantity in ("batch_size", "lr")


@pytest.mark.parametrize("kwargs, message", [
    ({}, "priors need --params N, --tokens D or --target-loss L"),
    ({"params": -1.0}, "params must be > 0"),
    ({"tokens": 1e10, "seq_len": 0}, "seq_len must be a positive integer"),
])
def test_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_priors(**kwargs)


def test_plan_priors_refuses_study_only_options():
    with pytest.raises(ValueError, match="--gpus, --deadline: only with --study DIR"):
        plan_priors(PlanConfig(params=1e8, tokens=1e10, gpus=[8], deadline="1h"))


# -- CLI ----------------------------------------------------------------------------------------
def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_cli_text_shows_value_source_range_and_extrapolation(capsys):
    code, out, err = run(capsys, "--params", "7e9", "--tokens", "1e12", "--seq-len", "4096", "--target-loss", "2.2")
    assert code == 0, err
    assert "Step Law: B = 0.58 * D^0.571 = " in out and "sequences of 4096" in out
    assert "arXiv:2503.04715" in out and "arXiv:2404.06395" in out and "AdamW" in out
    assert out.count("OUTSIDE THE FITTED RANGE") >= 3  # N past 1B (Step Law x2), past 0.17B and 2.1B (MiniCPM)
    assert "--tokens 1e+12 is above the fitted range" in out
    assert "Critical batch size (Chinchilla path): B* = 512 * 93.20 * (N / 1e6)^0.47 = " in out
    assert "arXiv:2410.21676" in out and "training tokens / non-embedding parameters 10 to 40" in out
    assert "not measurements of this model" in out and "Surge" in out


def test_cli_json(capsys):
    code, out, err = run(capsys, "--params", "3e8", "--tokens", "3e10", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["mode"] == "priors" and d["inputs"]["params"] == 3e8
    p = {x["key"]: x for x in d["priors"]}
    assert p["step-law-batch"]["value"] == pytest.approx(0.58 * 3e10 ** 0.571)
    assert p["step-law-batch"]["in_range"] is True and p["step-law-batch"]["outside_range"] == []
    assert p["minicpm-batch"]["value"] is None and p["minicpm-batch"]["missing_inputs"] == ["--target-loss"]
    assert {r["input"] for r in p["step-law-lr"]["fitted_range"]} == {"params", "tokens"}
    assert p["token-horizon-lr"]["value"] is None
    assert p["token-horizon-lr"]["missing_inputs"] == ["--ref-lr", "--ref-tokens"]
    z = p["zhang-cbs-chinchilla"]  # 3e10 tokens on 3e8 parameters: 100 per parameter, off the Chinchilla path
    assert z["value"] == pytest.approx(512 * 93.20 * 300 ** 0.47) and z["in_range"] is False
    assert {"input": "tokens", "per": "params", "low": 10.0, "high": 40.0}.items() <= z["fitted_range"][1].items()
    assert z["outside_range"] and z["outside_range"][0].startswith("--tokens / --params 100 is above")


def test_cli_token_horizon_transfer(capsys):
    code, out, err = run(capsys, "--tokens", "1e11", "--ref-lr", "3e-4", "--ref-tokens", "2.5e10", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["inputs"]["ref_lr"] == 3e-4 and d["inputs"]["ref_tokens"] == 2.5e10
    p = {x["key"]: x for x in d["priors"]}
    assert p["token-horizon-lr"]["value"] == pytest.approx(3e-4 * 4 ** -0.32) and p["token-horizon-lr"]["in_range"]
    code, out, err = run(capsys, "--tokens", "1e11", "--ref-lr", "3e-4", "--ref-tokens", "2.5e10")
    assert code == 0, err
    assert "Token horizons: eta = ref_lr * (D / ref_tokens)^-0.32 = 0.0001925" in out and "arXiv:2409.19913" in out
    assert "--ref-lr 0.0003, --ref-tokens 2.5e+10" in out


@pytest.mark.parametrize("args, message", [
    ([], "--study DIR is required"),
    (["--params", "1e8", "--tokens", "1e10", "--throughput", "100"], "--throughput: only with --study DIR"),
    (["--study", "{tmp}", "--params", "1e8"], "--params give the published priors without a study"),
    (["--params", "-5"], "--params must be > 0"),
    (["--tokens", "1e10", "--seq-len", "0"], "--seq-len must be a positive integer"),
    (["--tokens", "1e11", "--ref-lr", "3e-4"], "--ref-lr and --ref-tokens go together"),
    (["--tokens", "1e11", "--ref-lr", "-1", "--ref-tokens", "1e10"], "--ref-lr must be > 0"),
    (["--study", "{tmp}", "--ref-lr", "3e-4"], "--ref-lr give the published priors without a study"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path, args, message):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
