"""Forgetting (retention set) and false positives on node-free scans: metrics, `bench evaluate`, tables."""
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from bench.metrics import case_metrics, nodefree_metrics


# --- metrics on hand-made arrays ----------------------------------------------------------------------

def test_no_prediction_on_a_node_free_scan_is_zero_false_positives():
    assert nodefree_metrics(np.zeros((4, 5, 6), bool), (2.0, 1.0, 1.0)) == {"fp_components": 0, "fp_ml": 0.0}


def test_two_blobs_are_two_false_positives_with_their_volume_from_spacing():
    pred = np.zeros((10, 10, 10), bool)
    pred[1:3, 1:3, 1:3] = True          # 8 voxels
    pred[6:9, 6:9, 6:8] = True          # 18 voxels, not touching the first
    out = nodefree_metrics(pred, (2.5, 1.6, 1.6))
    assert out["fp_components"] == 2
    assert out["fp_ml"] == pytest.approx(26 * 2.5 * 1.6 * 1.6 / 1000.0)
    # the same numbers case_metrics gives against an empty reference (one rule, not two)
    full = case_metrics(pred, np.zeros_like(pred), (2.5, 1.6, 1.6))
    assert (full["lesion_fp"], full["vol_pred_ml"]) == (out["fp_components"], pytest.approx(out["fp_ml"]))
    pred[3, 3, 3] = True                # touches the first blob diagonally: 26-connected, still two
    assert nodefree_metrics(pred, (1, 1, 1))["fp_components"] == 2


# --- bench evaluate on existing runs --------------------------------------------------------------------

def _run_on_three_test_cases(monkeypatch, **spec):
    """A real run, scored on 3 of the protocol's test cases to stay fast."""
    from bench.protocols import Protocol
    from bench.runner import RunSpec, run, run_dir
    split = Protocol.split
    monkeypatch.setattr(Protocol, "split", lambda self, *a: dataclasses.replace(split(self, *a),
                                                                              test=split(self, *a).test[:3]))
    s = RunSpec(shots=1, iterations=2, eval_every=2, device="cpu", **spec)
    run(s, log=lambda *_: None)
    return run_dir(s)


