"""Dataset registry: one module per dataset."""
from __future__ import annotations

from bench.registry import Registry
from bench.datasets.base import Dataset, DatasetError


def _load_all() -> None:
    from bench.datasets import lnq2023, phantom, segrap2023, segrap2023_oars  # noqa: F401


DATASETS: Registry = Registry("dataset", load=_load_all)  # loads every dataset on the first lookup


def get_dataset(name: str) -> Dataset:
    return DATASETS.get(name)()


__all__ = ["DATASETS", "Dataset", "DatasetError", "get_dataset"]
