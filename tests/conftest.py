import os

import pytest
import torch

# Tests run on CPU with small thread counts; keep nnU-Net's augmentation in-process.
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_compile", "f")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def bench_home(tmp_path, monkeypatch):
    home = tmp_path / "bench_home"
    monkeypatch.setenv("BENCH_HOME", str(home))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    return home