@pytest.mark.slow
def test_bench_evaluate_adds_forgetting_and_false_positives_once(bench_home, tiny_foundation, monkeypatch,
                                                                 capsys):
    from bench.cli import main
    from bench.evaluation.extra import EXTRA_FILE, read_extra
    from bench.evaluation.sets import phantom_set
    from bench.foundation import CHECKPOINT
    from bench.results import load_results

    zero = _run_on_three_test_cases(monkeypatch, method="zero-shot", foundation=str(tiny_foundation))
    # A run whose weights changed: the zero-shot export with every voxel pushed to foreground.
    changed = zero.parent.parent.parent.parent / "full" / "shots1" / "repeat0" / "changedweights"
    shutil.copytree(zero, changed)
    result = json.loads((changed / "result.json").read_text())
    result.update(run_id="changedweights", model_dir=str(changed / "model"))
    result["spec"]["method"] = "full"
    (changed / "result.json").write_text(json.dumps(result))
    ckpt_path = changed / "model" / "fold_0" / CHECKPOINT
    ckpt = torch.load(ckpt_path, weights_only=True)
    for k in ckpt["network_weights"]:   # every deep-supervision head; inference uses the last
        if "seg_layers" in k and k.endswith("bias"):
            ckpt["network_weights"][k] = torch.tensor([-50.0, 50.0])
    torch.save(ckpt, ckpt_path)

    assert main(["evaluate", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "[1/2]" in out and "[2/2]" in out and "2 evaluated" in out

    z, c = read_extra(zero), read_extra(changed)
    ret_key, nf_key = phantom_set("retention").key, phantom_set("nodefree").key
    assert set(z) == set(c) == {ret_key, nf_key}
    # untouched foundation: exactly no forgetting
    assert z[ret_key]["weights_equal_foundation"] and z[ret_key]["forgetting"] == 0.0
    assert z[ret_key]["dice"] == z[ret_key]["dice_foundation"]
    # changed weights: measured, against the same cached foundation scores
    r = c[ret_key]
    assert not r["weights_equal_foundation"] and r["dice_foundation"] == z[ret_key]["dice_foundation"]
    assert len(r["cases"]) == 10 and r["dice"] == pytest.approx(np.mean([x["dice"] for x in r["cases"]]))
    assert r["forgetting"] == pytest.approx(r["dice_foundation"] - r["dice"]) and r["forgetting"] != 0
    assert all(x["pred_empty"] == 0 and x["vol_pred_ml"] > x["vol_ref_ml"] for x in r["cases"])
    # all-foreground on a node-free scan: one component, the scan's whole volume
    nf = c[nf_key]
    assert nf["scans"] == 10 and nf["fp_per_scan"] == 1.0
    assert set(nf["groups"]) == {"target", "noise-45-60HU", "fov-70mm"}
    for case, row in zip(phantom_set("nodefree").cases, nf["cases"]):
        import SimpleITK as sitk
        img = sitk.ReadImage(case.images[0])
        assert row["fp_ml"] == pytest.approx(np.prod(img.GetSize()) * np.prod(img.GetSpacing()) / 1000.0)

    # second call: nothing to do, files untouched
    before = {p: (p / EXTRA_FILE).read_bytes() for p in (zero, changed)}
    assert main(["evaluate", "--device", "cpu"]) == 0
    assert "0 evaluated, 2 already up to date" in capsys.readouterr().out
    assert before == {p: (p / EXTRA_FILE).read_bytes() for p in (zero, changed)}

    # the results table carries the per-run columns on every case row
    df = load_results(bench_home / "runs")
    by_method = df.groupby("method")[["forgetting", "nodefree_fp", "retention_dice_foundation"]].first()
    assert by_method.loc["zero-shot", "forgetting"] == 0.0
    assert by_method.loc["full", "forgetting"] == pytest.approx(r["forgetting"])
    assert by_method.loc["full", "nodefree_fp"] == 1.0
    assert (df["retention_set"] == "phantom-source@" + ret_key.split("@")[1]).all()


def test_a_run_without_extra_evaluation_reads_as_not_evaluated(tmp_path):
    from bench.evaluation.extra import run_columns
    cols = run_columns(tmp_path)
    assert cols["retention_set"] == cols["nodefree_set"] == "none"
    assert all(np.isnan(cols[k]) for k in ("forgetting", "retention_dice", "nodefree_fp", "nodefree_fp_ml"))


def test_bad_retention_and_axes_are_refused_with_the_fix(bench_home):
    from bench.evaluation.extra import parse_axes
    from bench.evaluation.sets import dataset_retention_set
    with pytest.raises(ValueError, match="comma list of retention, nodefree"):
        parse_axes("retention,forgetting")
    with pytest.raises(ValueError, match="bench datasets prepare lnq2023 --source DIR"):
        dataset_retention_set("lnq2023:case_1")
    with pytest.raises(ValueError, match="names no case"):
        dataset_retention_set("phantom:")


def test_phantom_sets_are_versioned_and_deterministic(bench_home):
    from bench.evaluation.sets import phantom_set
    from bench.datasets.phantom import SOURCE, generate_case
    ret, nf = phantom_set("retention"), phantom_set("nodefree")
    assert ret.key == "retention/phantom-source@v1-g2" and nf.key == "nodefree/phantom-nodefree@v1-g2"
    assert [c.case_id for c in ret.cases] == [f"src_{i:03d}" for i in range(40, 50)]
    import SimpleITK as sitk
    ct, lab = generate_case(SOURCE, 40, seed=0)   # the source stream's next case after phantom-source's 40
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(ret.cases[0].label)), lab)
    for case in nf.cases:
        assert case.label is None
        assert not sitk.GetArrayFromImage(sitk.ReadImage(case.images[0].replace("_0000", ""))).any()


