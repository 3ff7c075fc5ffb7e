"""The second phantom foundation (``phantom-stunet-v1``: the phantom-v2 recipe with STU-Net's network), named by
its recipe in ``--foundation``, and its own leaderboard table (one table per dataset and foundation)."""
import json
from pathlib import Path

import numpy as np
import pytest

from bench.architectures.stunet import STUNet
from bench.engine.network import build_network
from bench.foundation import (PHANTOM_RECIPE, PHANTOM_STUNET_RECIPE, RECIPES, existing_foundation_dir,
                              foundation_recipe, get_foundation, load_foundation, phantom_plans, phantom_recipe,
                              shipped_foundation_dir, source_dice)

NAME = PHANTOM_STUNET_RECIPE["name"]
ROOT = Path(__file__).resolve().parent.parent


def test_the_recipe_differs_from_phantom_v2_only_in_name_and_network():
    assert NAME == "phantom-stunet-v1" and list(RECIPES) == ["phantom-v2", NAME]
    same = {k: v for k, v in PHANTOM_STUNET_RECIPE.items() if k not in ("name", "architecture")}
    assert same == {k: v for k, v in PHANTOM_RECIPE.items() if k != "name"}
    plain, stunet = (phantom_plans(r, "Dataset901_PhantomSource") for r in (PHANTOM_RECIPE, PHANTOM_STUNET_RECIPE))
    a, b = plain["configurations"]["3d_fullres"], stunet["configurations"]["3d_fullres"]
    assert {k: v for k, v in a.items() if k != "architecture"} == {k: v for k, v in b.items() if k != "architecture"}
    assert plain["foreground_intensity_properties_per_channel"] == stunet["foreground_intensity_properties_per_channel"]
    kw_a, kw_b = a["architecture"]["arch_kwargs"], b["architecture"]["arch_kwargs"]
    assert kw_b["n_blocks_per_stage"] == [1, 1, 1, 1]
    assert all(kw_a[k] == kw_b[k] for k in ("features_per_stage", "kernel_sizes", "strides"))
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lymph_node": 1}}
    net = build_network(stunet, dataset_json)
    n_stunet = sum(p.numel() for p in net.parameters())
    n_plain = sum(p.numel() for p in build_network(plain, dataset_json).parameters())
    assert isinstance(net, STUNet) and n_plain == 86_830 and 0.5 < n_stunet / n_plain < 2, n_stunet


