"""Committed protocol files (phantom, segrap2023, lnq2023) and the pre-training check ``check_prepared``."""
import json
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from bench.cli import main
from bench.datasets import DatasetError, get_dataset, lnq2023, segrap2023
from bench.datasets.phantom import Phantom
from bench.datasets.validation import check_prepared
from bench.protocols import Protocol, ProtocolError, make_protocol, write_protocol
from test_datasets_segrap import IDS as SEGRAP_IDS
from test_datasets_segrap import make_release as make_segrap_release

ID_PATTERNS = {"phantom": r"ph_\d{3}", "segrap2023": r"segrap_\d{4}", "lnq2023": r"lnq2023_(val|test)_\d{4}"}


NEWEST = {"phantom": "v3", "segrap2023": "v1", "lnq2023": "v1"}


@pytest.mark.parametrize("dataset", list(ID_PATTERNS))
def test_protocol_file_is_well_formed(dataset):
    p = Protocol.load(dataset)
    assert p.version == NEWEST[dataset] and p.shots == [1, 3, 5] and p.n_repeats >= 5
    assert all(re.fullmatch(ID_PATTERNS[dataset], cid) for cid in p.test + p.pool)
    assert not set(p.test) & set(p.pool) and len(set(p.test + p.pool)) == len(p.test + p.pool)
    for r in range(p.n_repeats):
        splits = [p.split(k, r) for k in p.shots]
        for s in splits:
            assert len(s.support) == len(s.tune) == s.shots
            assert set(s.support + s.tune) <= set(p.pool)      # never a test case
            assert not set(s.support) & set(s.tune)
            assert s.test == p.test
        for small, big in zip(splits, splits[1:]):             # nested: 1 in 3 in 5
            assert set(small.support) < set(big.support) and set(small.tune) < set(big.tune)
    p.check(p.test + p.pool)


@pytest.mark.parametrize("module", [segrap2023, lnq2023])
def test_committed_file_is_what_its_documented_procedure_makes(module):
    p = Protocol.load(module.__name__.rsplit(".", 1)[-1])
    assert p.data == json.loads(json.dumps(module.protocol_v1()))


def test_segrap_protocol_covers_the_120_training_cases():
    p = Protocol.load("segrap2023")
    assert sorted(p.test + p.pool) == [f"segrap_{i:04d}" for i in range(120)]
    assert len(p.test) == 40 and "test" in p.data["notes"] and "pool" in p.data["notes"]


def test_lnq_protocol_tests_on_the_test_split_and_draws_from_val():
    p = Protocol.load("lnq2023")
    assert p.test == [f"lnq2023_test_{i:04d}" for i in range(1, 101)]
    assert p.pool == [f"lnq2023_val_{i:04d}" for i in range(1, 21)]
    assert "train" in p.data["notes"] and "never" in p.data["notes"]   # partial train cases not eligible


def test_phantom_protocol_matches_the_generated_case_ids():
    ids = [Phantom().case_id(i) for i in range(Phantom.n_cases)]
    assert ids == [f"ph_{i:03d}" for i in range(60)]
    Protocol.load("phantom").check(ids)


def test_missing_ids_give_a_clear_message():
    p = Protocol.load("segrap2023")
    with pytest.raises(ProtocolError) as err:
        p.check([c for c in p.test + p.pool if c not in ("segrap_0005", "segrap_0100")])
    msg = str(err.value)
    assert "lacks 2 of the 120" in msg and "segrap_0005, segrap_0100" in msg
    assert "bench datasets prepare segrap2023 --source DIR" in msg


def test_label_ids_are_test_support_and_tune_only():
    p = Protocol.load("segrap2023")
    used = set(p.test)
    for r in range(p.n_repeats):
        used |= set(p.split(5, r).support + p.split(5, r).tune)
    assert set(p.label_ids()) == used and len(used) < 120


def test_committed_protocols_are_never_overwritten():
    with pytest.raises(ProtocolError, match="never regenerated"):
        write_protocol(segrap2023.protocol_v1())


# ---------------------------------------------------------------- check_prepared

@pytest.fixture(scope="module")
def phantom_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_HOME", str(tmp_path_factory.mktemp("phantom_home")))
        get_dataset("phantom").prepare()
        yield


def test_check_prepared_passes_on_phantom(phantom_home, capsys):
    assert check_prepared("phantom").version == "v3"
    assert main(["protocols", "check", "phantom"]) == 0
    assert "matches protocol v3" in capsys.readouterr().out


def test_check_prepared_refuses_an_empty_label_the_protocol_uses(phantom_home):
    ds = get_dataset("phantom")
    path = ds.label_file(Protocol.load("phantom").test[0])
    original = open(path, "rb").read()
    try:
        img = sitk.ReadImage(path)
        empty = sitk.GetImageFromArray(np.zeros(sitk.GetArrayViewFromImage(img).shape, np.uint8))
        empty.CopyInformation(img)
        sitk.WriteImage(empty, path, useCompression=True)
        with pytest.raises(DatasetError, match="label of ph_000 is empty.*protocol phantom/v3"):
            check_prepared(ds)
    finally:
        with open(path, "wb") as f:
            f.write(original)


def test_check_prepared_on_converted_data(bench_home, tmp_path):
    ds = get_dataset("segrap2023")
    with pytest.raises(DatasetError, match="not prepared.*prepare segrap2023 --source DIR"):
        check_prepared(ds)
    ds.prepare(make_segrap_release(tmp_path / "src"))
    with pytest.raises(ProtocolError, match="lacks 116 of the 120"):
        check_prepared(ds)                          # the committed protocol needs the whole release
    small = Protocol(make_protocol("segrap2023", "v-test", pool=SEGRAP_IDS[:2], test=SEGRAP_IDS[2:], shots=[1],
                                   repeats=2))
    assert check_prepared(ds, small) is small      # counts come from the conversion manifest
    os.remove(ds.raw_dir() / "source_manifest.json")
    assert check_prepared(ds, small) is small      # ... or from the label files


# ---------------------------------------------------------------- command line

def test_cli_show_prints_test_support_and_tune(capsys):
    assert main(["protocols", "show", "segrap2023", "--version", "v1"]) == 0
    out = capsys.readouterr().out
    p = Protocol.load("segrap2023")
    assert "test (40):" in out and p.test[0] in out
    assert "5-shot:" in out and "repeat 4:" in out
    assert f"support (5): {' '.join(p.split(5, 4).support)}" in out
    assert f"tune (1): {p.split(1, 0).tune[0]}" in out
    assert main(["protocols", "show", "segrap2023", "--version", "v9"]) == 2
    assert "available: v1" in capsys.readouterr().err