def test_protocol_node_free_cases_are_checked(tmp_path):
    from bench.protocols import Protocol, ProtocolError, make_protocol
    data = make_protocol("x", "v1", pool=[f"p{i}" for i in range(10)], test=["t0", "t1"], shots=(1,), repeats=1)
    ok = Protocol({**data, "node_free": ["e0"]})
    ok.check(["e0", "t0", "t1", *data["pool"]])
    with pytest.raises(ProtocolError, match="lacks 1"):
        ok.check(["t0", "t1", *data["pool"]])
    with pytest.raises(ProtocolError, match="node_free cases must be neither test nor pool"):
        Protocol({**data, "node_free": ["t0"]}).check(["t0", "t1", *data["pool"]])


# --- leaderboard and report ---------------------------------------------------------------------------

def _synthetic_with_extras(shots=(1, 3)):
    from bench.results import synthetic_results
    df = synthetic_results({"dgst": 0.8, "full": 0.7, "lora": 0.65}, shots=shots, repeats=3, cases=4)
    run_value = {("dgst", r): 0.01 * (r + 1) for r in range(3)} | {("full", r): 0.1 + 0.02 * r for r in range(3)}
    df["forgetting"] = [run_value.get((m, r), np.nan) for m, r in zip(df.method, df.repeat)]
    df["nodefree_fp"] = np.where(df.method == "lora", np.nan, 0.5)
    df["nodefree_fp_ml"] = np.where(df.method == "lora", np.nan, 1.25)
    return df


def test_leaderboard_shows_forgetting_and_fp_with_a_dash_where_never_evaluated(tmp_path):
    from bench.leaderboard import write_leaderboards
    df = _synthetic_with_extras(shots=(1,))
    md_path, csv_path = write_leaderboards(df, tmp_path, n_boot=50)[:2]
    t = pd.read_csv(csv_path).set_index(["shots", "method"])
    assert t.loc[(1, "dgst"), "forgetting"] == pytest.approx(0.02)
    assert t.loc[(1, "dgst"), "forgetting_lo"] < 0.02 < t.loc[(1, "dgst"), "forgetting_hi"]
    assert t.loc[(1, "dgst"), "forgetting_runs"] == 3 and t.loc[(1, "lora"), "forgetting_runs"] == 0
    assert np.isnan(t.loc[(1, "lora"), "forgetting"]) and np.isnan(t.loc[(1, "lora"), "fp_nodefree"])
    sub = df[(df.shots == 1) & (df.method == "full")]
    assert t.loc[(1, "full"), "fp_test"] == pytest.approx(sub.lesion_fp.astype(float).mean())
    md = md_path.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| rank"))
    for col in ("forgetting [95% CI]", "FP/test scan", "FP/node-free scan", "FP ml/node-free scan"):
        assert col in header
    lora = next(line for line in md.splitlines() if "| lora |" in line).split(" | ")
    assert lora[-4] == "—" and lora[-2] == "—" and lora[-1] == "— |"
    dgst = next(line for line in md.splitlines() if "| dgst |" in line)
    assert "+0.020 [" in dgst and "| 0.50 | 1.25 |" in dgst


def test_report_plots_dice_against_forgetting_only_when_evaluated(tmp_path):
    from bench.evaluation.summary import report_lines
    from bench.results import synthetic_results
    (tmp_path / "figures").mkdir()
    (tmp_path / "tables").mkdir()
    assert report_lines(synthetic_results(), tmp_path / "figures", tmp_path / "tables", "phantom") == []
    lines = report_lines(_synthetic_with_extras(), tmp_path / "figures", tmp_path / "tables", "phantom")
    assert (tmp_path / "figures" / "phantom_dice_vs_forgetting.png").stat().st_size > 0
    table = pd.read_csv(tmp_path / "tables" / "phantom_forgetting_fp.csv")
    assert len(table) == 6 and table.loc[table.method == "lora", "forgetting_runs"].eq(0).all()
    text = "\n".join(lines)
    assert "![Target Dice versus forgetting, phantom]" in text and "| lora | 1 |" in text


