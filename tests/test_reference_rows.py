"""The floor and the ceiling: ``zero-shot`` (no training at all) and ``oracle`` (the whole pool)."""
import json
from types import SimpleNamespace

import pytest
import torch

from bench.cli import main
from bench.foundation import load_foundation
from bench.methods import METHODS, get_method
from bench.methods.reference import NotApplicable, foundation_as_is
from bench.protocols import Protocol
from bench.runner import RunSpec, run


def test_registered_as_reference_rows():
    zero, oracle = METHODS.get("zero-shot"), METHODS.get("oracle")
    assert not zero.trains and oracle.trains and oracle.uses_foundation
    assert get_method("zero-shot").training_ids(["a"], ["a", "b"]) == []
    assert get_method("oracle").training_ids(["a"], ["a", "b", "c"]) == ["a", "b", "c"]
    assert get_method("full").training_ids(["a"], ["a", "b"]) == ["a"]


def test_zero_shot_runs_no_training_and_exports_the_foundation(bench_home, tiny_foundation, capsys):
    assert main(["run", "--method", "zero-shot", "--shots", "3", "--foundation", str(tiny_foundation),
                 "--device", "cpu", "--no-extra-eval"]) == 0
    assert "zero-shot" in capsys.readouterr().out
    [path] = list((bench_home / "runs").rglob("result.json"))
    result = json.loads(path.read_text())
    assert result["trained_on"] == [] and result["epochs"] == []
    assert result["cost"]["train_seconds"] == 0 and result["params"]["changed"] == 0
    assert result["params"]["trainable"] == 0 < result["params"]["total"]
    assert [c["case_id"] for c in result["cases"]] == Protocol.load("phantom").test
    assert not (path.parent / "training").exists()     # the training loop never started
    exported, foundation = load_foundation(result["model_dir"]), load_foundation(tiny_foundation)
    assert all(torch.equal(exported.state_dict[k], v) for k, v in foundation.state_dict.items())


def test_zero_shot_refuses_a_foundation_with_another_label_set(tiny_foundation):
    foundation = load_foundation(tiny_foundation)
    other = SimpleNamespace(**{**vars(foundation), "dataset_json": {**foundation.dataset_json,
                                                                   "labels": {"background": 0, "GTVp": 1, "GTVnd": 2}}})
    with pytest.raises(NotApplicable, match="zero-shot is not applicable.*GTVnd.*lymph_node.*Fine-tune instead"):
        foundation_as_is(other, foundation.plans, foundation.dataset_json)


def test_oracle_trains_on_the_pool_and_cannot_be_tuned(bench_home, tiny_foundation):
    spec = RunSpec(method="oracle", shots=1, iterations=1, eval_every=1, foundation=str(tiny_foundation),
                   device="cpu")
    with pytest.raises(ValueError, match="oracle trains on tune cases"):
        run(RunSpec(**{**vars(spec), "evaluate_on": "tune"}), log=lambda *_: None)
    result = run(spec, log=lambda *_: None)
    protocol = Protocol.load("phantom")
    assert result["trained_on"] == protocol.pool and result["support"] == protocol.split(1, 0).support
    assert 0 < result["params"]["changed"] <= result["params"]["trainable"] == result["params"]["total"]
