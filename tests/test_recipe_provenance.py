"""Recipes (a method fixes its optimizer; the user's explicit value wins), per-repeat seeds,
calibration passes counted in the budget, and provenance in the cell key and in pairing."""
import hashlib
import json
import shutil

import pytest
import torch

from bench.engine.network import ONE_LABEL_DATASET_JSON, tiny_plans
from bench.engine.recipe import HARNESS_DEFAULTS, resolve_recipe
from bench.engine.trainer import BenchTrainer
from bench.methods import get_method
from bench.methods.base import MethodContext
from bench.protocols import Protocol
from bench.provenance import checkpoint_sha256, derive_seed
from bench.results import read_snapshot, select_budget, synthetic_results, write_snapshot
from bench.runner import RunSpec
from bench.stats import paired_table

DATASET_JSON = {**ONE_LABEL_DATASET_JSON, "file_ending": ".nii.gz"}


def trainer_optimizer(spec: RunSpec, iterations: int = 8, eval_every: int = 3):
    """The optimizer BenchTrainer builds for ``spec``'s recipe (no data needed)."""
    from bench.engine.network import build_network
    from bench.home import configure_nnunet_env, subdir
    configure_nnunet_env()
    plans = tiny_plans("Dataset999_Test", patch_size=(8, 16, 16))
    plans["continue_training"] = False
    recipe = spec.recipe()
    trainer = BenchTrainer(plans, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    method = get_method(spec.method)
    trainer.setup(method=method, ctx=MethodContext(foundation_state={}), init_state=None, train_ids=["a"],
                  val_ids=["b"], preprocessed_base="/nonexistent", output_folder=str(subdir("trainer")),
                  iterations=iterations, eval_every=eval_every, lr=recipe.lr, weight_decay=recipe.weight_decay,
                  optimizer=recipe.optimizer)
    trainer.network = build_network(tiny_plans("Dataset999_Test", patch_size=(8, 16, 16)), DATASET_JSON)
    optimizer, _ = trainer.configure_optimizers()
    return trainer, optimizer


def test_dgst_released_runs_the_released_trainers_optimizer(bench_home):
    recipe = RunSpec(method="dgst-released").recipe()
    assert (recipe.optimizer, recipe.lr, recipe.weight_decay) == ("sgd", 1e-3, 3e-5)
    assert set(recipe.source.values()) == {"method"}
    _, opt = trainer_optimizer(RunSpec(method="dgst-released"))
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.99
    assert group["lr"] == 1e-3 and group["weight_decay"] == 3e-5
    # full fine-tuning: every parameter is in the optimizer (and so in the clipped gradient)
    trainer, _ = trainer_optimizer(RunSpec(method="dgst-released"))
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        sum(p.numel() for p in trainer.network.parameters())


def test_explicit_values_win_over_the_recipe_and_defaults_fill_the_rest(bench_home):
    mine = RunSpec(method="dgst-released", optimizer="adamw", lr=5e-4).recipe()
    assert (mine.optimizer, mine.lr, mine.weight_decay) == ("adamw", 5e-4, 3e-5)
    assert mine.source == {"optimizer": "user", "lr": "user", "weight_decay": "method"}
    _, opt = trainer_optimizer(RunSpec(method="dgst-released", optimizer="adamw", lr=5e-4))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 5e-4
    plain = RunSpec(method="dgst").recipe()
    assert (plain.optimizer, plain.lr, plain.weight_decay) == tuple(HARNESS_DEFAULTS[k] for k in
                                                                    ("optimizer", "lr", "weight_decay"))
    assert "from the method's recipe" not in plain.describe()
    assert "nesterov" in RunSpec(method="dgst-released").recipe().describe()
    with pytest.raises(ValueError, match="spec_overrides sets \\['batch'\\]"):
        resolve_recipe({}, {"batch": 2}, "mine")
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        RunSpec(method="dgst", optimizer="lamb").recipe()


def test_seed_is_derived_per_repeat_stably_and_an_explicit_seed_wins():
    seeds = [RunSpec(method="dgst", repeat=r).resolved_seed()[0] for r in range(5)]
    assert len(set(seeds)) == 5, "repeats must get different seeds"
    assert seeds[2] == RunSpec(method="full", repeat=2).resolved_seed()[0], "methods of a repeat share its seed"
    # the documented formula, computed independently
    version = Protocol.load("phantom").seed_version(3)   # the version that introduced repeat 3
    expected = int.from_bytes(hashlib.sha256(f"phantom/{version}/repeat3".encode()).digest()[:4], "big") & 0x7FFFFFFF
    assert seeds[3] == expected == derive_seed("phantom", version, 3)
    assert RunSpec(method="dgst", repeat=3, seed=7).resolved_seed() == (7, "user")


def test_calibration_passes_come_out_of_the_step_budget(bench_home):
    assert get_method("dgst-static").calibration_passes() == 4
    assert get_method("dgst").calibration_passes() == 0
    trainer, _ = trainer_optimizer(RunSpec(method="dgst-static"), iterations=9, eval_every=2)
    assert trainer.total_steps == 5 and trainer.num_epochs == 3
    steps = []
    for _ in range(trainer.num_epochs):  # what nnU-Net's loop reads after on_train_epoch_start
        trainer.num_iterations_per_epoch = min(trainer.steps_per_epoch, trainer.total_steps - trainer.global_step)
        steps.append(trainer.num_iterations_per_epoch)
        trainer.global_step += trainer.num_iterations_per_epoch
    assert steps == [2, 2, 1] and sum(steps) + trainer.calibration_passes == 9
    with pytest.raises(ValueError, match="dgst-static spends 4 calibration passes .* raise --iterations above 4"):
        trainer_optimizer(RunSpec(method="dgst-static"), iterations=4)


def test_run_id_names_the_checkpoint_by_content(tmp_path, bench_home, tiny_foundation):
    same = tmp_path / "copy"
    shutil.copytree(tiny_foundation, same)
    a = RunSpec(method="dgst", foundation=str(tiny_foundation))
    assert a.run_id() == RunSpec(method="dgst", foundation=str(same)).run_id()  # path is not identity
    ckpt = next(same.glob("**/checkpoint_final.pth"))
    state = torch.load(ckpt, weights_only=False)
    key = next(iter(state["network_weights"]))
    state["network_weights"][key] = state["network_weights"][key] + 1
    torch.save(state, ckpt)
    assert checkpoint_sha256(ckpt) == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert RunSpec(method="dgst", foundation=str(same)).run_id() != a.run_id()
    assert RunSpec(method="dgst", foundation=str(tiny_foundation), seed=1).run_id() != a.run_id()
    # a default left unset and the same value given explicitly are the same run
    explicit = RunSpec(method="dgst", foundation=str(tiny_foundation), optimizer="adamw",
                       protocol_version=Protocol.load("phantom").version,
                       seed=a.resolved_seed()[0])
    assert explicit.run_id() == a.run_id()


def test_pairing_refuses_mixed_foundations_and_protocols_and_results_keep_them_apart(tmp_path):
    df = synthetic_results({"dgst": 0.8, "full": 0.7}, shots=(3,), repeats=2, cases=3)
    paired_table(df, "phantom", 3)  # one set-up: fine
    other = df.copy()
    other.loc[other["method"] == "full", "foundation_sha256"] = "f" * 64
    with pytest.raises(ValueError, match="foundation checkpoint .*--foundation"):
        paired_table(other, "phantom", 3)
    other = df.copy()
    other.loc[other["method"] == "full", "protocol_version"] = "v2"
    with pytest.raises(ValueError, match="protocol version .*--protocol"):
        paired_table(other, "phantom", 3)
    other = df.copy()
    other.loc[other["method"] == "full", "batch_size"] = 4
    with pytest.raises(ValueError, match="batch size"):
        paired_table(other, "phantom", 3)

    # the same cells from two foundations: both kept (never "newest wins" across foundations)
    second = df.copy()
    second["foundation"], second["foundation_sha256"] = "other", "a" * 64
    write_snapshot(df, tmp_path / "one.csv")
    write_snapshot(second, tmp_path / "two.csv")
    from bench.results import load_results
    both = load_results([tmp_path / "one.csv", tmp_path / "two.csv"])
    assert len(both) == 2 * len(df)
    with pytest.raises(ValueError, match="foundation checkpoint"):
        paired_table(both, "phantom", 3)
    kept = load_results([tmp_path / "one.csv", tmp_path / "two.csv"], foundation="other")
    assert len(kept) == len(df) and set(kept["foundation_sha256"]) == {"a" * 64}
    assert len(select_budget(both, foundation="aaaa")) == len(df)  # a sha256 prefix selects too
    paired_table(kept, "phantom", 3)


def test_older_snapshots_read_with_unknown_provenance(tmp_path):
    df = synthetic_results({"dgst": 0.8}, shots=(1,), repeats=1, cases=2)
    legacy = tmp_path / "legacy.csv"
    df.drop(columns=["foundation", "foundation_sha256", "seed", "optimizer"]).to_csv(legacy, index=False, na_rep="nan")
    back = read_snapshot(legacy)
    assert set(back["foundation_sha256"]) == {"unknown"} and back["seed"].isna().all()
    paired_table(back, "phantom", 1)  # unknown values are not checked


def test_dgst_reports_entries_updated_per_step():
    from bench.engine.network import tiny_network
    from bench.methods.dgst.selection import entries_per_row
    net = tiny_network()
    method = get_method("dgst", gamma=2)
    method.prepare(net, MethodContext(foundation_state={}))
    params = dict(net.named_parameters())
    expected = sum(params[n].numel() for n in method.groups["dense"]) + sum(
        p.shape[0] * entries_per_row(2, p[0].numel()) for p in method.sparse.values())
    assert method.updates_per_step(net) == expected < sum(p.numel() for p in net.parameters())
    assert get_method("full").updates_per_step(net) is None


@pytest.mark.slow
def test_static_calibration_is_paid_from_the_budget_end_to_end(bench_home, tiny_foundation):
    """dgst-static with 7 iterations: 4 calibration passes + 3 steps (an epoch of 2, then a cut one of 1)."""
    from bench.runner import run
    spec = RunSpec(method="dgst-static", shots=1, iterations=7, eval_every=2, foundation=str(tiny_foundation),
                   device="cpu")
    result = run(spec, log=lambda *_: None)
    budget = result["provenance"]["budget"]
    assert (budget["train_steps"], budget["calibration_passes"]) == (3, 4)
    assert result["cost"]["forward_backward_passes"] == 7 == spec.iterations
    assert len(result["epochs"]) == 2
    assert result["provenance"]["seed"]["value"] == spec.resolved_seed()[0]
    assert result["run_id"] == spec.run_id() and (bench_home / "runs").exists()