def test_snapshot_without_the_new_columns_stays_readable(tmp_path):
    from bench.results import EXTRA_COLUMNS, read_snapshot, synthetic_results, write_snapshot
    path = write_snapshot(synthetic_results(), tmp_path / "r.csv")
    old = pd.read_csv(path).drop(columns=[*EXTRA_COLUMNS, "retention_set", "nodefree_set"])
    old.to_csv(path, index=False)
    df = read_snapshot(path)
    assert df["forgetting"].isna().all() and (df["retention_set"] == "none").all()


def test_a_bad_retention_set_is_refused_before_training(bench_home, capsys):
    from bench.cli import main
    assert main(["run", "--method", "full", "--retention", "lnq2023:case_1"]) == 2
    assert "bench datasets prepare lnq2023" in capsys.readouterr().err
    assert not (bench_home / "runs").exists()


def test_listed_node_free_cases_must_have_empty_labels(tmp_path, monkeypatch):
    """A protocol's node_free case with a node in its label is refused, naming the case and the fix."""
    import SimpleITK as sitk
    from bench.engine import predict
    from bench.evaluation.extra import score_set
    from bench.evaluation.sets import EvalCase, EvalSet
    labels = {}
    for name, value in (("empty", 0), ("node", 1)):
        arr = np.zeros((4, 6, 6), np.uint8)
        arr[1, 2, 2] = value
        labels[name] = str(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(arr), labels[name])
    pred = np.zeros((4, 6, 6), np.uint8)
    pred[0, 0, 0] = pred[3, 5, 5] = 1
    monkeypatch.setattr(predict, "predict_case", lambda predictor, images: (pred, (2.0, 1.0, 1.0)))
    ok = EvalSet("nodefree", "mine", "protocol-v1", (EvalCase("empty", ("img",), labels["empty"]),))
    assert score_set(None, ok) == [{"case_id": "empty", "group": "", "fp_components": 2, "fp_ml": 0.004}]
    bad = EvalSet("nodefree", "mine", "protocol-v1", (EvalCase("node", ("img",), labels["node"]),))
    with pytest.raises(ValueError, match="node-free case node .* non-empty label.*node_free"):
        score_set(None, bad)


def test_retention_scores_only_the_source_structures_of_a_multi_label_model(tmp_path, monkeypatch):
    """A multi-label export's other structures (a gland predicted on a source scan) are not the source's
    nodes: retention scores the labels whose names the source has, and says which."""
    import SimpleITK as sitk
    from bench.engine import predict
    from bench.evaluation.extra import score_set, source_label_values
    from bench.evaluation.sets import EvalCase, EvalSet
    source = {"labels": {"background": 0, "lymph_node": 1}}
    assert source_label_values(source, {"labels": {"background": 0, "lymph_node": 1, "gland": 2}}) == \
        {"lymph_node": 1}
    assert source_label_values(source, {"labels": {"background": 0, "GTVp": 1}}) == {}
    ref = np.zeros((4, 8, 8), np.uint8)
    ref[1:3, 1:4, 1:4] = 1
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(tmp_path / "src.nii.gz"))
    pred = ref.copy()
    pred[1:3, 5:8, 5:8] = 2                                    # a gland, away from the node
    monkeypatch.setattr(predict, "predict_case", lambda predictor, images: (pred, (2.0, 1.0, 1.0)))
    s = EvalSet("retention", "src", "v1", (EvalCase("src", ("img",), str(tmp_path / "src.nii.gz")),))
    [nodes_only] = score_set(None, s, foreground=[1])
    [any_label] = score_set(None, s)
    assert nodes_only["dice"] == 1.0 and any_label["dice"] < 1.0
