"""Known answers of the embedded benchmark, with the default budget and the shipped foundation.

A regression in data, engine or statistics that flattens the phantom fails here:
(a) zero-shot < linear probing < full fine-tuning, (b) full fine-tuning learns
from more shots (5-shot above 1-shot), (c) the oracle (the whole pool) above
every few-shot row. Each ordering is a one-sided Wilcoxon signed-rank test on
the 30 paired per-case test Dice values of repeat 0 (the reduced grid keeps this
to a few minutes on one CPU core; the full grid is the sweep's job).
"""
import pytest
from scipy.stats import wilcoxon

from bench.runner import RunSpec, run

ALPHA = 0.05
# row -> (method, shots); zero-shot and the oracle do not depend on the shots
CELLS = {"zero-shot": ("zero-shot", 5), "linear-probe": ("linear-probe", 5), "full-1": ("full", 1),
         "full-5": ("full", 5), "oracle": ("oracle", 5)}


@pytest.fixture(scope="module")
def dice(tmp_path_factory):
    """Per-case test Dice of each cell, repeat 0, default iterations, shipped foundation."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_HOME", str(tmp_path_factory.mktemp("known_answer_home")))
        out = {}
        for row, (method, shots) in CELLS.items():
            result = run(RunSpec(method=method, shots=shots, device="cpu"), log=lambda *_: None)
            out[row] = [c["dice"] for c in result["cases"]]
        return out


def better(dice, high: str, low: str) -> None:
    a, b = dice[high], dice[low]
    p = wilcoxon(a, b, alternative="greater").pvalue
    assert p < ALPHA, (f"{high} (mean Dice {sum(a) / len(a):.3f}) not above {low} ({sum(b) / len(b):.3f}): "
                       f"one-sided Wilcoxon signed-rank p = {p:.3g} on {len(a)} paired test cases")


@pytest.mark.slow
def test_zero_shot_below_linear_probe_below_full(dice):
    better(dice, "linear-probe", "zero-shot")
    better(dice, "full-5", "linear-probe")


@pytest.mark.slow
def test_full_fine_tuning_learns_from_more_shots(dice):
    better(dice, "full-5", "full-1")


@pytest.mark.slow
def test_oracle_above_every_few_shot_row(dice):
    for few in ("zero-shot", "linear-probe", "full-1", "full-5"):
        better(dice, "oracle", few)
