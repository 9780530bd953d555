"""The optimizer registry owns per-optimizer facts (issue 17 item 3), and bad names or inputs
give one clear error (issue 16). An optimizer from outside the package (tests/ext_optim.py)
goes through create_optimizer, a Recipe, the scaling rules and the trainer."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ext_optim
from bigbatch.optim import (
    FAMILIES, OPTIMIZERS, OptimizerInfo, create_optimizer, optimizer_info, optimizer_names, param_groups,
    register_optimizer,
)
from bigbatch.scaling import RULES, Recipe, ScalingPlan, default_rule, rescale

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPEC = "ext_optim:Signum"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _fit(opt, model, steps=60):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------- the records
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lars", "lamb", "merit"])
def test_builtin_records_hold_every_fact(name):
    info = optimizer_info(name)
    assert info.name == name and info.family in FAMILIES and info.default_rule in RULES
    assert default_rule(name) == info.default_rule
    # The family's hyperparameters are the ones a rule may set, each with a registry default.
    assert info.hparams == FAMILIES[info.family] and all(info.default(k) is not None for k in info.hparams)
    assert info.foreach and info.fused
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.family = "adam"
    with pytest.raises(TypeError):
        info.defaults["eps"] = 1.0  # read-only: the frozen record cannot change under a caller


def test_families_and_rules_are_the_registry_s():
    fam = {n: optimizer_info(n).family for n in ("sgd", "lars", "adam", "adamw", "lamb", "merit")}
    assert fam == {"sgd": "sgd", "lars": "sgd", "adam": "adam", "adamw": "adam", "lamb": "adam", "merit": "adam"}
    assert optimizer_info("lars").layerwise and not optimizer_info("adamw").layerwise


def test_unknown_name_lists_the_valid_ones_everywhere():
    pattern = r"unknown optimizer 'adagrad' \(did you mean .*\); valid: sgd, adam, adamw, lars, lamb, merit"
    for call in (lambda: optimizer_info("adagrad"), lambda: create_optimizer("adagrad", _model(), lr=0.1),
                 lambda: Recipe(batch_size=8, lr=0.1, optimizer="adagrad"), lambda: default_rule("adagrad")):
        with pytest.raises(ValueError, match=pattern):
            call()


def test_scale_cli_unknown_optimizer_lists_them(capsys):
    from bigbatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["scale", "--from-batch", "256", "--to-batch", "512", "--lr", "0.1", "--optimizer", "adagrad"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "valid: sgd, adam, adamw, lars, lamb, merit" in err
    assert "no default scaling rule" not in err and "Traceback" not in err


def test_family_hyperparameters_are_checked():
    with pytest.raises(ValueError, match="optimizer 'adamw' .*takes no momentum"):
        create_optimizer("adamw", _model(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="optimizer 'sgd' .*takes no betas"):
        create_optimizer("sgd", _model(), lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="momentum is not a hyperparameter of optimizer 'lamb'"):
        Recipe(batch_size=8, lr=0.1, optimizer="lamb", momentum=0.9)
    with pytest.raises(ValueError, match="eps is not a hyperparameter of optimizer 'sgd'"):
        Recipe(batch_size=8, lr=0.1, optimizer="sgd", eps=1e-8)
    assert Recipe(batch_size=8, lr=0.1, optimizer="lars", eps=1e-9).eps == 1e-9  # LARS's own (trust-ratio) eps


# ---------------------------------------------------------------- an optimizer from outside
def test_module_class_spec_is_read_from_its_signature_and_trains():
    info = optimizer_info(SPEC)
    assert OPTIMIZERS[SPEC] is info and SPEC in optimizer_names()
    assert (info.family, info.default_rule, dict(info.defaults)) == ("sgd", "linear", {"momentum": 0.9})
    assert not info.foreach and not info.fused and not info.layerwise
    model = _model()
    opt = create_optimizer(SPEC, model, lr=0.01, momentum=0.8)
    assert isinstance(opt, ext_optim.Signum) and opt.param_groups[0]["momentum"] == 0.8
    losses = _fit(opt, model)
    assert losses[-1] < 0.2 * losses[0]
    with pytest.raises(ValueError, match=f"optimizer '{SPEC}' has no foreach path"):
        create_optimizer(SPEC, model, lr=0.01, foreach=True)


def test_module_class_spec_in_a_recipe_and_the_scaling_rules():
    base = Recipe(batch_size=64, lr=0.01, optimizer=SPEC, momentum=0.8, warmup_epochs=1.0, dataset_size=6400)
    res = rescale(base, 256)
    assert res.rule == "linear" and res.recipe.lr == pytest.approx(0.04)
    assert any(f"default for optimizer '{SPEC}'" in n for n in res.notes)
    assert ScalingPlan(base).hparams_for(256) == {"momentum": 0.8, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="betas is not a hyperparameter"):
        Recipe(batch_size=64, lr=0.01, optimizer=SPEC, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="adam-sqrt.*needs an Adam-family optimizer"):
        rescale(base, 256, "adam-sqrt")


def test_register_an_info_record_under_a_short_name():
    info = register_optimizer(OptimizerInfo(
        "signum-test", ext_optim.Signum, "sgd", "sqrt", {"momentum": 0.5}, "signSGD with momentum"))
    try:
        assert optimizer_info("signum-test") is info and default_rule("signum-test") == "sqrt"
        assert create_optimizer("signum-test", _model(), lr=0.01).param_groups[0]["momentum"] == 0.5
        with pytest.raises(ValueError, match="optimizer 'sgd' is already registered.*overwrite=True"):
            register_optimizer(dataclasses.replace(info, name="sgd"))
        register_optimizer(info)  # the same record again: no error
        assert optimizer_info("signum-test") == info
        with pytest.raises(ValueError, match="unknown default_rule 'sqrtt'"):
            register_optimizer(dataclasses.replace(info, name="bad", default_rule="sqrtt"))
    finally:
        OPTIMIZERS.pop("signum-test")


def test_entry_point_is_found_by_name(tmp_path, monkeypatch):
    dist = tmp_path / "signum_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: signum-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[bigbatch.optimizers]\nsignum-ep = {SPEC}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        info = optimizer_info("signum-ep")
        assert info.name == "signum-ep" and info.build is ext_optim.Signum and info.family == "sgd"
    finally:
        OPTIMIZERS.pop("signum-ep", None)


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("no_such_module_xyz:Opt", "module 'no_such_module_xyz' cannot be imported"),
        ("ext_optim:Nope", "module 'ext_optim' has no attribute 'Nope'"),
        ("ext_optim:not_an_optimizer", "must name a torch.optim.Optimizer subclass or an OptimizerInfo"),
        ("ext_optim:", "a spec is 'module:Class'"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, needle):
    with pytest.raises(ValueError, match=needle):
        optimizer_info(spec)
    assert spec not in OPTIMIZERS


def test_module_class_spec_trains_through_train_api(tmp_path):
    from bigbatch.train import TrainConfig, train

    ext_optim.Signum.last = None
    res = train(TrainConfig(workload="linreg", workload_args={"dim": 4}, batch_size=32, lr=0.01, optimizer=SPEC,
                            budget_samples=32 * 40, checkpoint_every_samples=0, progress="none", out=str(tmp_path)))
    opt = ext_optim.Signum.last
    assert opt is not None and res.summary["optimizer"] == SPEC and res.summary["rule"] == "linear"
    assert not res.summary["diverged"] and opt.state  # it stepped: momentum buffers exist


def test_momentum_reaches_an_sgd_family_optimizer_from_outside(tmp_path):
    from bigbatch.train import TrainConfig, train

    train(TrainConfig(workload="linreg", workload_args={"dim": 4}, batch_size=32, lr=0.01, optimizer=SPEC,
                      momentum=0.5, budget_samples=32 * 4, checkpoint_every_samples=0, progress="none",
                      out=str(tmp_path)))
    assert ext_optim.Signum.last.param_groups[0]["momentum"] == 0.5


def test_cli_train_with_a_module_class_optimizer_from_the_current_directory(tmp_path):
    # Run from tests/ (where ext_optim.py lives) without PYTHONPATH naming it: the spec is
    # importable from the current directory, as `python -m` would make it.
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "bigbatch", "train", "--workload", "linreg", "--workload-arg", "dim=4",
                        "--optimizer", SPEC, "--lr", "0.01", "--budget-samples", "640", "--progress", "none",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "summary.json").exists()


def test_cli_train_unknown_optimizer_lists_them(tmp_path, capsys):
    from bigbatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--workload", "linreg", "--optimizer", "adagrad", "--progress", "none", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "valid: sgd, adam, adamw, lars, lamb, merit" in err and "no default scaling rule" not in err, err


# ------------------------------------------------------------------------- param_groups input
def test_param_groups_takes_tensors_and_named_pairs_and_refuses_the_rest():
    model = _model()
    by_model = param_groups(model, 0.1)
    by_pairs = param_groups(model.named_parameters(), 0.1)
    assert [g["names"] for g in by_model] == [g["names"] for g in by_pairs]
    by_tensors = param_groups(list(model.parameters()), 0.1)  # was: AttributeError (issue 16)
    assert [[id(p) for p in g["params"]] for g in by_tensors] == [[id(p) for p in g["params"]] for g in by_model]
    assert [(g["weight_decay"], g["adapt"]) for g in by_tensors] == [(0.1, True), (0.0, False)]
    with pytest.raises(ValueError, match="name patterns need names"):
        param_groups(list(model.parameters()), 0.1, no_decay=["bias"])
    for bad in (torch.zeros(3), 5, [1, 2], "weights"):
        with pytest.raises(ValueError, match="model must be an nn.Module"):
            param_groups(bad, 0.1)


def test_create_optimizer_takes_named_parameters_and_refuses_a_bare_tensor():
    model = _model()
    opt = create_optimizer("adamw", model.named_parameters(), lr=0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    with pytest.raises(ValueError, match="got a single tensor"):
        create_optimizer("adamw", torch.zeros(3, requires_grad=True), lr=0.01)
