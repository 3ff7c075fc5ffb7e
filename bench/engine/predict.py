"""Prediction with nnU-Net's own predictor, from exported (stock-loadable) weights."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from bench.engine.network import build_network
from bench.quiet import quiet


def make_predictor(plans: dict, dataset_json: dict, configuration: str, state_dict: Dict[str, torch.Tensor],
                   device: torch.device, mirror_axes: Optional[Tuple[int, ...]] = None):
    """Builds the network from plans (as nnUNetPredictor would) and loads ``state_dict`` strictly."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    network = build_network(plans, dataset_json, configuration, deep_supervision=False)
    network.load_state_dict(state_dict, strict=True)
    pm = PlansManager(plans)
    with quiet():
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror_axes is not None,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(network.to(device), pm, pm.get_configuration(configuration),
                                        [state_dict], dataset_json, "nnUNetTrainer", mirror_axes)
    return predictor


def read_image(image_files: List[str]):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    return SimpleITKIO().read_images(image_files)


def predict_case(predictor, image_files: List[str]) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """Returns the label map in the image's own geometry (z, y, x) and its spacing (z, y, x) in mm."""
    with quiet():
        data, props = read_image(image_files)
        seg = predictor.predict_single_npy_array(data, props)
    return np.asarray(seg), tuple(float(s) for s in props["spacing"])