def test_a_recipe_is_named_by_its_name_anything_else_is_a_path(tmp_path):
    assert foundation_recipe(None) is PHANTOM_RECIPE and foundation_recipe(NAME) is PHANTOM_STUNET_RECIPE
    assert foundation_recipe("phantom-v2") is PHANTOM_RECIPE
    assert foundation_recipe(str(tmp_path)) is None and foundation_recipe(f"./{NAME}") is None
    assert existing_foundation_dir(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(ValueError, match="unknown foundation recipe 'phantom-v9'.*phantom-v2, phantom-stunet-v1"):
        phantom_recipe("phantom-v9")
    quick = phantom_recipe(NAME, iterations=3)
    assert quick["name"] == f"{NAME}-it3" and quick["iterations"] == 3 and RECIPES[NAME]["iterations"] == 800
    with pytest.raises(ValueError, match="architecture network 'vnet' is not known"):
        phantom_plans({**PHANTOM_STUNET_RECIPE, "architecture": {"network": "vnet"}}, "Dataset901_PhantomSource")
    with pytest.raises(ValueError, match="n_blocks_per_stage .* 4 stages"):
        phantom_plans({**PHANTOM_STUNET_RECIPE, "architecture": {"network": "stunet", "n_blocks_per_stage": [1, 2]}},
                      "Dataset901_PhantomSource")


def test_the_named_foundation_loads_the_shipped_copy_and_is_its_own_cell(bench_home):
    from bench.runner import RunSpec, foundation_identity
    f = get_foundation(NAME, log=pytest.fail, device="cpu")  # shipped: never built on first use
    assert f.folder == shipped_foundation_dir(PHANTOM_STUNET_RECIPE) == existing_foundation_dir(NAME)
    assert f.name == NAME and not (bench_home / "foundations" / NAME).exists()
    fid = foundation_identity(NAME)
    assert fid["name"] == NAME and fid["checkpoint"].startswith(str(f.folder))
    stunet, default = RunSpec(method="dgst", foundation=NAME), RunSpec(method="dgst")
    assert stunet.run_id() != default.run_id()  # the checkpoint's sha256 is part of the cell
    assert RunSpec(method="dgst", foundation="phantom-v2").run_id() == default.run_id()


def test_an_unbuilt_recipe_is_not_done_yet_and_says_how_to_build_it(bench_home, tmp_path, monkeypatch):
    import bench.foundation
    from bench.runner import FoundationNotBuilt, RunSpec, foundation_identity
    from bench.sweep import is_done
    monkeypatch.setattr(bench.foundation, "SHIPPED_DIR", tmp_path / "nothing-shipped")
    assert foundation_identity(NAME) is None
    spec = RunSpec(method="dgst", foundation=NAME)
    with pytest.raises(FoundationNotBuilt, match=f"bench foundation build --recipe {NAME}"):
        spec.run_id()
    assert not is_done(spec)


def test_build_a_few_iterations_of_the_stunet_recipe(bench_home, tmp_path, capsys):
    """`bench foundation build --recipe`, on a 2-iteration budget: an STU-Net, its command recorded."""
    from bench.cli import main
    out = tmp_path / "stunet-it2"
    assert main(["foundation", "build", "--recipe", NAME, "--iterations", "2", "--into", str(out),
                 "--device", "cpu"]) == 0
    info = json.loads((out / "bench.json").read_text())
    assert info["recipe"] == {**PHANTOM_STUNET_RECIPE, "iterations": 2, "name": f"{NAME}-it2"}
    assert info["command"] == (f"bench foundation build --recipe {NAME} --iterations 2 --rebuild --into "
                               f"bench/pretrained/{NAME}-it2")
    assert set(info["source_dice"]) == set(info["val_ids"]) and all(0 <= d <= 1 for d in info["source_dice"].values())
    f = load_foundation(out)
    assert isinstance(build_network(f.plans, f.dataset_json), STUNet)
    assert str(out) in capsys.readouterr().out


def test_show_lists_the_suite_foundations_and_describes_one_by_name(bench_home, capsys):
    from bench.cli import main
    assert main(["foundation", "show", NAME]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{NAME} (") and "bench.architectures.stunet.STUNet" in out
    assert main(["foundation", "show"]) == 0
    listing = capsys.readouterr().out.split("suite foundations")[1]
    for name in RECIPES:
        assert f"{name} " in listing and "shipped" in listing
    assert "stunet" in listing


def test_shipped_stunet_foundation_matches_its_recipe_and_scores_as_recorded(bench_home):
    from bench.datasets.phantom import Phantom, PhantomSource
    folder = shipped_foundation_dir(PHANTOM_STUNET_RECIPE)
    assert folder is not None, f"not shipped: run `bench foundation build --recipe {NAME} --rebuild --into " \
                               f"bench/pretrained/{NAME}`"
    info = json.loads((folder / "bench.json").read_text())
    assert info["command"] == f"bench foundation build --recipe {NAME} --rebuild --into bench/pretrained/{NAME}"
    f = load_foundation(folder)  # weights only
    net = build_network(f.plans, f.dataset_json)
    assert isinstance(net, STUNet) and f.dataset_json["labels"] == Phantom.labels
    net.load_state_dict(f.state_dict)  # every tensor, strictly
    source = PhantomSource()
    source.prepare()
    measured = source_dice(folder, source, info["val_ids"], device="cpu")
    assert measured.keys() == info["source_dice"].keys()
    assert np.allclose(list(measured.values()), list(info["source_dice"].values()), atol=1e-3)
    assert np.mean(list(measured.values())) > 0.5, "the foundation should segment its own domain"


def test_the_committed_sweep_file_runs_its_rows_on_the_stunet_foundation():
    from bench.commands.sweep import _checked_file, resolve_rows
    from bench.sweep import grid
    cfg = _checked_file(ROOT / "leaderboards" / "phantom-stunet-sweep.json")
    rows = resolve_rows(cfg["methods"])
    assert rows == ["zero-shot", "full", "dgst"]   # the floor, and the two rows it is read against
    assert "iterations" not in cfg  # the dataset's budget, as the default foundation's sweep file
    specs = grid(rows, cfg["datasets"], cfg["shots"], range(cfg["repeats"]), foundation=cfg["foundation"])
    assert len(specs) == 3 * 3 * 10 and {s.foundation for s in specs} == {NAME}
    assert foundation_recipe(cfg["foundation"]) is PHANTOM_STUNET_RECIPE


# --- one leaderboard per (dataset, foundation) -------------------------------------------------------------

def two_foundations():
    from bench.results import synthetic_results
    plain = synthetic_results({"dgst": 0.80, "full": 0.75}, shots=(1,), repeats=3, cases=4).assign(
        foundation="phantom-v2", foundation_sha256="a" * 64)
    stunet = synthetic_results({"dgst": 0.60, "full": 0.70, "lora": 0.65}, shots=(1,), repeats=3, cases=4,
                               seed=1).assign(foundation=NAME, foundation_sha256="b" * 64)
    return plain, stunet


def test_board_names():
    from bench.leaderboard import board_name
    assert board_name("phantom", "phantom-v2", ["phantom-v2", NAME]) == "phantom"
    assert board_name("phantom", NAME, ["phantom-v2", NAME]) == f"phantom@{NAME}"
    assert board_name("phantom", NAME, [NAME]) == f"phantom@{NAME}"  # never in the default's place
    assert board_name("segrap2023", "LN-Seg-FM", ["LN-Seg-FM"]) == "segrap2023"
    assert board_name("segrap2023", "b", ["a", "b"]) == "segrap2023@b"


def test_leaderboard_writes_one_table_per_foundation(tmp_path):
    import pandas as pd
    from bench.leaderboard import write_leaderboards
    plain, stunet = two_foundations()
    both = pd.concat([plain, stunet], ignore_index=True)
    written = write_leaderboards(both, tmp_path / "both", n_boot=200)
    assert [p.name for p in written] == [f"phantom.{e}" for e in ("md", "csv", "png", "html")] + \
        [f"phantom@{NAME}.{e}" for e in ("md", "csv", "png", "html")]
    alone = write_leaderboards(plain, tmp_path / "alone", n_boot=200)
    for a in alone:  # the default foundation's table is what it was without the other foundation's results
        assert a.read_bytes() == (tmp_path / "both" / a.name).read_bytes(), a.name
    md = (tmp_path / "both" / f"phantom@{NAME}.md").read_text()
    assert md.startswith(f"# Leaderboard: phantom, foundation {NAME}\n")
    assert f"- Foundation: {NAME} (checkpoint sha256 bbbbbbbbbbbb)." in md and "phantom-v2" not in md
    assert "| lora |" in md and "| lora |" not in (tmp_path / "both" / "phantom.md").read_text()
    table = pd.read_csv(tmp_path / "both" / f"phantom@{NAME}.csv")
    assert table.set_index("method").dice_mean.idxmax() == "full"  # ranked on its own results only
    assert f"Leaderboard: phantom, foundation {NAME}" in (tmp_path / "both" / f"phantom@{NAME}.html").read_text()


def test_report_refuses_mixed_foundations_naming_the_option(tmp_path):
    import pandas as pd
    from bench.report import write_report
    from bench.results import select_budget
    both = pd.concat(two_foundations(), ignore_index=True)
    with pytest.raises(ValueError, match="foundation checkpoint .*--foundation"):
        write_report(both, tmp_path / "mixed", n_boot=100)
    assert write_report(select_budget(both, foundation=NAME), tmp_path / "one", n_boot=100).is_file()
