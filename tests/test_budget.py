"""The dataset's budget: iterations per training case on top of a floor, the same for every method of a
table, its own for the reference rows; and the reference rows reused across shot counts."""
import json

import pytest

from bench.captions import iterations_line
from bench.datasets import get_dataset
from bench.protocols import Protocol
from bench.results import synthetic_results
from bench.runner import RunSpec, run
from bench.stats import check_equal_budgets


def test_phantom_budget_grows_with_the_cases_a_run_trains_on():
    pool = len(Protocol.load("phantom").pool)
    assert [RunSpec(method="full", shots=s).iterations for s in (1, 3, 5)] == [60, 60, 100]
    assert [RunSpec(method="dgst", shots=s, repeat=4).iterations for s in (1, 3, 5)] == [60, 60, 100]
    assert RunSpec(method="oracle", shots=1).iterations == 20 * pool == 600   # the whole pool, at any shots
    assert RunSpec(method="zero-shot", shots=5).iterations == 60              # trains on nothing
    assert RunSpec(method="oracle", shots=5, iterations=7).iterations == 7    # an explicit budget wins
    assert get_dataset("phantom").budget(0) == 60


def test_real_releases_keep_a_fixed_budget():
    for name in ("segrap2023", "lnq2023"):
        ds = get_dataset(name)
        assert ds.iterations_per_case == 0 and ds.budget(1) == ds.budget(500) == 12_500


def _with_budget(df, iterations):
    df = df.copy()
    df["iterations"] = df["method"].map(iterations).fillna(100).astype(int)
    return df


def test_equal_budgets_compare_methods_not_reference_rows():
    df = synthetic_results({"dgst": 0.6, "full": 0.5, "oracle": 0.7, "zero-shot": 0.3}, shots=(5,))
    check_equal_budgets(_with_budget(df, {"oracle": 600, "zero-shot": 60}), "phantom", 5)
    with pytest.raises(ValueError, match=r"differ in training iterations \(dgst: 100; full: 60\)"):
        check_equal_budgets(_with_budget(df, {"oracle": 600, "full": 60}), "phantom", 5)


def test_caption_states_the_budget_per_shot_count_and_the_oracles_own():
    df = synthetic_results({"dgst": 0.6, "oracle": 0.7}, shots=(1, 5))
    df["trainable_params"] = 10
    df["iterations"] = [600 if m == "oracle" else (100 if s == 5 else 60) for m, s in zip(df.method, df.shots)]
    line = iterations_line(df.drop_duplicates(["method", "shots", "repeat"]))
    assert line.startswith("Iterations: 60 at 1-shot; 100 at 5-shot, the same for every method of a table")
    assert "oracle 600" in line
    df["iterations"] = 60
    assert iterations_line(df) == "Iterations: 60 per run, the same for every method of a table."


def test_reference_rows_are_reused_across_shot_counts(bench_home, tiny_foundation):
    lines = []
    first = run(RunSpec(method="oracle", shots=1, iterations=2, eval_every=1, foundation=str(tiny_foundation),
                        device="cpu"), log=lines.append)
    assert not any("reusing run" in line for line in lines)
    lines.clear()
    spec = RunSpec(method="oracle", shots=3, iterations=2, eval_every=1, foundation=str(tiny_foundation),
                   device="cpu")
    again = run(spec, log=lines.append)
    assert any(f"reusing run {first['run_id']}" in line for line in lines)
    assert again["reused_from"] == {"run_id": first["run_id"], "shots": 1, "protocol_version": "v3"}
    assert again["run_id"] == spec.run_id() != first["run_id"]
    assert again["spec"]["shots"] == 3 and again["support"] == Protocol.load("phantom").split(3, 0).support
    assert again["cases"] == first["cases"] and again["trained_on"] == first["trained_on"]
    saved = json.loads((bench_home / "runs" / "phantom" / "oracle" / "shots3" / "repeat0" / spec.run_id()
                        / "result.json").read_text())
    assert saved["reused_from"]["run_id"] == first["run_id"] and saved["mlflow_run_id"] != first["mlflow_run_id"]
    model = bench_home / "runs" / "phantom" / "oracle" / "shots3" / "repeat0" / spec.run_id() / "model"
    assert (model / "plans.json").is_file() and saved["model_dir"] == str(model)
    # only the reference rows read nothing of the shots; every other method trains on its support set
    from bench.methods import METHODS
    assert {m for m in METHODS.names() if not METHODS.get(m).depends_on_shots} == {"oracle", "zero-shot"}


def test_sweep_trains_a_reference_row_once_per_repeat_before_its_twins():
    """Its other shot counts wait in a second wave, so no two workers train the same oracle run."""
    from bench.sweep import _twin_waves, grid
    specs = grid(["oracle", "full", "zero-shot"], ["phantom"], [1, 3, 5], [0, 1])
    first, twins = _twin_waves(specs)
    assert sorted((s.method, s.shots, s.repeat) for s in twins) == sorted(
        (m, k, r) for m in ("oracle", "zero-shot") for k in (3, 5) for r in (0, 1))
    assert {(s.method, s.shots) for s in first} == {("oracle", 1), ("zero-shot", 1)} | {("full", k) for k in (1, 3, 5)}
    assert len(first) + len(twins) == len(specs) == 18
