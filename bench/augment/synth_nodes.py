"""``synth-nodes``: synthetic lymph nodes inserted into training patches (LeFusion-style lesion synthesis,
without a generative model).

Few-shot node segmentation sees few positives: a 3-shot phantom support holds 3-9 nodes. This
augmentation adds nodes, with their labels, at anatomically plausible places of a training patch:

- **Where**: inside soft tissue, i.e. voxels whose (Gaussian-smoothed, sigma 1 voxel) intensity lies in
  the CT soft-tissue window -100..200 HU, mapped through the plans' ``CTNormalization`` into the arrays'
  units (a channel without a fixed HU mapping uses the support nodes' own 1-99 % intensity range widened
  by half its width on each side), excluding every labelled voxel (and the -1 outside-the-image region)
  and a one-voxel margin around them. A node's whole footprint, blend included, must lie in that mask
  and in the patch; up to 20 random centres are tried, then the node is left out. Inserted nodes never
  touch each other, an existing label or anything outside the mask: no label voxel is ever overwritten.
- **Size**: an axis-aligned ellipsoid with the semi-axes of a randomly drawn support node (connected
  components of the support labels, 26-connected, ``scipy.ndimage.label``; semi-axes from the second
  moments, sqrt(5 var) per axis, as for a solid ellipsoid), jittered by +-15 % and clipped to the range the
  support nodes span per axis. Components under 8 voxels are resampling specks, not nodes.
- **Texture**: smooth Gaussian noise (sigma 1 voxel), standardised, mapped through the empirical quantile
  function of the support nodes' pooled voxel intensities (every channel at the same quantile), so the
  inserted interior has the support nodes' intensity distribution (homogeneous and necrotic alike),
  with spatial correlation instead of salt-and-pepper.
- **Boundary**: alpha-blended over 2 voxels around the ellipsoid's surface (signed distance to it, to first
  order); the label is the ellipsoid itself.

Statistics come from the training cases only (the support set), once, in the preprocessed arrays' space
(normalised intensities, the plans' voxel grid), so size and intensity match what the network sees.
A support case without nodes still receives nodes, from the other cases' statistics; a support set
without any node trains without the augmentation, with a logged note and ``applied: false`` in the result.
Each training patch gets 1-2 nodes with probability 0.5, before nnU-Net's spatial and intensity
augmentation (which then moves, scales and re-contrasts them like real nodes). Random numbers come from
a generator seeded from numpy's global stream, which the run's seed fixes: a run is as deterministic as
nnU-Net's own augmentation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from scipy.ndimage import binary_dilation, gaussian_filter
from scipy.ndimage import label as connected_components
from scipy.special import ndtr

from bench.augment import AUGMENTATIONS
from bench.augment.base import Augmentation, Normalisation, SupportCase

SOFT_TISSUE_HU = (-100.0, 200.0)
MASK_SMOOTH_SIGMA = 1.0       # voxels: the window is applied to the smoothed image, so noise does not punch holes
MIN_NODE_VOXELS = 8
SIZE_JITTER = 0.15
BLEND_VOXELS = 2.0
TEXTURE_SIGMA = 1.0
P_APPLY = 0.5
MAX_NODES = 2
PLACEMENT_TRIES = 20
MAX_INTENSITY_SAMPLES = 20_000
_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as the lesion metrics use


def _smoothed_noise_sd(sigma: float) -> float:
    """SD of unit white noise after ``gaussian_filter(sigma)``: the kernel's L2 norm. Dividing by it, rather than
    by a box's own SD (which the box's edges inflate), makes the node's interior standard normal."""
    delta = np.zeros((2 * int(4 * sigma + 0.5) + 3,) * 3)
    delta[(len(delta) // 2,) * 3] = 1.0
    return float(np.sqrt((gaussian_filter(delta, sigma) ** 2).sum()))


_TEXTURE_SD = _smoothed_noise_sd(TEXTURE_SIGMA)


@dataclass(frozen=True)
class NodeStatistics:
    """What insertion draws from: the support nodes' sizes and intensities, and the soft-tissue window."""
    semi_axes: np.ndarray          # (nodes, 3) voxels
    labels: np.ndarray             # (nodes,) label value of each node
    intensities: np.ndarray        # (samples, channels), each column sorted: the empirical quantile functions
    window: Tuple[float, float]    # soft tissue on channel 0, normalised units

    @property
    def axes_min(self) -> np.ndarray:
        return self.semi_axes.min(axis=0)

    @property
    def axes_max(self) -> np.ndarray:
        return self.semi_axes.max(axis=0)

    def quantile(self, u: np.ndarray) -> np.ndarray:
        """Intensities at probabilities ``u`` (any shape), one array per channel: (channels, *u.shape)."""
        n = len(self.intensities)
        grid = (np.arange(n) + 0.5) / n
        return np.stack([np.interp(u, grid, self.intensities[:, c]) for c in range(self.intensities.shape[1])])


def semi_axes_of(coords: np.ndarray) -> np.ndarray:
    """Semi-axes (voxels) of the axis-aligned ellipsoid with the same second moments as ``coords`` (N, 3)."""
    return np.maximum(np.sqrt(5.0 * coords.var(axis=0)), 0.5)


def node_components(seg: np.ndarray) -> List[Tuple[int, np.ndarray]]:
    """(label value, voxel coordinates (N, 3)) of each labelled connected component of >= MIN_NODE_VOXELS."""
    comps, n = connected_components(seg > 0, structure=_FULL)
    out = []
    for i in range(1, n + 1):
        coords = np.argwhere(comps == i)
        if len(coords) >= MIN_NODE_VOXELS:
            values = seg[tuple(coords.T)]
            out.append((int(np.bincount(values.astype(np.int64)).argmax()), coords))
    return out


def support_statistics(cases: Sequence[SupportCase], normalisation: Normalisation,
                       log: Callable[[str], None] = print) -> Tuple[Optional[NodeStatistics], Dict]:
    """Node statistics of the support cases (None without any node) and a JSON-able record of them."""
    axes, labels, voxels, empty = [], [], [], []
    for case in cases:
        if case.image.ndim != 4 or case.seg.shape != case.image.shape[1:]:
            raise ValueError(f"synth-nodes: support case {case.case_id} has image {case.image.shape} and labels "
                             f"{case.seg.shape}; expected (C, Z, Y, X) and (Z, Y, X) of the same grid")
        comps = node_components(case.seg)
        if not comps:
            empty.append(case.case_id)
        for value, coords in comps:
            axes.append(semi_axes_of(coords))
            labels.append(value)
            voxels.append(case.image[(slice(None), *coords.T)].T)  # (N, C)
    record: Dict = {"support_cases": len(cases), "support_nodes": len(axes), "cases_without_nodes": empty}
    if empty and axes:
        log(f"  synth-nodes: support case(s) {', '.join(empty)} hold no labelled node; their patches receive "
            f"nodes drawn from the other support cases' statistics")
    if not axes:
        note = "no support case holds a labelled node: training runs without synthetic nodes"
        log(f"  synth-nodes: {note}")
        return None, {**record, "applied": False, "note": note}
    pooled = np.concatenate(voxels).astype(np.float64)
    if len(pooled) > MAX_INTENSITY_SAMPLES:  # a fixed subsample: the same statistics for the same support set
        pooled = pooled[np.random.default_rng(0).choice(len(pooled), MAX_INTENSITY_SAMPLES, replace=False)]
    window = normalisation.ct_to_normalised(0, SOFT_TISSUE_HU)
    if window is not None:
        window_source = f"CT {SOFT_TISSUE_HU[0]:g}..{SOFT_TISSUE_HU[1]:g} HU through CTNormalization"
    else:
        lo, hi = np.percentile(pooled[:, 0], [1, 99])
        window = np.array([lo - (hi - lo) / 2, hi + (hi - lo) / 2])
        window_source = (f"channel 0 is {normalisation.schemes[0] if normalisation.schemes else 'un-normalised'} "
                         "(no HU mapping): the support nodes' 1-99 % intensity range, widened by half on each side")
        log(f"  synth-nodes: soft-tissue window from {window_source}")
    stats = NodeStatistics(np.array(axes), np.array(labels), np.sort(pooled, axis=0),
                           (float(window[0]), float(window[1])))
    record.update(applied=True, semi_axes_min=_rounded(stats.axes_min), semi_axes_max=_rounded(stats.axes_max),
                  intensity_mean=_rounded(pooled.mean(axis=0)), intensity_std=_rounded(pooled.std(axis=0)),
                  soft_tissue_window=_rounded(stats.window), window_source=window_source,
                  p_apply=P_APPLY, max_nodes=MAX_NODES)
    log(f"  synth-nodes: {len(axes)} support node(s) in {len(cases) - len(empty)} of {len(cases)} case(s); "
        f"semi-axes {_span(stats.axes_min)} to {_span(stats.axes_max)} voxels; intensity "
        f"{pooled[:, 0].mean():.2f} +- {pooled[:, 0].std():.2f} (normalised); soft tissue "
        f"{stats.window[0]:.2f}..{stats.window[1]:.2f} ({window_source})")
    return stats, record


def _rounded(values) -> List[float]:
    return [round(float(v), 4) for v in values]


def _span(axes) -> str:
    return "x".join(f"{a:.1f}" for a in axes)


def soft_tissue_mask(image0: np.ndarray, seg: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """Voxels where a node may go: smoothed channel-0 intensity in ``window``, no label (nor -1) within one voxel."""
    smooth = gaussian_filter(image0.astype(np.float32), MASK_SMOOTH_SIGMA)
    occupied = binary_dilation(seg != 0, structure=_FULL)
    return (smooth >= window[0]) & (smooth <= window[1]) & ~occupied


def ellipsoid(axes: np.ndarray) -> np.ndarray:
    """Signed distance (voxels, first order) to the surface of an ellipsoid with semi-axes ``axes``, on a box
    centred on it that holds the blend zone. Negative inside."""
    half = np.ceil(axes + BLEND_VOXELS).astype(int)
    grid = np.meshgrid(*[np.arange(-h, h + 1, dtype=np.float64) for h in half], indexing="ij")
    f = sum((g / a) ** 2 for g, a in zip(grid, axes)) - 1.0
    grad = 2.0 * np.sqrt(sum((g / a ** 2) ** 2 for g, a in zip(grid, axes)))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(grad > 0, f / grad, -np.inf)
    return d


def insert_nodes(image: np.ndarray, seg: np.ndarray, stats: NodeStatistics, rng: np.random.Generator,
                 count: int) -> List[Dict]:
    """Insert up to ``count`` nodes into ``image`` (C, Z, Y, X) and ``seg`` (Z, Y, X), in place. Returns one
    record per inserted node: centre, semi-axes, label."""
    allowed = soft_tissue_mask(image[0], seg, stats.window)
    placed = []
    for _ in range(count):
        donor = rng.integers(len(stats.semi_axes))
        axes = np.clip(stats.semi_axes[donor] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER, 3),
                       stats.axes_min, stats.axes_max)
        d = ellipsoid(axes)
        alpha = np.clip(0.5 - d / BLEND_VOXELS, 0.0, 1.0)
        footprint = alpha > 0
        half = np.array(d.shape) // 2
        inner = allowed[tuple(slice(h, n - h) for h, n in zip(half, allowed.shape))]
        candidates = np.argwhere(inner)
        if not len(candidates):
            continue
        for centre in candidates[rng.choice(len(candidates), min(PLACEMENT_TRIES, len(candidates)), replace=False)]:
            box = tuple(slice(c, c + s) for c, s in zip(centre, d.shape))  # centre is the box's corner in `allowed`
            if allowed[box][footprint].all():
                break
        else:
            continue
        z = gaussian_filter(rng.standard_normal(d.shape), TEXTURE_SIGMA) / _TEXTURE_SD  # N(0, 1) at every voxel
        node = stats.quantile(ndtr(z)).astype(image.dtype)
        image[(slice(None), *box)] = alpha * node + (1 - alpha) * image[(slice(None), *box)]
        label_box = seg[box]
        label_box[d <= 0] = stats.labels[donor]
        allowed[box] &= ~(d < BLEND_VOXELS)  # the next node keeps its footprint off this one
        placed.append({"centre": [int(c + h) for c, h in zip(centre, half)], "semi_axes": _rounded(axes),
                       "label": int(stats.labels[donor])})
    return placed


class SynthNodesTransform(BasicTransform):
    """Per training patch: with probability ``p_apply``, 1..``max_nodes`` synthetic nodes (``insert_nodes``).
    Counts patches, inserted nodes and its own time (valid where nnU-Net augments in this process)."""

    def __init__(self, stats: NodeStatistics, p_apply: float = P_APPLY, max_nodes: int = MAX_NODES):
        super().__init__()
        self.stats, self.p_apply, self.max_nodes = stats, p_apply, max_nodes
        self.patches = self.nodes = 0
        self.seconds = 0.0

    def apply(self, data_dict, **params):
        t0 = time.perf_counter()
        image, seg = data_dict["image"], data_dict["segmentation"]
        if image.ndim != 4:
            raise ValueError(f"synth-nodes inserts 3-D nodes; this configuration trains on {image.ndim - 1}-D "
                             "patches (use a 3-D configuration, or run without --augment)")
        rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))  # numpy's global stream: the run's seed
        self.patches += 1
        if rng.random() < self.p_apply:
            img, lab = image.numpy().copy(), seg.numpy().copy()
            placed = insert_nodes(img, lab[0], self.stats, rng, int(rng.integers(1, self.max_nodes + 1)))
            if placed:
                self.nodes += len(placed)
                data_dict["image"], data_dict["segmentation"] = torch.from_numpy(img), torch.from_numpy(lab)
        self.seconds += time.perf_counter() - t0
        return data_dict

    def __repr__(self):  # the base class prints every attribute, the intensity sample included
        return f"SynthNodesTransform(p_apply={self.p_apply}, max_nodes={self.max_nodes}, " \
               f"support_nodes={len(self.stats.semi_axes)})"


@AUGMENTATIONS.register("synth-nodes")
class SynthNodes(Augmentation):
    label = "synth"
    summary = "synthetic nodes in soft tissue, sizes and intensities from the support nodes"

    def training_transform(self, cases: Sequence[SupportCase], normalisation: Normalisation,
                           log: Callable[[str], None] = print):
        stats, record = support_statistics(cases, normalisation, log)
        return (SynthNodesTransform(stats) if stats is not None else None), record
