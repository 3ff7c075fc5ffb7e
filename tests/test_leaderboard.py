"""bench.leaderboard: byte-identical regeneration and the content of the tables."""
import pandas as pd
import pytest

from bench.leaderboard import LEADER, REFERENCE_ROW, WORSE, leaderboard_table, write_leaderboards
from bench.results import read_snapshot, synthetic_results, write_snapshot

N_BOOT = 300


@pytest.fixture(scope="module")
def results():
    # 4 methods x 2 shots x 5 repeats x 8 cases; lora clearly worse, full close to dgst; the oracle
    # (a reference row) is best but never the leader.
    return synthetic_results({"dgst": 0.80, "full": 0.78, "lora": 0.60, "oracle": 0.95}, shots=(1, 3),
                             repeats=5, cases=8)


def test_regeneration_is_byte_identical(results, tmp_path):
    first = write_leaderboards(results, tmp_path / "a", n_boot=N_BOOT)
    second = write_leaderboards(results, tmp_path / "b", n_boot=N_BOOT)
    assert [p.name for p in first] == ["phantom.md", "phantom.csv", "phantom.png", "phantom.html"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    png = first[2].read_bytes()
    assert png.startswith(b"\x89PNG") and b"Software" not in png and b"atplotlib" not in png


def test_snapshot_round_trip_is_stable(results, tmp_path):
    a = write_snapshot(results, tmp_path / "a.csv")
    df = read_snapshot(a)
    b = write_snapshot(df.sample(frac=1, random_state=1), tmp_path / "b.csv")  # row order does not matter
    assert a.read_bytes() == b.read_bytes()
    assert list(df.columns) == list(results.columns)
    pd.testing.assert_frame_equal(df, results, check_exact=False, rtol=1e-5)


def test_leader_and_markers(results):
    table = leaderboard_table(results, "phantom", n_boot=N_BOOT)
    assert list(table.shots.unique()) == [1, 3] and len(table) == 8
    for _, t in table.groupby("shots"):
        oracle, leader = t.iloc[0], t.iloc[1]
        assert (oracle.method, oracle.role, oracle.marker) == ("oracle", "reference", REFERENCE_ROW)
        assert pd.isna(oracle["rank"]) and pd.isna(oracle.p_vs_leader_holm)
        assert (leader["rank"], leader.method, leader.marker) == (1, "dgst", LEADER)
        assert pd.isna(leader.p_vs_leader_holm)
        assert list(t["rank"].dropna()) == [1, 2, 3]
        assert (t.dice_lo <= t.dice_mean).all() and (t.dice_mean <= t.dice_hi).all()
        lora = t[t.method == "lora"].iloc[0]
        assert lora.marker == WORSE and lora.p_vs_leader_holm < 0.05
        full = t[t.method == "full"].iloc[0]
        assert (full.marker == WORSE) == (full.p_vs_leader_holm < 0.05)
    assert (table.protocol_version == "v1").all() and (table.repeats == 5).all() and (table.cases == 8).all()
    assert (table.changed_params < table.trainable_params).all()
    assert (table.empty_pred == 0).all()  # recorded, and no prediction was empty
    if "updated_per_step" not in results.columns:
        assert table.updated_per_step.isna().all()


def test_markers_come_from_the_all_pairs_family():
    """The leader is chosen from the data: its p-values are Holm-adjusted over every pair of the
    non-reference methods, as the calibration test measures."""
    from bench.leaderboard import leader_tests
    from bench.stats import all_pairs, paired_table

    df = synthetic_results({"a": 0.8, "b": 0.7, "c": 0.75, "zero-shot": 0.1}, shots=(1,), repeats=4, cases=6)
    paired = paired_table(df, "phantom", 1)
    tests = leader_tests(paired, ["a", "c", "b", "zero-shot"]).set_index("b")
    pairs = all_pairs(paired, methods=["a", "b", "c"])
    assert sorted(tests.index) == ["b", "c"] and len(pairs) == 3
    for m in ("b", "c"):
        assert tests.p_holm[m] == pytest.approx(pairs[(pairs.a == "a") & (pairs.b == m)].p_holm.iloc[0])


def test_markdown_content(results, tmp_path):
    md = write_leaderboards(results, tmp_path, n_boot=N_BOOT)[0].read_text()
    assert md.startswith("# Leaderboard: phantom")
    assert "## 1-shot" in md and "## 3-shot" in md and "do not edit by hand" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 | dgst | proposed |")]
    assert len(rows) == 2 and all(f"| {LEADER} |" in r for r in rows)
    assert any(line.startswith("| 3 | lora | baseline |") and f"| {WORSE} (p" in line for line in md.splitlines())
    assert any(line.startswith("| - | oracle | reference |") and f"| {REFERENCE_ROW} |" in line
               for line in md.splitlines())
    # the caption says what produced the table; what these results lack is said to be unrecorded
    assert "- Data: `phantom` is synthetic" in md and "cannot support or refute" in md
    assert "- Iterations: 60 per run" in md
    assert "- Support repeats run: 5 at 1-shot, 5 at 3-shot of the protocol's 5 (protocol v1, 10 test cases)" in md
    assert "- Hyper-parameters: `default`" in md
    assert "- Empty masks: 0 of 320 (method, repeat, case) blocks had an empty prediction" in md
    assert "| trainable params | updated per step | changed params |" in md


def test_committed_leaderboards_regenerate_without_diff(tmp_path):
    """The shipped leaderboards are produced by `bench leaderboard --from-snapshot`, never by hand."""
    from pathlib import Path

    from bench.cli import main
    root = Path(__file__).resolve().parent.parent / "leaderboards"
    snapshot = root / "results.csv"
    if not snapshot.is_file():
        pytest.skip("no committed results snapshot")
    assert main(["leaderboard", "--from-snapshot", "--snapshot", str(snapshot), "--out", str(tmp_path),
                 "--reports", str(root)]) == 0  # the page embeds the committed report's figures
    produced = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".md", ".csv", ".png", ".html"))
    assert "phantom.html" in produced
    assert produced
    for name in produced:
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), f"{name} differs from the committed file"


