"""bench.augment: synthetic nodes (statistics, placement, labels, determinism), row labels, run ids, tables, sweeps."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import binary_erosion
from scipy.ndimage import label as components

from bench.augment import Normalisation, SupportCase, get_augmentation, row_label, split_row_label
from bench.augment.synth_nodes import (MAX_NODES, SynthNodesTransform, insert_nodes, node_components,
                                       semi_axes_of, soft_tissue_mask, support_statistics)
from bench.datasets.phantom import TARGET, generate_case

ROOT = Path(__file__).resolve().parents[1]
PLANS = json.loads((ROOT / "bench" / "pretrained" / "phantom-v2" / "plans.json").read_text())
NORM = Normalisation.from_plans(PLANS, "3d_fullres")
FULL = np.ones((3, 3, 3), dtype=bool)


def phantom_case(index: int) -> SupportCase:
    """A target-domain phantom case, normalised as the foundation's plans normalise it."""
    ct, lab = generate_case(TARGET, index)
    return SupportCase(f"ph_{index:03d}", NORM.ct_to_normalised(0, ct)[None].astype(np.float32), lab.astype(np.int16))


@pytest.fixture(scope="module")
def support():
    cases = [phantom_case(i) for i in (30, 31, 32)]
    stats, record = support_statistics(cases, NORM, log=lambda *_: None)
    return cases, stats, record


@pytest.fixture(scope="module")
def insertions(support):
    """40 patches with up to 2 inserted nodes each: (case, image after, labels after, placed records)."""
    cases, stats, _ = support
    rng = np.random.default_rng(1)
    out = []
    for k in range(40):
        case = cases[k % len(cases)]
        image, seg = case.image.copy(), case.seg.copy()
        out.append((case, image, seg, insert_nodes(image, seg, stats, rng, 2)))
    assert sum(len(p) for *_, p in out) >= 30  # most requested nodes find a place
    return out


def new_nodes(case, seg):
    """The inserted nodes: connected components of labels that were not there before."""
    comps, n = components((seg > 0) & (case.seg == 0), structure=FULL)
    return [comps == i for i in range(1, n + 1)]


def test_support_statistics_come_from_the_labelled_nodes(support):
    cases, stats, record = support
    nodes = [coords for c in cases for _, coords in node_components(c.seg)]
    assert record["support_nodes"] == len(nodes) == len(stats.semi_axes) >= 3 and record["applied"]
    voxels = np.concatenate([c.image[0][c.seg > 0] for c in cases])
    assert record["intensity_mean"][0] == pytest.approx(voxels.mean(), abs=1e-3)
    # soft tissue -100..200 HU through the plans' CTNormalization (mean 40, SD 90)
    assert record["soft_tissue_window"] == pytest.approx([(-100 - 40) / 90, (200 - 40) / 90], abs=1e-3)


def test_inserted_nodes_have_the_support_nodes_intensities(support, insertions):
    _, stats, record = support
    interior = np.concatenate([image[0][binary_erosion(node, iterations=2)]
                               for case, image, seg, _ in insertions for node in new_nodes(case, seg)])
    assert len(interior) > 2000
    mean, sd = record["intensity_mean"][0], record["intensity_std"][0]
    assert abs(interior.mean() - mean) < 0.1 * sd
    assert interior.std() == pytest.approx(sd, rel=0.15)
    # the whole distribution, not only its moments: quartiles of the support nodes' voxels
    support_q = np.percentile(stats.intensities[:, 0], [25, 50, 75])
    assert np.abs(np.percentile(interior, [25, 50, 75]) - support_q).max() < 0.15 * sd


