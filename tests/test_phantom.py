"""The embedded phantom (generator v2, protocol v2) and the foundation shipped with the package."""
import json
from dataclasses import replace

import numpy as np
import pytest

from bench.datasets.phantom import SOURCE, TARGET, Phantom, PhantomSource, generate_case, protocol_v2
from bench.foundation import (PHANTOM_RECIPE, get_phantom_foundation, load_foundation, shipped_foundation_dir,
                              source_dice)
from bench.protocols import Protocol


def test_same_seed_same_case_other_index_other_case():
    a, la = generate_case(TARGET, 3)
    b, lb = generate_case(TARGET, 3)
    c, _ = generate_case(TARGET, 4)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.shape == la.shape == TARGET.shape and a.dtype == np.float32 and set(np.unique(la)) <= {0, 1}


def test_distractors_change_the_image_never_the_label():
    """Normal nodes and glands look like nodes to the source-trained foundation but are never labelled."""
    plain = replace(TARGET, glands=(0, 0), normal_nodes=(0, 0))
    for i in range(4):
        ct, label = generate_case(TARGET, i)
        ct_plain, label_plain = generate_case(plain, i)
        assert np.array_equal(label, label_plain) and not np.array_equal(ct, ct_plain)


def test_the_annotation_margin_grows_the_label_not_the_image():
    plain = replace(TARGET, glands=(0, 0), normal_nodes=(0, 0))  # distractors avoid the label: keep them out
    ct, label = generate_case(plain, 0)
    ct_tight, label_tight = generate_case(replace(plain, label_margin_mm=0.0), 0)
    assert np.array_equal(ct, ct_tight)
    assert (label_tight <= label).all() and label.sum() > 1.3 * label_tight.sum()


def test_every_target_case_has_nodes_and_cases_differ():
    volumes = [int(generate_case(TARGET, i)[1].sum()) for i in range(16)]
    assert all(v > 0 for v in volumes) and max(volumes) > 2 * min(volumes)


def test_committed_protocol_v2_is_what_its_procedure_makes():
    p = Protocol.load("phantom", "v2")
    assert p.version == "v2" and p.data == json.loads(json.dumps(protocol_v2()))
    assert len(p.test) == 30 and len(p.pool) == 30 and p.n_repeats == 5
    ids = [Phantom().case_id(i) for i in range(Phantom.n_cases)]
    p.check(ids)
    assert Protocol.load("phantom", "v1").version == "v1"  # kept for the record; its results are not comparable


def test_shipped_foundation_matches_the_recipe_and_scores_as_recorded(bench_home):
    folder = shipped_foundation_dir()
    assert folder is not None, ("no shipped phantom foundation for recipe "
                                f"{PHANTOM_RECIPE['name']}: run `bench foundation build --rebuild --into "
                                f"bench/pretrained/{PHANTOM_RECIPE['name']}`")
    info = json.loads((folder / "bench.json").read_text())
    assert info["recipe"] == PHANTOM_RECIPE and info["command"].startswith("bench foundation build")
    # weights only: loadable without unpickling arbitrary objects
    f = load_foundation(folder)
    assert f.dataset_json["labels"] == Phantom.labels
    source = PhantomSource()
    source.prepare()
    measured = source_dice(folder, source, info["val_ids"], device="cpu")
    recorded = info["source_dice"]
    assert measured.keys() == recorded.keys()
    assert np.allclose(list(measured.values()), list(recorded.values()), atol=1e-3)
    assert np.mean(list(recorded.values())) > 0.6, "the foundation should segment its own domain"


def test_no_pretraining_on_first_use(bench_home):
    messages = []
    f = get_phantom_foundation(log=messages.append, device="cpu")
    assert f.folder == shipped_foundation_dir() and not messages
    assert not (bench_home / "foundations" / PHANTOM_RECIPE["name"]).exists()


def test_a_rebuilt_foundation_takes_precedence(bench_home):
    import shutil
    rebuilt = bench_home / "foundations" / PHANTOM_RECIPE["name"]   # where `build --rebuild` writes
    shutil.copytree(shipped_foundation_dir(), rebuilt)
    assert get_phantom_foundation(log=pytest.fail, device="cpu").folder == rebuilt.resolve()


def test_the_test_foundation_is_built_from_its_recipe(tiny_foundation):
    recipe = json.loads((tiny_foundation / "bench.json").read_text())["recipe"]
    assert shipped_foundation_dir(recipe) is None       # not a shipped recipe: it was really built
    info = json.loads((tiny_foundation / "bench.json").read_text())
    assert set(info["source_dice"]) == set(info["val_ids"]) and not set(info["val_ids"]) & set(info["pretrain_ids"])


def test_build_into_a_folder_records_recipe_command_and_source_dice(bench_home, tmp_path, capsys):
    """The command that regenerates the shipped files, on a 2-iteration budget."""
    from bench.cli import main
    out = tmp_path / "phantom-v2-it2"
    assert main(["foundation", "build", "--iterations", "2", "--into", str(out), "--device", "cpu"]) == 0
    info = json.loads((out / "bench.json").read_text())
    assert info["recipe"] == {**PHANTOM_RECIPE, "iterations": 2, "name": "phantom-v2-it2"}
    assert info["command"] == "bench foundation build --iterations 2 --rebuild --into bench/pretrained/phantom-v2-it2"
    assert set(info["source_dice"]) == set(info["val_ids"]) and all(0 <= d <= 1 for d in info["source_dice"].values())
    assert load_foundation(out).plans["configurations"]["3d_fullres"]["patch_size"] == PHANTOM_RECIPE["plans"]["patch_size"]
    assert str(out) in capsys.readouterr().out



# The committed leaderboard's runs were made on these bytes: a change to the generator (even only to the
# order of its random draws) must bump PHANTOM_VERSION and the protocol, not silently shift the data.
# (sha256 prefixes of case 0: the image rounded to 0.1 HU, and the label)
GENERATED = {"source": ("6b829d18b9c9687a", "f882ad7063858599"), "target": ("23798b9231a6fb72", "d8074dc922c1d90f")}


@pytest.mark.parametrize("domain", ["source", "target"])
def test_generator_output_is_pinned(domain):
    import hashlib
    ct, label = generate_case({"source": SOURCE, "target": TARGET}[domain], 0)
    digest = (hashlib.sha256(np.round(ct, 1).tobytes()).hexdigest()[:16], hashlib.sha256(label.tobytes()).hexdigest()[:16])
    assert digest == GENERATED[domain], "the phantom generator's output changed: bump PHANTOM_VERSION"
