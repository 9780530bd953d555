"""``bigbatch scale``: the issue's example, --json, --out, --plot, and one-line errors."""

import json

import pytest

from bigbatch.cli import main
from bigbatch.scaling import Recipe

EXAMPLE = ["scale", "--from-batch", "256", "--to-batch", "8192", "--lr", "0.1", "--optimizer", "sgd", "--warmup-epochs", "0.25"]


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def row(text, field):
    return next(line.split() for line in text.splitlines() if line.startswith(field + " "))


def test_issue_example_legw(capsys):
    code, out, _ = run(capsys, *EXAMPLE, "--rule", "legw")
    assert code == 0
    assert row(out, "lr")[1:3] == ["0.1", "0.566"]
    assert row(out, "warmup_epochs")[1:3] == ["0.25", "8"]
    assert "You et al. 2019" in out


def test_issue_example_linear_and_default_rule_said(capsys):
    code, out, _ = run(capsys, *EXAMPLE)
    assert code == 0
    assert row(out, "lr")[1:3] == ["0.1", "3.2"]
    assert row(out, "warmup_epochs")[1:3] == ["0.25", "0.25"]
    assert "default for optimizer 'sgd'" in out


def test_json_out_and_plot(capsys, tmp_path):
    toml = tmp_path / "new.toml"
    png = tmp_path / "lr.png"
    code, out, _ = run(capsys, "scale", "--from-batch", "256", "--to-batch", "1024", "--lr", "1e-3", "--optimizer",
                       "adamw", "--betas", "0.9,0.999", "--budget-epochs", "10", "--schedule", "cosine",
                       "--warmup-epochs", "1", "--json", "--out", str(toml), "--plot", str(png))
    assert code == 0
    d = json.loads(out)
    assert d["rule"] == "adam-sqrt" and d["old"]["batch_size"] == 256 and d["new"]["batch_size"] == 1024
    assert d["new"]["lr"] == pytest.approx(2e-3) and d["new"]["betas"] == pytest.approx([0.6, 0.996])
    assert d["new"]["warmup_epochs"] == 1.0 and any("Malladi" in r for r in d["reasons"])
    assert Recipe.from_toml(toml).lr == pytest.approx(2e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recipe_file_with_flag_override(capsys, tmp_path):
    src = tmp_path / "r.toml"
    src.write_text(Recipe(batch_size=128, lr=0.2, optimizer="lars", warmup_epochs=2.0).to_toml())
    code, out, _ = run(capsys, "scale", "--recipe", str(src), "--to-batch", "512", "--lr", "0.4", "--json")
    assert code == 0
    d = json.loads(out)
    # the default rule for lars is legw: lr x sqrt(4), warmup x 4
    assert d["old"]["lr"] == 0.4 and d["new"]["lr"] == pytest.approx(0.8) and d["rule"] == "legw"
    assert d["new"]["warmup_epochs"] == pytest.approx(8.0)


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--lr", "-0.1"], "error: --lr must be > 0"),
        (["--lr", "0.1", "--rule", "lgew"], "unknown rule 'lgew'"),
        (["--lr", "0.1", "--schedule", "cosin", "--budget-epochs", "9"], "unknown schedule 'cosin'"),
        (["--lr", "0.1", "--optimizer", "adamw", "--betas", "0.9,1.2"], "beta2) must be in [0.0, 1.0)"),
        (["--lr", "0.1", "--schedule", "multistep", "--milestones", "60,30"], "milestones must be strictly increasing"),
        (["--lr", "0.1", "--warmup-epochs", "20", "--budget-epochs", "10"], "--warmup-epochs must be <= --budget-epochs"),
        ([], "--lr required"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, extra, field):
    code, out, err = run(capsys, "scale", "--from-batch", "256", "--to-batch", "512", *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and field in err
    assert out == ""


def test_bad_batch_sizes(capsys):
    code, _, err = run(capsys, "scale", "--from-batch", "0", "--to-batch", "512", "--lr", "0.1")
    assert code == 2 and "--from-batch must be a positive integer" in err
    code, _, err = run(capsys, "scale", "--from-batch", "256", "--lr", "0.1")
    assert code == 2 and "--to-batch is required" in err
    code, _, err = run(capsys, "scale", "--recipe", "/nonexistent/r.toml", "--to-batch", "4")
    assert code == 2 and err.count("\n") == 1