def test_inserted_sizes_stay_in_the_support_range(support, insertions):
    _, stats, _ = support
    axes = np.array([semi_axes_of(np.argwhere(node))
                     for case, _, seg, _ in insertions for node in new_nodes(case, seg)])
    assert len(axes) >= 30
    # moments of a voxelised ellipsoid: within 5 % of the drawn semi-axes, which are clipped to the support's range
    assert (axes >= 0.95 * stats.axes_min).all() and (axes <= 1.05 * stats.axes_max).all()
    for _, _, _, placed in insertions:
        for p in placed:
            assert (np.array(p["semi_axes"]) >= stats.axes_min - 1e-3).all()
            assert (np.array(p["semi_axes"]) <= stats.axes_max + 1e-3).all()


def test_existing_labels_and_everything_outside_soft_tissue_are_untouched(support, insertions):
    _, stats, _ = support
    for case, image, seg, placed in insertions:
        labelled = case.seg != 0
        assert (seg[labelled] == case.seg[labelled]).all()             # no label voxel overwritten
        assert (image[:, labelled] == case.image[:, labelled]).all()   # nor its intensity
        changed = (image != case.image).any(axis=0) | (seg != case.seg)
        allowed = soft_tissue_mask(case.image[0], case.seg, stats.window)
        assert not (changed & ~allowed).any()                          # every change inside the mask
        assert len(new_nodes(case, seg)) == len(placed)                # separate nodes, none touching a label


def test_insertion_is_deterministic_given_the_seed(support):
    cases, stats, _ = support
    runs = []
    for _ in range(2):
        image, seg = cases[0].image.copy(), cases[0].seg.copy()
        placed = insert_nodes(image, seg, stats, np.random.default_rng(7), 2)
        runs.append((image, seg, placed))
    assert runs[0][2] and runs[0][2] == runs[1][2]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


def test_transform_on_training_patches(support):
    """The transform nnU-Net calls: torch tensors in, labels added, the run's numpy seed decides."""
    cases, stats, _ = support
    t = SynthNodesTransform(stats, p_apply=1.0)

    def patch(seed):
        np.random.seed(seed)
        return t(image=torch.from_numpy(cases[1].image.copy()),
                 segmentation=torch.from_numpy(cases[1].seg[None].copy()))
    a, b, c = patch(3), patch(3), patch(4)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["segmentation"], b["segmentation"])
    assert not torch.equal(a["image"], c["image"])
    assert a["segmentation"].shape == (1, *cases[1].seg.shape) and a["segmentation"].dtype == torch.int16
    inserted = [len(new_nodes(cases[1], out["segmentation"][0].numpy())) for out in (a, b, c)]
    assert t.patches == 3 and sum(inserted) == t.nodes >= 1 and max(inserted) <= MAX_NODES
    with pytest.raises(ValueError, match="3-D nodes"):
        t(image=torch.zeros(1, 40, 40), segmentation=torch.zeros(1, 40, 40, dtype=torch.int16))


def test_support_without_nodes(support):
    cases, _, _ = support
    empty = SupportCase("ph_empty", cases[0].image, np.zeros_like(cases[0].seg))
    notes = []
    transform, record = get_augmentation("synth-nodes").training_transform([empty, cases[1]], NORM, notes.append)
    assert transform is not None and record["cases_without_nodes"] == ["ph_empty"]
    assert any("ph_empty" in n and "other support cases" in n for n in notes)
    transform, record = get_augmentation("synth-nodes").training_transform([empty], NORM, notes.append)
    assert transform is None and record["applied"] is False and "without synthetic nodes" in notes[-1]


def test_channel_without_a_hu_mapping_uses_the_node_intensities(support):
    cases, _, _ = support
    stats, record = support_statistics(cases, Normalisation(["ZScoreNormalization"]), log=lambda *_: None)
    lo, hi = np.percentile(stats.intensities[:, 0], [1, 99])
    assert stats.window == pytest.approx((lo - (hi - lo) / 2, hi + (hi - lo) / 2))
    assert "no HU mapping" in record["window_source"]


