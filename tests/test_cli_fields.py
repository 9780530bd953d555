"""The CLI is generated from the config dataclasses: every field a flag, every flag a field."""

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from bigbatch.cli import _SUBCOMMANDS, app, main
from bigbatch.cli._fields import field_docs, flag_message, flags_for
from bigbatch.cli.scale import ScaleConfig
from bigbatch.cli.train import make_train_command
from bigbatch.plan import PlanConfig
from bigbatch.recipe import Recipe
from bigbatch.study.config import StudyConfig
from bigbatch.train.config import TrainConfig

#: Flags that are not config fields, per command (documented in each command's module).
EXCEPTIONS = {
    "train": {"--corpus", "--packing", "--config"},  # bytelm workload_args shortcuts; the TOML file
    "study": {"--config"},
    "scale": set(),
    "plan": set(),
}
#: Fields whose flag is not ``--field-name`` (``x_args`` dicts are ``--x-arg``).
RENAMED = {"fsdp": "--fsdp", "batch_size@scale": "--from-batch"}
CONFIGS = {"train": (TrainConfig,), "study": (StudyConfig,), "scale": (ScaleConfig, Recipe), "plan": (PlanConfig,)}


def _command(name):
    return typer.main.get_command(app).get_command(None, name)


def _expected_flag(cmd, field):
    if f"{field}@{cmd}" in RENAMED:
        return RENAMED[f"{field}@{cmd}"]
    if field in RENAMED:
        return RENAMED[field]
    return "--" + (field[:-1] if field.endswith("_args") else field).replace("_", "-")


@pytest.mark.parametrize("cmd", ["train", "study", "scale", "plan"])
def test_every_field_has_a_flag_and_every_flag_a_field(cmd):
    params = [p for p in _command(cmd).params if p.name != "help"]
    flags = {p.opts[0]: p.name for p in params}
    fields = [f.name for cls in CONFIGS[cmd] for f in dataclasses.fields(cls)]
    expected = {_expected_flag(cmd, f): f for f in fields}
    assert set(flags) - set(expected) == EXCEPTIONS[cmd], "a flag that is no field (add it to EXCEPTIONS and the docs)"
    assert set(expected) <= set(flags), f"fields without a flag: {sorted(set(expected) - set(flags))}"
    for flag, field in expected.items():
        assert flags[flag] == field
    # Every field's help is its docstring (no field without one).
    docs = {k: v for cls in CONFIGS[cmd] for k, v in field_docs(cls).items()}
    assert set(fields) <= set(docs)


def test_existing_spellings_still_work():
    spelled = {o for p in _command("train").params for o in p.opts + p.secondary_opts}
    for o in ("-w", "--workload-arg", "--fsdp", "--ddp", "--no-amp", "--noise-scale", "--resume", "--corpus",
              "--packing", "--adaptive-arg", "--optimizer-arg", "--config"):
        assert o in spelled, o
    assert "-w" in {o for p in _command("study").params for o in p.opts}
    assert {"--from-batch", "--to-batch", "--json", "--recipe"} <= {o for p in _command("scale").params for o in p.opts}


def _capture(config_cls=TrainConfig):
    seen = []
    sub = typer.Typer(rich_markup_mode=None)
    sub.command("train")(make_train_command(config_cls, run=seen.append))
    return sub, seen


