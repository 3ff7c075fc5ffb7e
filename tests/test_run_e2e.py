"""A short `bench run` end to end in a temporary $BENCH_HOME."""
import hashlib
import json

import mlflow
import pandas as pd

from bench.cli import main
from bench.foundation import load_foundation
from bench.protocols import Protocol
from bench.provenance import derive_seed
from bench.results import load_results


def test_bench_run_writes_result_and_mlflow_run(bench_home, tiny_foundation, capsys, monkeypatch):
    from bench import progress
    monkeypatch.setattr(progress, "MIN_INTERVAL_S", 0.0)  # progress lines however fast the tiny run is
    rc = main(["run", "--method", "dgst", "--shots", "1", "--iterations", "2", "--eval-every", "2",
               "--foundation", str(tiny_foundation), "--device", "cpu"])
    assert rc == 0
    out, err = capsys.readouterr()
    for chatter in ("Using device", "perform_everything_on_device"):  # nnU-Net's prints: --verbose only
        assert chatter not in out + err
    # progress (stderr, plain lines off a terminal): each training iteration of the 2, then every test case
    training = [line for line in err.splitlines() if line.startswith("training: ")]
    assert [line.split()[1] for line in training] == ["1/2", "2/2"] and "\r" not in err
    assert "loss" in training[0] and "ETA" in training[0] and "took" in training[1]
    assert f"predicting: {len(Protocol.load('phantom').test)}/{len(Protocol.load('phantom').test)} case" in err
    test_ids = Protocol.load("phantom").test
    for cid in test_ids:
        assert cid in out  # the per-case table is printed

    results = list((bench_home / "runs").rglob("result.json"))
    assert len(results) == 1
    # forgetting and node-free false positives by default (bench/evaluation; --no-extra-eval skips them)
    assert "extra evaluation: source Dice" in out and "FP/node-free scan" in out
    assert (results[0].parent / "extra_eval.json").is_file()
    result = json.loads(results[0].read_text())
    assert result["schema_version"] == 2
    assert [c["case_id"] for c in result["cases"]] == test_ids
    for c in result["cases"]:
        assert 0.0 <= c["dice"] <= 1.0 and c["hd95"] >= 0
    assert result["spec"]["protocol_version"] == Protocol.load("phantom").version and result["spec"]["method"] == "dgst"
    assert 0 < result["params"]["changed"] <= result["params"]["trainable"] <= result["params"]["total"]
    assert result["cost"]["train_seconds"] > 0 and result["cost"]["peak_memory_mb"] > 0
    assert not set(result["support"]) & set(test_ids)

    # provenance: recorded in full and printed
    prov = result["provenance"]
    ckpt = next(iter(tiny_foundation.glob("**/checkpoint_final.pth")))
    assert prov["foundation"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert prov["foundation"]["name"] == tiny_foundation.name
    assert prov["protocol"] == {"dataset": "phantom", "version": Protocol.load("phantom").version}
    assert prov["recipe"]["optimizer"] == "adamw" and prov["recipe"]["source"]["optimizer"] == "harness"
    assert prov["budget"]["iterations"] == 2 and prov["budget"]["train_steps"] == 2
    assert prov["budget"]["batch_size"] >= 1 and len(prov["budget"]["patch_size"]) == 3
    assert prov["seed"]["value"] == derive_seed("phantom", Protocol.load("phantom").seed_version(0), 0) and prov["seed"]["source"].startswith("derived")
    assert prov["hyperparameters"] == {"values": {"gamma": 2, "hierarchical": True, "penalty": 0.0},
                                       "source": "default"}
    assert 0 < prov["updated_per_step"] < result["params"]["trainable"]  # DGST updates a subset
    assert prov["code"]["version"] and "git_commit" in prov["code"] and prov["versions"]["torch"]
    assert prov["device"]["type"] == "cpu"
    for text in (prov["foundation"]["sha256"], "seed", "recipe", "AdamW", "git", "torch"):
        assert text in out, text
    row = load_results(bench_home / "runs").iloc[0]
    assert row["foundation_sha256"] == prov["foundation"]["sha256"] and row["seed"] == prov["seed"]["value"]
    assert row["optimizer"] == "adamw" and row["updated_per_step"] == prov["updated_per_step"]

    # the exported model folder is a stock nnU-Net trained-model folder
    exported = load_foundation(result["model_dir"])
    assert set(exported.state_dict) == set(load_foundation(tiny_foundation).state_dict)

    mlflow.set_tracking_uri(f"sqlite:///{bench_home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lnbench"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["params.method"] == "dgst" and run["params.shots"] == "1"
    assert run["tags.foundation.sha256"] == prov["foundation"]["sha256"]
    # what `mlflow ui` filters cells on: every cell run carries these tags
    assert {k: run[f"tags.{k}"] for k in ("kind", "dataset", "method", "shots", "repeat", "foundation", "protocol",
                                          "params_source")} == {
        "kind": "cell", "dataset": "phantom", "method": "dgst", "shots": "1", "repeat": "0",
        "foundation": tiny_foundation.name, "protocol": f"phantom@{Protocol.load('phantom').version}",
        "params_source": "default"}
    assert run["params.provenance.seed.value"] == str(prov["seed"]["value"])
    assert run["params.provenance.recipe.optimizer"] == "adamw"
    assert abs(run["metrics.dice_mean"] - result["summary"]["dice_mean"]) < 1e-9
    local = mlflow.artifacts.download_artifacts(run_id=run["run_id"], artifact_path="cases.csv")
    assert list(pd.read_csv(local)["case_id"]) == test_ids


def test_unknown_method_lists_valid_names(bench_home, capsys):
    assert main(["run", "--method", "dgts"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'dgst'" in err.lower() and "full" in err