def test_row_labels():
    assert row_label("dgst", None) == "dgst" and row_label("dgst", "synth-nodes") == "dgst+synth"
    assert split_row_label("dgst+synth") == split_row_label("dgst+synth-nodes") == ("dgst", "synth-nodes")
    assert split_row_label("full") == ("full", None)
    with pytest.raises(ValueError, match=r"\+synth"):
        split_row_label("dgst+synthetic")
    from bench.methods.roles import competitors, role
    assert role("dgst+synth") == role("full+synth") == "augmented"
    assert competitors(["dgst", "full", "full+synth", "lora"]) == ["full", "lora"]


def test_augment_is_in_the_run_id_only_when_set(monkeypatch, tmp_path):
    """The committed phantom runs keep their ids; an augmented run is another cell."""
    from bench.runner import RunSpec
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))  # the shipped foundation, as the committed sweep used
    runs = pd.read_csv(ROOT / "leaderboards" / "results.csv").drop_duplicates("run_id")
    plain_runs = runs[runs.augment == "none"]
    assert len(plain_runs) >= 200
    for r in plain_runs.itertuples():  # another suite foundation's rows (phantom-stunet-v1) name it by its recipe
        foundation = None if r.foundation == "phantom-v2" else r.foundation
        spec = RunSpec(method=r.method, shots=r.shots, repeat=r.repeat, iterations=r.iterations, foundation=foundation)
        assert "augment" not in spec.identity()
        assert spec.run_id() == r.run_id, (r.method, r.shots, r.repeat)
    for r in runs[runs.augment != "none"].itertuples():  # the committed +synth rows: their own cells
        method, _ = split_row_label(r.method)
        spec = RunSpec(method=method, shots=r.shots, repeat=r.repeat, iterations=r.iterations, augment=r.augment,
                       foundation=None if r.foundation == "phantom-v2" else r.foundation)
        assert spec.run_id() == r.run_id, (r.method, r.shots, r.repeat)
    plain = RunSpec(method="dgst")
    augmented = RunSpec(method="dgst", augment="synth-nodes")
    assert augmented.identity()["augment"] == "synth-nodes" and augmented.run_id() != plain.run_id()
    assert augmented.row_label() == "dgst+synth"


def test_results_and_leaderboard_show_the_augmented_row():
    from bench.leaderboard import _markdown, leaderboard_table
    from bench.results import synthetic_results
    df = synthetic_results({"dgst": 0.70, "dgst+synth": 0.75, "full": 0.65}, shots=(3,), repeats=3, cases=6)
    assert set(df[df.method == "dgst+synth"].augment) == {"synth-nodes"}
    assert set(df[df.method == "dgst"].augment) == {"none"}
    table = leaderboard_table(df, "phantom", n_boot=100)
    row = table[table.method == "dgst+synth"].iloc[0]
    assert row.role == "augmented" and row.repeats == 3 and row.cases == 6  # paired on the same blocks
    md = _markdown(table, "phantom", [])
    assert any("dgst+synth" in line and "augmented" in line for line in md.splitlines() if line.startswith("|"))
    assert "`augmented` (`<method>+<augmentation>`" in md
    assert "`augmented`" not in _markdown(leaderboard_table(df[df.method != "dgst+synth"], "phantom", n_boot=100),
                                          "phantom", [])  # tables without such rows keep their text


def test_sweep_rows(tmp_path):
    from bench.commands.sweep import _checked_file, resolve_rows
    from bench.sweep import cell_key, grid
    rows = resolve_rows(["dgst", "full+synth", "dgst+synth-nodes"])
    assert rows == ["dgst", "full+synth", "dgst+synth"]
    specs = grid(rows, ["phantom"], [3], [0])
    assert [(s.method, s.augment) for s in specs] == [("dgst", None), ("full", "synth-nodes"), ("dgst", "synth-nodes")]
    assert cell_key(specs[1]) == "full+synth/phantom/3shot/r0"
    # --augment for every listed row; a row with and without it is one cell
    specs = grid(["dgst", "dgst+synth"], ["phantom"], [3], [0], augment="synth-nodes")
    assert [(s.method, s.augment) for s in specs] == [("dgst", "synth-nodes")]
    with pytest.raises(ValueError, match="zero-shot does not train"):
        resolve_rows("zero-shot,dgst", augment="synth-nodes")
    committed = _checked_file(ROOT / "leaderboards" / "phantom-sweep.json")
    committed_rows = resolve_rows(committed["methods"])
    assert {"dgst+synth", "full+synth", "dgst", "zero-shot"} <= set(committed_rows)


