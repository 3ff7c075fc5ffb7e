"""`bench report` and `bench leaderboard` on synthetic result.json files; result loading rules."""
import json
import os
from pathlib import Path

import pytest

from bench.cli import main
from bench.metrics import METRICS
from bench.results import load_results, synthetic_results


def write_runs(df, runs: Path, **extra) -> list:
    """One result.json (schema 1) per (dataset, method, shots, repeat) cell of ``df``."""
    paths = []
    for (dataset, method, shots, repeat), rows in df.groupby(["dataset", "method", "shots", "repeat"]):
        first = rows.iloc[0]
        result = {
            "schema_version": 1, "run_id": f"{method}{shots}{repeat}", "code_version": "0.1.0",
            "spec": {"method": method, "dataset": dataset, "shots": int(shots), "repeat": int(repeat), "seed": 0,
                     "iterations": int(first.iterations), "params_source": first.params_source, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 3e-5, "hparams": {},
                     "foundation": "phantom-v1", "protocol_version": "v1", "device": "cpu"},
            "support": ["ph_010"], "test": list(rows.case_id),
            "cost": {"train_seconds": float(first.train_seconds), "step_seconds_median": 0.4,
                     "peak_memory_mb": float(first.peak_memory_mb), "device": "cpu"},
            "params": {"total": 10_000, "trainable": int(first.trainable_params),
                       "changed": int(first.changed_params)},
            "summary": {"dice_mean": float(rows.dice.mean())},
            "cases": [{"case_id": r.case_id, **{m: getattr(r, m) for m in METRICS}} for r in rows.itertuples()],
            **extra,
        }
        path = runs / dataset / method / f"shots{shots}" / f"repeat{repeat}" / result["run_id"] / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, default=lambda v: v.item()))
        paths.append(path)
    return paths


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    df = synthetic_results({"dgst": 0.80, "full": 0.70, "lora": 0.65}, shots=(1, 3), repeats=3, cases=5)
    write_runs(df, tmp_path / "home" / "runs")
    return tmp_path / "home"


def test_load_results_reads_every_case(home):
    df = load_results(home / "runs")
    assert len(df) == 3 * 2 * 3 * 5
    assert set(df.method) == {"dgst", "full", "lora"} and set(df.shots) == {1, 3}
    assert {"trainable_params", "train_seconds", "peak_memory_mb", "protocol_version", *METRICS} <= set(df.columns)


def test_unknown_schema_version_is_refused(home, capsys):
    bad = next((home / "runs").rglob("result.json"))
    bad.write_text(json.dumps({**json.loads(bad.read_text()), "schema_version": 99}))
    with pytest.raises(ValueError, match=rf"{bad}.*schema_version 99"):
        load_results(home / "runs")
    assert main(["report", "--out", str(home / "r")]) == 2
    assert "schema_version 99" in capsys.readouterr().err


def test_duplicate_cell_keeps_the_newest_and_says_so(home, tmp_path):
    df = synthetic_results({"dgst": 0.3}, shots=(1,), repeats=1, cases=5)
    newer = write_runs(df, tmp_path / "newer")[0]
    old = next((home / "runs").rglob("dgst/shots1/repeat0/*/result.json"))
    os.utime(newer, (old.stat().st_mtime + 10,) * 2)
    with pytest.warns(UserWarning, match="keeping the newest"):
        loaded = load_results([home / "runs", newer])
    cell = loaded[(loaded.method == "dgst") & (loaded.shots == 1) & (loaded.repeat == 0)]
    assert len(cell) == 5 and cell.dice.mean() == pytest.approx(df.dice.mean())


def test_tuning_split_results_are_skipped(tmp_path):
    write_runs(synthetic_results(), tmp_path, evaluated="tune")
    assert load_results(tmp_path).empty


def test_report_command_writes_report_and_logs_to_mlflow(home, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) is relative to the cwd
    out, uri = tmp_path / "report", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["report", "--out", str(out), "--tracking-uri", uri]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    for heading in ("## phantom", "### phantom, 1-shot", "### phantom, 3-shot", "**Versus `dgst`**",
                    "**All methods equal?**", "**Mean ranks and Nemenyi CD**", "**Rank stability**", "**Paper claim**"):
        assert heading in text
    for name in ("phantom_dice_box.png", "phantom_dice_vs_shots.png", "phantom_3shot_cd.png",
                 "phantom_3shot_pvalues.png"):
        assert (out / "figures" / name).is_file() and f"figures/{name}" in text
    assert (out / "tables" / "phantom_3shot_all_pairs.csv").is_file()

    import mlflow
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'report'")
    assert len(runs) == 1 and "metrics.phantom.3shot.claim_p" in runs.columns
    assert "metrics.phantom.3shot.omnibus_p" in runs.columns and "metrics.phantom.3shot.friedman_p" not in runs.columns
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.run_id[0])}
    assert {"report.md", "figures", "tables"} <= logged


