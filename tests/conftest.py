import os

import pytest
import torch

# Tests run on CPU; keep nnU-Net's augmentation in-process.
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_compile", "f")
# one thread: tiny tensors gain nothing from more, and CI machines are small and shared
torch.set_num_threads(1)


@pytest.fixture
def bench_home(tmp_path, monkeypatch):
    home = tmp_path / "bench_home"
    monkeypatch.setenv("BENCH_HOME", str(home))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    return home


TINY_RECIPE = {"name": "phantom-test", "iterations": 4, "lr": 3e-3, "optimizer": "adamw",
               "weight_decay": 3e-5, "seed": 0, "eval_every": 2}


@pytest.fixture(scope="session")
def tiny_foundation(tmp_path_factory):
    """A phantom foundation pretrained for 4 iterations: the real build path, on a tiny budget."""
    home = tmp_path_factory.mktemp("foundation_home")
    old = os.environ.get("BENCH_HOME")
    os.environ["BENCH_HOME"] = str(home)
    try:
        from bench.foundation import get_phantom_foundation
        f = get_phantom_foundation(recipe=TINY_RECIPE, log=lambda *_: None, device="cpu")
    finally:
        if old is None:
            os.environ.pop("BENCH_HOME", None)
        else:
            os.environ["BENCH_HOME"] = old
    return f.folder