@pytest.mark.slow
def test_run_with_augment_end_to_end(bench_home, tiny_foundation, capsys):
    """`bench run --augment synth-nodes`: nodes inserted during training, recorded in result.json, MLflow and
    the results table as the row `dgst+synth`, paired with the plain run of the same cell."""
    import mlflow

    from bench.cli import main
    from bench.foundation import load_foundation
    from bench.leaderboard import leaderboard_table
    from bench.results import load_results
    common = ["run", "--method", "dgst", "--shots", "1", "--iterations", "4", "--eval-every", "2",
              "--foundation", str(tiny_foundation), "--device", "cpu"]
    assert main(common) == 0 and main(common + ["--augment", "synth-nodes"]) == 0
    out = capsys.readouterr().out
    assert "synth-nodes: " in out and "row dgst+synth" in out
    plain, = (bench_home / "runs" / "phantom" / "dgst").rglob("result.json")
    augmented, = (bench_home / "runs" / "phantom" / "dgst+synth").rglob("result.json")
    plain, augmented = json.loads(plain.read_text()), json.loads(augmented.read_text())
    assert plain["spec"]["augment"] is None and plain["provenance"]["augment"] is None
    record = augmented["provenance"]["augment"]
    assert augmented["spec"]["augment"] == "synth-nodes" and record["name"] == "synth-nodes" and record["applied"]
    assert record["support_nodes"] >= 1 and record["patches"] >= 8 and record["inserted"] >= 1
    assert augmented["cost"]["augment_seconds_per_step"] > 0
    assert augmented["support"] == plain["support"]
    assert augmented["provenance"]["budget"] == plain["provenance"]["budget"]  # the same budget
    assert augmented["run_id"] != plain["run_id"]
    a = load_foundation(plain["model_dir"]).state_dict
    b = load_foundation(augmented["model_dir"]).state_dict
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained on other patches

    df = load_results(bench_home / "runs")
    assert sorted(df.method.unique()) == ["dgst", "dgst+synth"]
    assert sorted(df.augment.unique()) == ["none", "synth-nodes"]
    table = leaderboard_table(df, "phantom", n_boot=50)
    assert list(table[table.method == "dgst+synth"].role) == ["augmented"]
    assert set(table.cases) == {len(plain["cases"])}  # the same test cases, paired

    mlflow.set_tracking_uri(f"sqlite:///{bench_home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lnbench"])
    assert sorted(runs["tags.augment"]) == ["none", "synth-nodes"]
    assert sorted(runs["tags.row"]) == ["dgst", "dgst+synth"]


def test_report_pairs_each_augmented_row_with_its_plain_method(tmp_path):
    from bench.report import write_report
    from bench.results import synthetic_results
    df = synthetic_results({"dgst": 0.70, "dgst+synth": 0.76, "full": 0.65}, shots=(3,), repeats=3, cases=6)
    md = write_report(df, tmp_path, n_boot=50).read_text()
    section = md.split("**Augmentation**")[1].split("\n\n")[1]
    rows = [line for line in section.splitlines() if line.startswith("| dgst")]
    assert len(rows) == 1 and rows[0].startswith("| dgst+synth | dgst |")
    assert (tmp_path / "tables" / "phantom_3shot_augmentation.csv").is_file()


def test_unknown_augmentation_is_refused_with_the_valid_names(bench_home, capsys):
    from bench.cli import main
    assert main(["run", "--method", "dgst", "--augment", "synth"]) == 2
    err = capsys.readouterr().err
    assert "unknown augmentation 'synth'" in err and "synth-nodes" in err
