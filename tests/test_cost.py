"""Budgets per dataset and the cost of a grid from measured step times (``bench sweep --dry-run``)."""
import json

import pytest

from bench.cli import main
from bench.cost import CELL_OVERHEAD_SECONDS, StepTimes, cell_costs, describe, pruning_bound
from bench.datasets.base import REAL_DATA_EVAL_EVERY, REAL_DATA_ITERATIONS
from bench.methods import METHODS
from bench.runner import RunSpec


def test_each_dataset_brings_its_budget_and_an_explicit_one_wins():
    assert (RunSpec("dgst").iterations, RunSpec("dgst").eval_every) == (60, 10)
    for dataset in ("segrap2023", "lnq2023"):
        spec = RunSpec("full", dataset=dataset)
        assert (spec.iterations, spec.eval_every) == (REAL_DATA_ITERATIONS, REAL_DATA_EVAL_EVERY) == (12500, 250)
    assert RunSpec("full", dataset="segrap2023", iterations=7, eval_every=7).iterations == 7


def test_filling_in_the_budget_keeps_run_ids():
    """The committed phantom runs were made with the budget spelled out: the same cells, the same ids."""
    assert RunSpec("dgst", shots=3).run_id() == RunSpec("dgst", shots=3, iterations=60, eval_every=10).run_id()


def write_result(root, method, dataset, device, step):
    folder = root / dataset / method / "r" / f"{method}-{step}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"spec": {"method": method, "dataset": dataset},
                                                    "cost": {"device": device, "step_seconds_median": step}}))


def test_costs_come_from_measured_step_times_and_unknown_stays_unknown(tmp_path):
    runs, perf = tmp_path / "runs", tmp_path / "perf"
    perf.mkdir()
    for step in (0.4, 0.5, 0.9):
        write_result(runs, "dgst", "phantom", "cpu", step)
    write_result(runs, "full", "segrap2023", "cpu", 3.0)  # another dataset: says nothing of the phantom
    (perf / "perf_cuda.csv").write_text("section,network,patch,batch,name,median_s\n"
                                        "method,default,128x128x128,2,full,0.8\n")
    specs = [RunSpec("dgst", shots=1), RunSpec("dgst", shots=3), RunSpec("full", shots=1)]
    times = StepTimes(runs, perf)
    costs = cell_costs(specs, tune_trials=4, tune_repeats=3, device="cpu", times=times)
    one = 60 * 0.5 + CELL_OVERHEAD_SECONDS   # median of the three dgst runs
    assert costs[0].seconds == pytest.approx(one * (1 + 4 * 3))  # the study is charged to its first cell
    assert costs[1].seconds == pytest.approx(one * (1 + 4 * 3))  # another shots value: another study
    assert costs[2].seconds is None and "bench perf --device cpu" in costs[2].source
    lines = describe(costs, specs, 4, "cpu")
    assert "1 cell(s) without a measured step time, not counted" in lines[1]
    assert any("3 earlier phantom run(s) on cpu" in line for line in lines)

    gpu = cell_costs([RunSpec("full", dataset="segrap2023", device="cuda")], 0, 3, "cuda", times)
    assert gpu[0].seconds == pytest.approx(12500 * 0.8 + CELL_OVERHEAD_SECONDS)
    assert "perf_cuda.csv (default network, patch 128x128x128, batch 2)" == gpu[0].source


def test_reference_rows_are_priced_once_per_repeat(tmp_path):
    """The oracle trains once per repeat (its budget: the whole pool); its other shot counts reuse that run."""
    runs = tmp_path / "runs"
    write_result(runs, "oracle", "phantom", "cpu", 0.5)
    specs = [RunSpec("oracle", shots=s, repeat=r) for s in (1, 3, 5) for r in (0, 1)]
    costs = cell_costs(specs, 0, 3, "cpu", StepTimes(runs, tmp_path))
    trained = 600 * 0.5 + CELL_OVERHEAD_SECONDS
    assert [c.seconds for c in costs] == pytest.approx([trained, trained, 0, 0, 0, 0])
    assert costs[2].source == "reused: the run of another shot count"


def test_pruning_bound():
    assert pruning_bound(20, 3) == pytest.approx(17 / 20 * 2 / 3)
    assert pruning_bound(3, 3) == 0.0


def test_paper_grid_dry_run_lists_every_cell_and_says_what_is_unmeasured(bench_home, capsys):
    assert main(["sweep", "--dry-run", "--paper"]) == 0
    out = capsys.readouterr().out
    n = len(METHODS.names()) * 2 * 3 * 5
    assert f"{n} cells; cuda-hours" in out
    assert "dgst/segrap2023/3shot/r4" in out and "full/lnq2023/1shot/r0" in out
    assert "pruning can save at most" in out and "preprocessed once and shared" in out
