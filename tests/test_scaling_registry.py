"""The rule registry (bigbatch/rules.py): one record per rule, read by every module; no import cycle."""

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

import bigbatch
from bigbatch import rules
from bigbatch.optim import LAMB, create_optimizer
from bigbatch.optim.factory import DECAY_FORMS, OPTIMIZERS
from bigbatch.rules import LR_ONLY_RULES, RULES, RuleInfo
from bigbatch.scaling import Recipe, lr_factor, rescale

PKG = Path(bigbatch.__file__).parent


def test_records_say_what_each_rule_does():
    assert list(RULES) == ["linear", "sqrt", "legw", "adam-sqrt", "none"]
    for name, r in RULES.items():
        assert r.name == name and r.paper
    for k in (0.25, 2.0, 8.0):
        assert RULES["linear"].lr_factor(k) == k and RULES["none"].lr_factor(k) == 1.0
        assert RULES["sqrt"].lr_factor(k) == math.sqrt(k) == RULES["legw"].lr_factor(k) == RULES["adam-sqrt"].lr_factor(k)
        assert lr_factor("sqrt", k) == math.sqrt(k)
    assert LR_ONLY_RULES == ("linear", "sqrt", "none")
    assert [n for n, r in RULES.items() if r.warmup == "scaled"] == ["legw"]
    assert [n for n, r in RULES.items() if r.adam_hparams] == ["adam-sqrt"]


def test_every_module_reads_the_one_registry():
    from bigbatch.cli.scale import ScaleConfig
    from bigbatch.integrations import common
    from bigbatch.study import config

    assert common.LR_ONLY_RULES is rules.LR_ONLY_RULES
    assert set(config.RULES) == set(RULES)
    for info in OPTIMIZERS.values():
        assert info.default_rule is None or info.default_rule in RULES
    with pytest.raises(ValueError, match="unknown rule 'cubic'"):
        ScaleConfig(to_batch=8, rule="cubic").resolve()


def test_rescale_reads_the_record_not_the_name(monkeypatch):
    # A rule added as one record is applied by rescale with no other change: here a cube-root LR
    # rule with LEGW's warmup stretch.
    monkeypatch.setitem(rules._RULES, "cbrt-legw", RuleInfo("cbrt-legw", "a test rule", 1 / 3, warmup="scaled"))
    res = rescale(Recipe(batch_size=64, lr=0.1, optimizer="sgd", warmup_epochs=1.0), 512, "cbrt-legw")
    assert res.recipe.lr == pytest.approx(0.2, rel=1e-12) and res.recipe.warmup_epochs == 8.0
    assert "a test rule" in next(c.reason for c in res.changes if c.field == "lr")
    with pytest.raises(ValueError, match="warmup must be one of same, scaled"):
        RuleInfo("bad", "x", 1.0, warmup="double")


def test_lamb_weight_decay_has_one_default():
    # Issue 27: LAMB() decayed by 0.01 while create_optimizer("lamb") (the trainer's path) passed 0.0.
    p = [torch.nn.Parameter(torch.ones(3, 3))]
    assert LAMB(p).defaults["weight_decay"] == create_optimizer("lamb", p, lr=1e-3).defaults["weight_decay"] == 0.0


def test_optimizers_declare_their_weight_decay():
    forms = {n: i.decay_form for n, i in OPTIMIZERS.items() if n in ("sgd", "adam", "adamw", "lars", "lamb", "merit")}
    assert forms == {"sgd": "l2", "adam": "l2", "adamw": "decoupled", "lars": "l2",
                     "lamb": "decoupled-trust", "merit": "decoupled-trust"}
    assert set(forms.values()) <= set(DECAY_FORMS)


# -- imports ----------------------------------------------------------------------------------
def _imports(path: Path, mod: str) -> set[str]:
    """bigbatch modules imported by ``path`` (module ``mod``), function-local ones included,
    TYPE_CHECKING ones not."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("bigbatch"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = mod.split(".")[: -node.level]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("bigbatch"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PKG.rglob("*.py")}
    g: dict[str, set[str]] = {}
    for name, p in files.items():
        deps = set()
        for d in _imports(p, ".".join(p.relative_to(PKG.parent).with_suffix("").parts)):
            # Importing a.b.c runs the package a.b first, unless the importer is inside a.b (whose
            # __init__ is then already running); the top package bigbatch imports nothing.
            parts = d.split(".")
            for i in range(2, len(parts) + 1):
                m = ".".join(parts[:i])
                if m in files and (i == len(parts) or not name.startswith(m + ".")):
                    deps.add(m)
        g[name] = deps - {name}
    return g


def _reaches(g: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), list(g[start])
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(g.get(m, ()))
    return False


def test_rules_is_a_leaf_and_the_rule_modules_form_no_cycle():
    g = _graph()
    assert g["bigbatch.rules"] == set()
    tree = ast.parse((PKG / "rules.py").read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in mods), mods
    for m in ("bigbatch.rules", "bigbatch.scaling", "bigbatch.recipe", "bigbatch.optim.factory", "bigbatch.optim"):
        assert not _reaches(g, m, m), f"{m} imports itself back"


def test_the_cycle_check_sees_a_function_local_back_import(tmp_path):
    # The old factory imported scaling inside register_optimizer; the check counts such imports.
    p = tmp_path / "factory.py"
    p.write_text("def f():\n    from ..scaling import RULES\n\nif TYPE_CHECKING:\n    from bigbatch.study import x\n")
    assert _imports(p, "bigbatch.optim.factory") == {"bigbatch.scaling", "bigbatch.scaling.RULES"}
    g = _graph()
    g["bigbatch.optim.factory"] = g["bigbatch.optim.factory"] | {"bigbatch.scaling"}
    assert _reaches(g, "bigbatch.optim.factory", "bigbatch.optim.factory")
