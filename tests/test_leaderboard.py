"""bench.leaderboard: byte-identical regeneration and the content of the tables."""
import pandas as pd
import pytest

from bench.leaderboard import LEADER, WORSE, leaderboard_table, write_leaderboards
from bench.results import read_snapshot, synthetic_results, write_snapshot

N_BOOT = 300


@pytest.fixture(scope="module")
def results():
    # 3 methods x 2 shots x 3 repeats x 5 cases; lora clearly worse, full close to dgst.
    return synthetic_results({"dgst": 0.80, "full": 0.78, "lora": 0.60}, shots=(1, 3), repeats=3, cases=5)


def test_regeneration_is_byte_identical(results, tmp_path):
    first = write_leaderboards(results, tmp_path / "a", n_boot=N_BOOT)
    second = write_leaderboards(results, tmp_path / "b", n_boot=N_BOOT)
    assert [p.name for p in first] == ["phantom.md", "phantom.csv", "phantom.png"]
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
    assert list(table.shots.unique()) == [1, 3] and len(table) == 6
    for _, t in table.groupby("shots"):
        leader = t.iloc[0]
        assert (leader["rank"], leader.method, leader.marker) == (1, "dgst", LEADER)
        assert pd.isna(leader.p_vs_leader_holm)
        assert list(t["rank"]) == [1, 2, 3]
        assert (t.dice_lo <= t.dice_mean).all() and (t.dice_mean <= t.dice_hi).all()
        lora = t[t.method == "lora"].iloc[0]
        assert lora.marker == WORSE and lora.p_vs_leader_holm < 0.05
        full = t[t.method == "full"].iloc[0]
        assert (full.marker == WORSE) == (full.p_vs_leader_holm < 0.05)
    assert (table.protocol_version == "v1").all() and (table.blocks == 15).all()


def test_markdown_content(results, tmp_path):
    md = write_leaderboards(results, tmp_path, n_boot=N_BOOT)[0].read_text()
    assert md.startswith("# Leaderboard: phantom")
    assert "## 1-shot" in md and "## 3-shot" in md and "do not edit by hand" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 | dgst |")]
    assert len(rows) == 2 and all(f"| {LEADER} |" in r for r in rows)
    assert any(line.startswith("| 3 | lora |") and f"| {WORSE} (p" in line for line in md.splitlines())


def test_committed_leaderboards_regenerate_without_diff(tmp_path):
    """The shipped leaderboards are produced by `bench leaderboard --from-snapshot`, never by hand."""
    from pathlib import Path

    from bench.cli import main
    root = Path(__file__).resolve().parent.parent / "leaderboards"
    snapshot = root / "results.csv"
    if not snapshot.is_file():
        pytest.skip("no committed results snapshot")
    assert main(["leaderboard", "--from-snapshot", "--snapshot", str(snapshot), "--out", str(tmp_path)]) == 0
    produced = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".md", ".csv", ".png"))
    assert produced
    for name in produced:
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), f"{name} differs from the committed file"
