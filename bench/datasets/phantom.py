"""``phantom``: deterministic synthetic head-and-neck-like CT with lymph-node-like ellipsoids.

Two domains share one anatomy generator:
- source (``PhantomSource``, pretraining the tiny foundation model): spacing
  3.0 x 1.5 x 1.5 mm, low noise, small bright nodes;
- target (``phantom``, few-shot fine-tuning): spacing 2.5 x 1.2 x 1.2 mm,
  scanner offset/scale, twice the noise, larger and darker nodes with a
  hypodense (necrotic-like) core in some.

Anatomy per case (all sizes in mm, randomised from the case seed): air, an
elliptic neck with a subcutaneous fat rim, muscle, vertebral body with marrow,
trachea, carotid arteries and jugular veins (contrast-enhanced tubes that
wander along z) and 2-5 nodes placed lateral/posterior to a vessel.
Same seed, same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from bench.datasets import DATASETS
from bench.datasets.base import Dataset

PHANTOM_VERSION = 1  # bump when the generator's output changes


@dataclass(frozen=True)
class Domain:
    key: str
    shape: Tuple[int, int, int]        # z, y, x voxels
    spacing: Tuple[float, float, float]  # z, y, x mm
    noise_hu: float
    hu_scale: float
    hu_offset: float
    vessel_hu: float
    node_hu: float
    node_radius_mm: Tuple[float, float]
    necrotic_fraction: float
    seed_offset: int


SOURCE = Domain("source", (32, 64, 64), (3.0, 1.5, 1.5), noise_hu=10.0, hu_scale=1.0, hu_offset=0.0,
                vessel_hu=190.0, node_hu=95.0, node_radius_mm=(5.0, 8.0), necrotic_fraction=0.0,
                seed_offset=0)
TARGET = Domain("target", (38, 80, 80), (2.5, 1.2, 1.2), noise_hu=22.0, hu_scale=1.08, hu_offset=25.0,
                vessel_hu=150.0, node_hu=72.0, node_radius_mm=(6.0, 10.0), necrotic_fraction=0.4,
                seed_offset=100_000)


def generate_case(domain: Domain, index: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Return (ct [HU, float32], label [uint8]) arrays of shape domain.shape (z, y, x)."""
    rng = np.random.default_rng([seed, domain.seed_offset, index])
    nz, ny, nx = domain.shape
    sz, sy, sx = domain.spacing
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")

    ct = np.full(domain.shape, -1000.0)
    cy, cx = rng.uniform(-3, 3, 2)
    ry, rx = rng.uniform(34, 40), rng.uniform(40, 45)
    body = ((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2 <= 1
    inner = ((Y - cy) / (ry - 4)) ** 2 + ((X - cx) / (rx - 4)) ** 2 <= 1
    ct[body] = -100.0                      # subcutaneous fat
    ct[inner] = 45.0                       # muscle / soft tissue
    texture = gaussian_filter(rng.normal(0, 1, domain.shape), 2.0)
    ct[inner] += 15.0 * texture[inner] / (texture.std() + 1e-6)

    def tube(yc, xc, r, wobble):
        phase = rng.uniform(0, 2 * np.pi)
        dy = wobble * np.sin(Z / 25.0 + phase)
        return (Y - yc - dy) ** 2 + (X - xc) ** 2 <= r ** 2

    spine_y = cy + rng.uniform(18, 22)
    ct[tube(spine_y, cx, 10.0, 0.5)] = 700.0
    ct[tube(spine_y, cx, 6.0, 0.5)] = 250.0
    ct[tube(cy - rng.uniform(16, 20), cx, rng.uniform(6, 8), 1.0)] = -900.0   # trachea

    vessels = []
    for side in (-1, 1):
        for dx, dy, r in ((18, -4, 3.5), (26, 1, 5.0)):     # carotid, jugular
            yc = cy + dy + rng.uniform(-2, 2)
            xc = cx + side * (dx + rng.uniform(-2, 2))
            ct[tube(yc, xc, r * rng.uniform(0.9, 1.1), 1.5)] = domain.vessel_hu
            vessels.append((yc, xc, side))

    label = np.zeros(domain.shape, dtype=np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        yc, xc, side = vessels[int(rng.integers(len(vessels)))]
        ang = rng.uniform(-0.3, 1.2)       # lateral to posterior of the vessel
        dist = rng.uniform(9, 14)
        ny_, nx_ = yc + dist * np.sin(ang), xc + side * dist * np.cos(ang)
        nz_ = rng.uniform(z[0] + 10, z[-1] - 10)
        a, b, c = rng.uniform(*domain.node_radius_mm, 3) * np.array([1.3, 1.0, 1.0])
        node = ((Z - nz_) / a) ** 2 + ((Y - ny_) / b) ** 2 + ((X - nx_) / c) ** 2 <= 1
        node &= inner
        ct[node] = domain.node_hu + rng.normal(0, 5)
        if rng.random() < domain.necrotic_fraction:
            core = ((Z - nz_) / (a / 2)) ** 2 + ((Y - ny_) / (b / 2)) ** 2 + ((X - nx_) / (c / 2)) ** 2 <= 1
            ct[core & node] = 20.0
        label[node] = 1

    ct = gaussian_filter(ct, 0.6)           # partial-volume blur
    ct = ct * domain.hu_scale + domain.hu_offset + rng.normal(0, domain.noise_hu, domain.shape)
    return np.clip(ct, -1024, 3071).astype(np.float32), label


def _write(array: np.ndarray, spacing_zyx, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path), useCompression=True)


class _PhantomBase(Dataset):
    needs_source = False
    domain: Domain
    n_cases: int
    prefix: str

    def case_id(self, i: int) -> str:
        return f"{self.prefix}_{i:03d}"

    def prepare(self, source: Optional[Path] = None, seed: int = 0, **options) -> Path:
        if source is not None:
            raise ValueError(f"{self.name} is generated, it takes no --source")
        stamp = f"phantom v{PHANTOM_VERSION} seed {seed} n {self.n_cases}\n"
        recipe = self.raw_dir() / "generator.txt"
        if self.is_prepared() and recipe.is_file() and recipe.read_text() == stamp:
            return self.raw_dir()  # idempotent: same recipe already generated
        with self.staging() as tmp:
            for i in range(self.n_cases):
                ct, lab = generate_case(self.domain, i, seed)
                cid = self.case_id(i)
                _write(ct, self.domain.spacing, tmp / "imagesTr" / f"{cid}_0000.nii.gz")
                _write(lab, self.domain.spacing, tmp / "labelsTr" / f"{cid}.nii.gz")
            (tmp / "generator.txt").write_text(stamp)
        return self.raw_dir()


class PhantomSource(_PhantomBase):
    """Source domain, used only to pretrain the phantom foundation model."""
    name = "phantom-source"
    dataset_id = 901
    folder_name = "Dataset901_PhantomSource"
    domain = SOURCE
    n_cases = 24
    prefix = "src"


@DATASETS.register("phantom")
class Phantom(_PhantomBase):
    name = "phantom"
    dataset_id = 902
    folder_name = "Dataset902_PhantomTarget"
    domain = TARGET
    n_cases = 30
    prefix = "ph"
    description = "embedded synthetic target domain (30 cases, generated in seconds)"
