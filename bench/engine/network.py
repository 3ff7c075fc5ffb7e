"""Build nnU-Net networks from plans (no trainer needed), and tiny plans for tests and the phantom."""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from bench.datasets.base import Dataset

# dataset.json of a network built without a dataset (every dataset's default: one CT channel, one
# foreground label): the method inventory, perf and tiny test networks.
ONE_LABEL_DATASET_JSON = {"channel_names": dict(Dataset.channel_names), "labels": dict(Dataset.labels)}


def build_network(plans: dict, dataset_json: dict, configuration: str = "3d_fullres",
                  deep_supervision: bool = True) -> nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    return get_network_from_plans(
        cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
        determine_num_input_channels(pm, cm, dataset_json),
        pm.get_label_manager(dataset_json).num_segmentation_heads,
        allow_init=True, deep_supervision=deep_supervision)


def tiny_plans(dataset_name: str, patch_size: Sequence[int] = (32, 64, 64),
               spacing: Sequence[float] = (3.0, 1.5, 1.5),
               features: Sequence[int] = (8, 16, 32, 64), batch_size: int = 2,
               intensity: Optional[dict] = None) -> dict:
    """A hand-written single-configuration nnU-Net plan (PlainConvUNet), for the phantom
    foundation and tests; avoids the minute-long fingerprint/plan/preprocess pipeline."""
    n = len(features)
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * (n - 1)
    strides = [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n - 2)
    intensity = intensity or {"max": 3071.0, "mean": 60.0, "median": 50.0, "min": -1024.0,
                              "percentile_00_5": -200.0, "percentile_99_5": 300.0, "std": 100.0}
    return copy.deepcopy({
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(patch_size),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": batch_size,
            "patch_size": list(patch_size),
            "median_image_size_in_voxels": list(patch_size),
            "spacing": list(spacing),
            "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": n, "features_per_stage": list(features),
                    "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": kernels, "strides": strides,
                    "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
                    "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                    "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
        "experiment_planner_used": "bench.engine.network.tiny_plans (hand-written)",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": intensity},
    })


def tiny_network(features=(4, 8), patch=(8, 16, 16), seed: int = 0) -> nn.Module:
    """A seconds-fast PlainConvUNet with deep supervision, for unit tests."""
    torch.manual_seed(seed)
    plans = tiny_plans("Dataset999_Tiny", patch_size=patch, features=features)
    return build_network(plans, ONE_LABEL_DATASET_JSON)


def build_from_architecture(architecture: dict, input_channels: int, num_classes: int,
                            deep_supervision: bool = True) -> nn.Module:
    """The network a plans ``architecture`` entry names, built as nnU-Net builds it (no plans around it)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture.get("_kw_requires_import", []), input_channels, num_classes,
                                  allow_init=True, deep_supervision=deep_supervision)
