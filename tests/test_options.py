"""Every numeric option of every sub-command, and every numeric or boolean method hyper-parameter,
refuses a bad value up front: exit code 2, the option named, one line, no traceback."""
import argparse
import json

import pytest

from bench import options
from bench.cli import build_parser, main
from bench.methods import METHODS
from bench.options import check_for_default


def sub_commands(parser, path=()):
    """(("run",), parser), (("foundation", "build"), parser), ...: every leaf sub-command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and path:
        yield path, parser
    for action in subs:
        for name, sp in action.choices.items():
            yield from sub_commands(sp, path + (name,))


def options_of(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def is_numeric(action) -> bool:
    default_is_number = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
    return action.type in (int, float) or (action.type is None and default_is_number and action.nargs != 0)


def checked_options():
    return [pytest.param(path, a, id=f"{' '.join(path)} {a.option_strings[-1]}")
            for path, p in sub_commands(build_parser()) for a in options_of(p) if hasattr(a.type, "bad")]


def required_args(parser) -> list:
    """Placeholders for the required arguments, so parsing reaches the option under test."""
    args = []
    for a in parser._actions:
        if a.option_strings and a.required:
            args += [a.option_strings[0], "full"]
        elif not a.option_strings and not isinstance(a, argparse._SubParsersAction) and a.nargs is None:
            args.append("x")
    return args


def assert_clean_refusal(capsys, name: str) -> str:
    err = capsys.readouterr().err
    assert name in err and "must be" in err and "Traceback" not in err, err
    return err


def test_every_numeric_option_has_a_check():
    unchecked = [f"bench {' '.join(path)} {a.option_strings[-1]}" for path, p in sub_commands(build_parser())
                 for a in options_of(p) if is_numeric(a)]
    assert not unchecked, f"numeric options without a bench.options check: {unchecked}"
    assert len(checked_options()) >= 30  # run, tune, sweep, perf, ui, foundation, leaderboard, report


@pytest.mark.parametrize("path,action", checked_options())
def test_bad_value_is_refused_with_the_option_named(path, action, capsys):
    parser = dict(sub_commands(build_parser()))[path]
    values = [action.type.bad] * (action.nargs if isinstance(action.nargs, int) else 1)
    for bad in (values, ["abc"] * len(values)):
        with pytest.raises(SystemExit) as e:
            main([*path, *required_args(parser), action.option_strings[-1], *bad])
        assert e.value.code == 2
        err = assert_clean_refusal(capsys, f"argument {'/'.join(action.option_strings)}")
        assert len(err.strip().splitlines()[-1]) < 200  # one line after the usage


def test_the_reported_case_iterations_0():
    with pytest.raises(SystemExit) as e:
        main(["run", "--method", "lora", "--shots", "1", "--iterations", "0"])
    assert e.value.code == 2


def method_hyper_parameters():
    out = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        for key, default in cls.defaults.items():
            check = cls.hp_checks.get(key) or check_for_default(default)
            if hasattr(check, "bad"):
                out.append(pytest.param(name, key, check, id=f"{name}-{key}"))
    return out


@pytest.mark.parametrize("method,key,check", method_hyper_parameters())
def test_bad_hyper_parameter_is_refused_before_anything_runs(method, key, check, bench_home, capsys):
    assert main(["run", "--method", method, "--hp", f"{key}={check.bad}"]) == 2
    assert_clean_refusal(capsys, f"hyper-parameter {key}")
    assert not (bench_home / "runs").exists()  # refused before any work


def test_every_method_numeric_hyper_parameter_is_checked():
    hp = method_hyper_parameters()
    assert {"gamma", "penalty", "r", "alpha", "dropout", "reduction", "hierarchical"} <= {p.values[1] for p in hp}


def test_checked_values_keep_their_type():
    assert options.positive_int("3") == 3 and options.positive_float("3e-3") == 3e-3
    assert options.positive_float(16) == 16 and isinstance(options.positive_float(16), int)  # recorded as given
    assert options.comma_list(options.positive_int)("1,3,5") == [1, 3, 5]
    assert options.boolean("False") is False and options.boolean(True) is True
    for check, value in [(options.positive_int, True), (options.positive_int, 2.0), (options.positive_float, "nan"),
                         (options.nonneg_float, float("inf")), (options.comma_list(options.nonneg_int), "")]:
        with pytest.raises(options.OptionError):
            check(value)
    lora = METHODS.get("lora")(alpha=16, dropout=0.1)
    assert lora.hp["alpha"] == 16 and isinstance(lora.hp["alpha"], int)


def test_sweep_file_values_pass_the_same_checks(tmp_path, bench_home, capsys):
    f = tmp_path / "grid.json"
    f.write_text(json.dumps({"methods": "full", "shots": [1, 0], "repeats": 1}))
    assert main(["sweep", "--file", str(f), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "'shots'" in err and "must be" in err and "Traceback" not in err