def test_a_field_added_to_trainconfig_is_a_flag_with_no_other_edit():
    @dataclass(kw_only=True, slots=True)
    class Extended(TrainConfig):
        lookahead_steps: int = 5
        """Steps of a new feature, added by a test."""

    sub, seen = _capture(Extended)
    runner = CliRunner()
    r = runner.invoke(sub, ["--help"], env={"COLUMNS": "100"})
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "--lookahead-steps <int> Steps of a new feature, added by a test. [default: 5]" in text
    r = runner.invoke(sub, ["--lookahead-steps", "7", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    assert seen[-1].lookahead_steps == 7 and seen[-1].batch_size == 16
    r = runner.invoke(sub, ["--lr", "0.5"])
    assert seen[-1].lookahead_steps == 5 and seen[-1].lr == 0.5
    r = runner.invoke(sub, ["--lookahead-steps", "x"])
    assert r.exit_code == 2 and "--lookahead-steps" in r.output


def test_config_file_then_flags_override(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('workload = "linreg"\nbatch_size = 32\nlr = 0.1\nnoise_scale = true\n[workload_args]\ndim = 4\n')
    sub, seen = _capture()
    r = CliRunner().invoke(sub, ["--config", str(p), "--batch-size", "64", "-w", "noise_std=0.5", "--no-noise-scale"])
    assert r.exit_code == 0, r.output
    cfg = seen[-1]
    assert (cfg.workload, cfg.batch_size, cfg.lr, cfg.noise_scale) == ("linreg", 64, 0.1, False)
    assert cfg.workload_args == {"dim": 4, "noise_std": 0.5}


def test_optimizer_arg_and_shortcuts(tmp_path):
    sub, seen = _capture()
    r = CliRunner().invoke(sub, ["--optimizer-arg", "eps=1e-8", "--optimizer-arg", "nesterov=true",
                                 "--corpus", str(tmp_path), "--packing", "bfd"])
    assert r.exit_code == 0, r.output
    assert seen[-1].optimizer_args == {"eps": 1e-8, "nesterov": True}
    assert seen[-1].workload_args == {"corpus": [str(tmp_path)], "packing": "bfd"}
    with pytest.raises(ValueError, match="^--optimizer-arg must be key=value, got 'eps'$"):
        CliRunner().invoke(sub, ["--optimizer-arg", "eps"], catch_exceptions=False)


def test_adaptive_arg_help_names_real_controller_keys():
    from bigbatch.adaptive import CONTROLLERS

    helps = {p.name: p.help for p in _command("train").params}
    text = helps["adaptive_args"]
    assert "max_batch_size" not in text and "max_batch=" in text
    for name, cls in CONTROLLERS.items():
        m = re.search(rf"\b{name}: ([a-z_, ]+)", text)
        assert m, f"controller {name} missing from the help"
        keys = [k.strip() for k in m.group(1).split(",")]
        accepted = set()
        for klass in cls.__mro__:
            if "__init__" in klass.__dict__:
                accepted |= set(inspect.signature(klass.__dict__["__init__"]).parameters)
        assert keys and set(keys) <= accepted, (name, set(keys) - accepted)


@pytest.mark.parametrize(
    "msg,want",
    [
        ("batch_size must be >= 1, got 0", "--batch-size must be >= 1, got 0"),
        ("lr must be > 0 and finite, got -1", "--lr must be > 0 and finite, got -1"),
        ("micro_batch_size (12) must divide batch_size (64)", "--micro-batch-size (12) must divide --batch-size (64)"),
        ("changed on resume: lr 0.1 -> 0.2; batch_size 64 -> 128", "changed on resume: --lr 0.1 -> 0.2; --batch-size 64 -> 128"),
        ("unknown optimizer 'adagrad'", "unknown optimizer 'adagrad'"),  # plain English word left alone
        ("--lr must be > 0", "--lr must be > 0"),  # already a flag
        ("fsdp needs torchrun", "--fsdp needs torchrun"),
    ],
)
def test_field_names_become_flags(msg, want):
    assert flag_message(msg, flags_for(TrainConfig, decls={"fsdp": ("--fsdp/--ddp",)})) == want


def test_library_error_is_translated_user_error_is_not():
    from bigbatch._checks import check_int_positive

    def library(cfg):
        check_int_positive("batch_size", 0)

    def user_code(cfg):
        raise ValueError("batch_size is odd in my workload")

    for run, want in ((library, "--batch-size must be a positive integer"), (user_code, "batch_size is odd")):
        sub = typer.Typer()
        sub.command("train")(make_train_command(run=run))
        with pytest.raises(ValueError) as e:
            CliRunner().invoke(sub, [], catch_exceptions=False)
        assert str(e.value).startswith(want)


def test_study_error_names_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--budget", "0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --budget must be") and err.count("\n") == 1


@pytest.mark.parametrize("cmd", ["train", "study", "scale", "plan"])
def test_help_at_80_columns_shows_every_flag_in_full(cmd, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for p in _command(cmd).params:
        for o in p.opts + p.secondary_opts:
            assert re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", out), o


def test_subcommands_all_exist_and_match_their_listing():
    assert "bench" not in _SUBCOMMANDS
    for name, line in _SUBCOMMANDS.items():
        cmd = _command(name)
        assert cmd is not None and cmd.help.splitlines()[0].strip() == line


def test_missing_subcommand_module_is_an_import_error(monkeypatch):
    monkeypatch.setitem(_SUBCOMMANDS, "nosuchcommand", "a command without a module")
    with pytest.raises(ModuleNotFoundError):
        _command("nosuchcommand")


def test_root_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from bigbatch.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("False"), r.stdout + r.stderr


def test_configs_share_one_helper_set():
    from bigbatch._config import ConfigMixin

    for cls in (TrainConfig, StudyConfig, ScaleConfig):
        assert issubclass(cls, ConfigMixin)
        for m in ("to_dict", "from_dict", "from_toml", "replace"):
            assert m not in cls.__dict__, f"{cls.__name__} redefines {m}"
        assert not hasattr(cls(), "__dict__")  # still slotted
    cfg = TrainConfig(batch_size=8, workload_args={"dim": 4})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and cfg.replace(lr=0.1).lr == 0.1
    with pytest.raises(ValueError, match="unknown train config field"):
        TrainConfig.from_dict({"batch": 1})


# -- unwritable output paths: one line, exit 2 ---------------------------------------------------
def _blocked_paths(tmp_path):
    """Output paths that cannot be written: under a regular file (always), in a read-only dir (not as root)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    paths = [afile / "out", afile / "sub" / "out"]
    if os.geteuid() != 0:  # root ignores the mode bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        paths.append(ro / "out")
    return paths


def _one_line_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    assert e.value.code == 2, out
    assert out.err.startswith("error: ") and out.err.count("\n") == 1 and "Traceback" not in out.err, out.err
    return out


def test_scale_out_unwritable_is_one_line(tmp_path, capsys):
    for p in _blocked_paths(tmp_path):
        for flag, suffix in (("--out", ".toml"), ("--plot", ".png")):
            out = _one_line_exit_2(capsys, ["scale", "--from-batch", "256", "--to-batch", "512", "--lr", "0.1",
                                            flag, str(p) + suffix])
            assert flag in out.err


def test_noise_out_unwritable_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rec = '{"kind": "train", "samples": %d, "batch_size": 8, "b_simple": 20.0, "grad_sqnorm": 1.0, "trace_sigma": 20.0}\n'
    (run / "metrics.jsonl").write_text("".join(rec % (8 * i) for i in range(1, 4)))
    for p in _blocked_paths(tmp_path):
        out = _one_line_exit_2(capsys, ["noise", str(run), "--out", str(p) + ".png"])
        assert "--out" in out.err and out.out == ""
