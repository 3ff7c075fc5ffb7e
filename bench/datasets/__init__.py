"""Dataset registry: one module per dataset."""
from __future__ import annotations

from bench.registry import Registry
from bench.datasets.base import Dataset, DatasetError

DATASETS: Registry = Registry("dataset")


def _load_all() -> None:
    from bench.datasets import lnq2023, phantom, segrap2023  # noqa: F401


def get_dataset(name: str) -> Dataset:
    return DATASETS.get(name)()


_load_all()

__all__ = ["DATASETS", "Dataset", "DatasetError", "get_dataset"]
