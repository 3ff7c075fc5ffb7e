"""``bench perf``: selection equivalence, and the command end to end on a tiny network (no timing assertions)."""
import csv

import pytest
import torch

from bench.methods import METHODS
from bench.methods.dgst.released import released_selection
from bench.methods.dgst.selection import topk_mask

SHAPES = {
    "conv3d": (8, 4, 3, 3, 3),
    "conv3d_anisotropic": (6, 5, 1, 3, 3),
    "conv_transpose3d": (16, 8, 2, 2, 2),     # (in, out, *kernel): rows are dim 0, as in the released code
    "conv_transpose_anisotropic": (8, 4, 1, 2, 2),
    "pointwise": (3, 7, 1, 1, 1),             # a row shorter than some gammas
    "linear": (5, 9),
}


@pytest.mark.parametrize("gamma", [1, 2, 3, 8])
def test_released_and_topk_selection_agree_exactly(gamma):
    g = torch.Generator().manual_seed(gamma)
    grads = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    released = released_selection(grads, gamma, fill_mask=True)
    assert set(released) == set(grads)
    for name, grad in grads.items():
        ours = topk_mask(grad, gamma)
        assert ours.shape == grad.shape and ours.dtype == torch.bool
        assert torch.equal(ours, released[name]), name
        per_row = ours.reshape(grad.shape[0], -1).sum(1)
        assert torch.all(per_row == min(gamma, grad[0].numel())), name


def test_perf_network_specs():
    from bench.perf import default_hn_plans, network_spec

    cpu = torch.device("cpu")
    arch = default_hn_plans()["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"] == [32, 64, 128, 256, 320, 320] and arch["n_stages"] == 6
    assert network_spec("default", cpu).patch == (16, 64, 64)
    assert network_spec("tiny", cpu).patch == (32, 64, 64)
    with pytest.raises(ValueError, match="multiple of"):
        network_spec("default", cpu, patch=(20, 64, 64))
    stunet = network_spec("stunet", cpu)
    assert stunet.features == [16, 32, 64, 128, 256, 256] and stunet.patch == (64, 64, 64)
    assert stunet.config["architecture"]["network_class_name"] == "bench.architectures.stunet.STUNet"


def test_bench_perf_end_to_end_on_a_tiny_network(bench_home, tmp_path, capsys):
    from bench.cli import main
    from bench.home import default_tracking_uri

    out = tmp_path / "leaderboards"
    assert main(["perf", "--tiny-test", "--device", "cpu", "--steps", "1", "--warmup", "2",
                 "--selection-reps", "1", "--memory-reps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    methods = [n for n in METHODS.names() if METHODS.get(n).trains]
    md = (out / "perf_cpu-tiny-test.md").read_text()
    assert "never edit by hand" in md and "nnunetv2" in md and "patch 8x16x16" in md
    assert "median of 2 such window(s)" in md
    for name in methods:
        assert f"| {name} |" in md, name
        assert name in printed
    with open(out / "perf_cpu-tiny-test.csv") as f:
        rows = list(csv.DictReader(f))
    method_rows = {r["name"]: r for r in rows if r["section"] == "method"}
    assert sorted(method_rows) == sorted(methods)
    for name, r in method_rows.items():
        assert not r["error"], f"{name}: {r['error']}"
        assert float(r["ratio"]) > 0 and float(r["memory_ratio"]) > 0, name  # ratios to full fine-tuning
        assert int(r["trainable"]) > 0 and int(r["changed"]) > 0, name
    assert float(method_rows["full"]["ratio"]) == 1.0
    # DGST changes at most gamma entries per kernel per step: far fewer than full fine-tuning
    assert int(method_rows["dgst"]["changed"]) < int(method_rows["full"]["changed"]) / 2
    selection = {r["name"]: r for r in rows if r["section"] == "selection"}
    assert float(selection["released"]["agreement"]) == 1.0 and float(selection["released"]["ratio"]) > 0
    harness = {r["name"]: r for r in rows if r["section"] == "harness"}
    assert float(harness["harness"]["ratio"]) > 0

    import mlflow
    mlflow.set_tracking_uri(default_tracking_uri())
    runs = mlflow.search_runs(experiment_names=["lnbench"], filter_string="tags.kind = 'perf'")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["metrics.test/dgst/step_ratio"] > 0 and run["params.test.patch"] == "8x16x16"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"])}
    assert {"perf_cpu-tiny-test.md", "perf_cpu-tiny-test.csv"} <= artifacts
