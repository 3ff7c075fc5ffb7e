"""The networks ``bench perf`` measures: the phantom foundation's, nnU-Net's default 3d_fullres for H&N CT,
and a seconds-fast one for the test-suite."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from bench.engine.network import ONE_LABEL_DATASET_JSON

DATASET_JSON = {**ONE_LABEL_DATASET_JSON, "numTraining": 0, "file_ending": ".nii.gz"}


@dataclass
class NetworkSpec:
    key: str
    title: str
    plans: dict
    dataset_json: dict = field(default_factory=lambda: copy.deepcopy(DATASET_JSON))
    configuration: str = "3d_fullres"

    @property
    def config(self) -> dict:
        return self.plans["configurations"][self.configuration]

    @property
    def patch(self) -> Tuple[int, ...]:
        return tuple(self.config["patch_size"])

    @property
    def batch(self) -> int:
        return int(self.config["batch_size"])

    @property
    def features(self) -> List[int]:
        return list(self.config["architecture"]["arch_kwargs"]["features_per_stage"])


def default_hn_plans(patch_size: Sequence[int] = (56, 192, 160), batch_size: int = 2,
                     dataset_name: str = "Dataset990_HeadNeckCT") -> dict:
    """nnU-Net's default 3d_fullres architecture as its planner makes it for head-and-neck CT
    with ~3 mm slices: PlainConvUNet, 6 stages, 32..320 features, in-plane-only first pooling
    and last pooling (anisotropic spacing), 2 convs per stage. Weights are random here."""
    from bench.engine.network import tiny_plans

    features = (32, 64, 128, 256, 320, 320)
    plans = tiny_plans(dataset_name, patch_size=patch_size, spacing=(3.0, 0.98, 0.98), features=features,
                       batch_size=batch_size)
    plans["experiment_planner_used"] = "bench.perf.default_hn_plans (nnU-Net default 3d_fullres, H&N CT)"
    cfg = plans["configurations"]["3d_fullres"]
    cfg["median_image_size_in_voxels"] = [120, 512, 512]
    arch = cfg["architecture"]["arch_kwargs"]
    arch["kernel_sizes"] = [[1, 3, 3]] + [[3, 3, 3]] * 5
    arch["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    return plans


def _check_patch(spec: NetworkSpec) -> None:
    strides = spec.config["architecture"]["arch_kwargs"]["strides"]
    total = [1, 1, 1]
    for s in strides:
        total = [t * v for t, v in zip(total, s)]
    bad = [f"{p} (axis {i}) is not a multiple of {t}" for i, (p, t) in enumerate(zip(spec.patch, total)) if p % t]
    if bad:
        raise ValueError(f"patch {list(spec.patch)} does not fit the {spec.key} network's pooling: "
                         + "; ".join(bad))
    if all(p // t <= 1 for p, t in zip(spec.patch, total)):
        raise ValueError(f"patch {list(spec.patch)} leaves a 1x1x1 bottleneck in the {spec.key} network; "
                         f"instance norm needs more than one voxel there: use at least "
                         f"{[2 * t if i == 0 else t for i, t in enumerate(total)]}")


def network_spec(key: str, device: torch.device, patch: Optional[Sequence[int]] = None,
                 batch: Optional[int] = None) -> NetworkSpec:
    """``tiny``: the phantom foundation's architecture; ``default``: nnU-Net's default
    3d_fullres for H&N CT (patch 56x192x160 on CUDA, 16x64x64 batch 1 on CPU);
    ``stunet``: STU-Net-S at its published widths (patch 128^3 on CUDA, 64^3 batch 1 on CPU);
    ``test``: a seconds-fast network for the test-suite."""
    from bench.engine.network import tiny_plans
    from bench.foundation import PHANTOM_INTENSITY

    cpu = device.type != "cuda"
    if key == "tiny":
        plans = tiny_plans("Dataset902_PhantomTarget", patch_size=tuple(patch or (32, 64, 64)),
                           features=(8, 16, 32, 64), batch_size=batch or 2, intensity=PHANTOM_INTENSITY)
        spec = NetworkSpec("tiny", "phantom foundation architecture (PlainConvUNet, 4 stages, 8-64 features)", plans)
    elif key == "default":
        default_patch, default_batch = ((16, 64, 64), 1) if cpu else ((56, 192, 160), 2)
        plans = default_hn_plans(tuple(patch or default_patch), batch or default_batch)
        spec = NetworkSpec("default", "nnU-Net default 3d_fullres for H&N CT (PlainConvUNet, 6 stages, "
                                      "32-320 features)", plans)
    elif key == "test":
        plans = tiny_plans("Dataset999_Tiny", patch_size=tuple(patch or (8, 16, 16)), features=(4, 8, 16),
                           batch_size=batch or 1)
        spec = NetworkSpec("test", "test network (PlainConvUNet, 3 stages, 4-16 features)", plans)
    elif key == "stunet":  # STU-Net-S at its published widths; its 128^3 patch on CUDA
        from bench.architectures.stunet import STUNET_SIZES, stunet_architecture
        plans = tiny_plans("Dataset991_STUNetS", patch_size=tuple(patch or ((64, 64, 64) if cpu else (128,) * 3)),
                           spacing=(1.5, 1.5, 1.5), features=STUNET_SIZES["S"]["features_per_stage"],
                           batch_size=batch or (1 if cpu else 2))
        plans["configurations"]["3d_fullres"]["architecture"] = stunet_architecture(
            STUNET_SIZES["S"]["features_per_stage"], STUNET_SIZES["S"]["n_blocks_per_stage"], [[1, 1, 1]] + [[2] * 3] * 5)
        spec = NetworkSpec("stunet", "STU-Net-S (bench.architectures.stunet, 6 stages, 16-256 features)", plans)
    else:
        raise ValueError(f"unknown network {key!r}: use tiny, default, stunet or both")
    _check_patch(spec)
    return spec