def test_report_default_output_and_unknown_dataset(home, capsys):
    assert main(["report", "--dataset", "phantom"]) == 0
    reports = list((home / "reports").glob("*/report.md"))
    assert len(reports) == 1
    assert main(["report", "--dataset", "lnq2023"]) == 2
    assert "no results for dataset 'lnq2023'" in capsys.readouterr().err


def test_leaderboard_command_and_regeneration_from_snapshot(home, tmp_path):
    snap, first, second = tmp_path / "lb" / "results.csv", tmp_path / "lb", tmp_path / "again"
    assert main(["leaderboard", "--snapshot", str(snap), "--out", str(first)]) == 0
    assert snap.is_file() and (first / "phantom.md").is_file()
    assert main(["leaderboard", "--from-snapshot", "--snapshot", str(snap), "--out", str(second)]) == 0
    for name in ("phantom.md", "phantom.csv", "phantom.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert main(["leaderboard", "--from-snapshot", "--snapshot", str(tmp_path / "none.csv")]) == 2
    # A snapshot is also a valid --results source.
    from_csv, from_json = load_results(snap), load_results(home / "runs")
    key = ["method", "shots", "repeat", "case_id"]
    assert from_csv[key].equals(from_json[key])
    assert from_csv.dice.to_numpy() == pytest.approx(from_json.dice.to_numpy(), rel=1e-5)


def test_report_files_are_deterministic(tmp_path):
    from bench.report import write_report
    df = synthetic_results(shots=(3,), repeats=2, cases=5)
    write_report(df, tmp_path / "a", n_boot=200)
    write_report(df, tmp_path / "b", n_boot=200)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 8
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_leaderboard_refuses_unequal_budgets_and_selects_one(home, tmp_path, capsys):
    df = synthetic_results(repeats=2, cases=3)
    write_runs(df, tmp_path / "runs")
    lora = df[df.method == "lora"]
    write_runs(lora.assign(iterations=120, repeat=lora.repeat + 10), tmp_path / "runs120")  # extra lora repeats
    args = ["leaderboard", "--results", str(tmp_path / "runs"), str(tmp_path / "runs120"),
            "--snapshot", str(tmp_path / "snap.csv"), "--out", str(tmp_path / "lb")]
    assert main(args) == 2
    assert "training iterations (dgst: 60; full: 60; lora: 60, 120)" in capsys.readouterr().err
    assert main(args + ["--iterations", "60"]) == 0
    md = (tmp_path / "lb" / "phantom.md").read_text()
    assert "| iterations | hyper-parameters |" in md and "| 60 | default |" in md


def test_report_claim_roles_captions_and_legible_cd_diagram(tmp_path):
    import matplotlib.image as mpimg

    from bench.report import write_report
    effects = {"dgst": 0.8, "full": 0.7, "a-rather-long-linear-probe": 0.6, "dgst-random": 0.79,
               "scratch": 0.3, "oracle": 0.95}
    df = synthetic_results(effects, shots=(1, 3), repeats=3, cases=6)
    text = write_report(df, tmp_path / "r", n_boot=200).read_text()
    claims = [line for line in text.splitlines() if "SUPPORTED" in line]
    assert len(claims) == 2
    for verdict in claims:
        assert verdict.startswith("phantom is synthetic") and "cannot support or refute" in verdict
        assert "baselines: a-rather-long-linear-probe, full" in verdict or \
            "every baseline (a-rather-long-linear-probe, full)" in verdict
        assert "dgst-random" not in verdict and "oracle" not in verdict and "scratch" not in verdict
    assert "Holm over 2 dataset x shots check(s)" in claims[0]
    assert "- Data: `phantom` is synthetic" in text and "- Support repeats run: 3 at 1-shot, 3 at 3-shot" in text
    # autorank writes method names outside its axes: the saved canvas must hold them (white margins all
    # round; a clipped name runs into the edge)
    img = mpimg.imread(tmp_path / "r" / "figures" / "phantom_3shot_cd.png")[..., :3]
    for edge in (img[:, :5], img[:, -5:], img[:5], img[-5:]):
        assert (edge > 0.99).all()