def test_caption_and_columns_from_recorded_provenance(results):
    """When results carry lr, optimizer, total parameters and empty-mask flags, the table says so."""
    from bench.captions import provenance

    df = results.assign(lr=3e-3, optimizer="adamw", total_params=346006.0, updated_per_step=1234.0,
                        foundation="phantom-v1", foundation_sha256="abcdef0123456789",
                        pred_empty=(results.dice < 0.62).astype(int), ref_empty=0)
    df.loc[df.method == "full", ["lr", "optimizer"]] = (1e-3, "sgd")
    lines = provenance(df, "phantom")
    assert "Network: 346,006 parameters." in lines
    df.loc[df.method == "lora", "total_params"] = 350000.0  # an export with added modules
    assert "Network: 346,006 parameters (350,000 for lora)." in provenance(df, "phantom")
    smaller = df.copy()
    smaller.loc[smaller.method == smaller.method.unique()[0], "total_params"] = 6000.0  # e.g. scratch-light
    first = smaller.method.unique()[0]
    assert any(line.startswith("Network: 346,006 parameters (") and f"6,000 for {first}" in line
               for line in provenance(smaller, "phantom")), "the network most methods export comes first"
    assert "Foundation: phantom-v1 (checkpoint sha256 abcdef012345)." in lines
    assert "Learning rate: 0.003; differs for full (0.001)." in lines
    assert "Optimizer: adamw; differs for full (sgd)." in lines
    empty = int(df.pred_empty.sum())
    assert empty > 0 and any(f"Empty masks: {empty} of {len(df)}" in line for line in lines)
    table = leaderboard_table(df, "phantom", n_boot=N_BOOT)
    assert table.groupby("method").empty_pred.sum()["lora"] == df[df.method == "lora"].pred_empty.sum()
    assert (table.updated_per_step == 1234).all()
    assert provenance(df.assign(dataset="mine"), "mine")[0] == "Data: `mine` (not a registered dataset)."
    # results that predate a column: said to be unrecorded, never guessed
    old = provenance(results.drop(columns=["pred_empty", "ref_empty"]), "phantom")
    assert any(line.startswith("Empty masks: not recorded") for line in old)
    assert "Learning rate: not recorded in these results." in old or "lr" in results.columns
    assert leaderboard_table(results.drop(columns=["pred_empty"]), "phantom", n_boot=N_BOOT).empty_pred.isna().all()
