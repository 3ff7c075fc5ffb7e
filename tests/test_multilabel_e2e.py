"""A multi-label phantom task end to end: run, tune, sweep, report and leaderboard with the tiny foundation
(its one-label head is re-initialised for the three-label task)."""
import json

import pytest

from bench.cli import main
from bench.datasets.phantom import PhantomMulti, generate_case, MULTI_TARGET
from bench.protocols import Protocol
from bench.results import load_results

LABELS = ["lymph_node", "gland", "vessel"]
TINY = ["--iterations", "2", "--foundation"]


def test_phantom_multi_labels_nodes_glands_and_veins_on_the_phantom_image():
    ct, lab = generate_case(MULTI_TARGET, 0, structures=True)
    ct_nodes, nodes = generate_case(MULTI_TARGET, 0)
    assert (ct == ct_nodes).all() and ((lab == 1) == (nodes == 1)).all()    # same image, same nodes
    assert all((lab == v).any() for v in (1, 2, 3))                      # every structure present
    p = Protocol.load("phantom-multi")
    assert (len(p.test), len(p.pool), p.n_repeats) == (12, 12, 3)
    p.check([PhantomMulti().case_id(i) for i in range(PhantomMulti.n_cases)])
    from bench.datasets.phantom import protocol_multi_v1
    assert p.data == json.loads(json.dumps(protocol_multi_v1()))


def test_a_one_label_foundation_gets_new_heads_for_the_three_label_task(tiny_foundation):
    from bench.foundation import load_foundation, target_load_report
    from bench.foundation_info import describe
    f = load_foundation(tiny_foundation)
    target = PhantomMulti().dataset_json(24)
    report = target_load_report(f, target)
    assert report["reinitialised"] and all(".seg_layers." in k for k in report["reinitialised"])
    assert not any(".seg_layers." in k for k in report["loaded"])
    assert "re-initialised (label set differs)" in describe(f, "phantom-multi", target)


@pytest.mark.slow
def test_multi_label_task_through_every_command(bench_home, tiny_foundation, capsys, tmp_path):
    found = str(tiny_foundation)
    assert main(["run", "--method", "dgst", "--dataset", "phantom-multi", "--shots", "1", "--eval-every", "2",
                 *TINY, found, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "segmentation heads re-initialised (the target's label set differs" in out
    assert all(name in out for name in LABELS) and "(over labels)" in out

    result = json.loads(next((bench_home / "runs").rglob("result.json")).read_text())
    test = Protocol.load("phantom-multi").test
    assert result["schema_version"] == 3 and result["labels"] == LABELS
    assert [(c["case_id"], c["label"]) for c in result["cases"]] == [(t, n) for t in test for n in LABELS]
    assert {f"label.{n}.dice_mean" for n in LABELS} <= set(result["summary"])

    assert main(["sweep", "--methods", "full", "--datasets", "phantom-multi", "--shots", "1", "--repeats", "1",
                 *TINY, found, "--device", "cpu"]) == 0
    assert main(["tune", "--method", "full", "--dataset", "phantom-multi", "--shots", "1", "--trials", "1",
                 "--repeats", "0", "--eval-every", "2", *TINY, found, "--device", "cpu"]) == 0
    tuned = json.loads((bench_home / "tuned" / "phantom-multi" / "full" / "shots1.json").read_text())
    assert 0 <= tuned["best_value"] <= 1

    df = load_results(bench_home / "runs")
    assert sorted(df.method.unique()) == ["dgst", "full"] and len(df) == 2 * len(test) * len(LABELS)
    assert main(["report", "--dataset", "phantom-multi", "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "**Dice per label**" in text and "**Per-label comparisons**" in text
    assert "| gland | dgst | full |" in text
    assert main(["leaderboard", "--snapshot", str(tmp_path / "lb" / "results.csv"), "--out",
                 str(tmp_path / "lb")]) == 0
    board = (tmp_path / "lb" / "phantom-multi.md").read_text()
    assert "Dice gland" in board and "Dice vessel" in board and "Several labels" in board
