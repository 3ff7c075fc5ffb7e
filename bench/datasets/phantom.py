"""``phantom``: deterministic synthetic head-and-neck-like CT with lymph-node-like ellipsoids.

Generator v2; docs/phantom.md has the generative model, the shifts and what
each one does to the reference rows. Two domains share one anatomy generator:

- source (``PhantomSource``, pretraining the foundation): arterial phase
  (vessels far brighter than nodes), small homogeneous bright nodes, low
  noise, every node labelled, contours on the node's edge; 3.0 x 2.4 x 2.4 mm.
- target (``phantom``, few-shot fine-tuning): a late venous phase that varies
  per case, fainter and larger nodes in three per-case patterns (homogeneous,
  necrotic with a hypodense core, matted conglomerates), per-case noise, a
  scanner offset/scale, 2.5 x 1.6 x 1.6 mm; and a different annotation
  convention: only the pathological nodes are labelled (small normal nodes and
  gland-like ellipsoids are not), contoured with a 2 mm margin.

Same seed, same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from bench.datasets import DATASETS
from bench.datasets.base import Dataset

PHANTOM_VERSION = 2  # bump when the generator's output changes
MUSCLE_HU = 45.0
NODE, GLAND, VESSEL = 1, 2, 3   # label values; phantom-multi labels all three, phantom nodes only

Range = Tuple[float, float]


@dataclass(frozen=True)
class Domain:
    key: str
    shape: Tuple[int, int, int]          # z, y, x voxels
    spacing: Tuple[float, float, float]  # z, y, x mm
    noise_hu: Range                      # per case
    hu_scale: float
    hu_offset: float
    vessel_hu: Range                     # per case: contrast phase
    node_contrast_hu: Range              # per case: |node - muscle|
    hypodense_fraction: float            # per case: nodes darker than muscle (cystic); 0 in both domains
    node_radius_mm: Range
    nodes: Tuple[int, int]               # per case, inclusive
    patterns: Tuple[float, float, float]  # per-case probability of homogeneous / necrotic / matted nodes
    glands: Tuple[int, int]              # per case, inclusive: unlabelled gland-like distractors
    normal_nodes: Tuple[int, int]        # per case, inclusive: unlabelled small source-like nodes
    label_margin_mm: float               # the annotation convention: contours this far outside the node
    seed_offset: int


SOURCE = Domain("source", (20, 40, 40), (3.0, 2.4, 2.4), noise_hu=(8.0, 12.0), hu_scale=1.0, hu_offset=0.0,
                vessel_hu=(230.0, 270.0), node_contrast_hu=(45.0, 55.0), hypodense_fraction=0.0,
                node_radius_mm=(5.0, 8.0), nodes=(2, 4),
                patterns=(1.0, 0.0, 0.0), glands=(0, 0), normal_nodes=(0, 0), label_margin_mm=0.0,
                seed_offset=0)
TARGET = Domain("target", (24, 60, 60), (2.5, 1.6, 1.6), noise_hu=(15.0, 30.0), hu_scale=1.08, hu_offset=20.0,
                vessel_hu=(100.0, 170.0), node_contrast_hu=(12.0, 30.0), hypodense_fraction=0.0,
                node_radius_mm=(7.0, 11.0), nodes=(1, 3),
                patterns=(0.3, 0.45, 0.25), glands=(0, 2), normal_nodes=(1, 4), label_margin_mm=2.0,
                seed_offset=100_000)


def generate_case(domain: Domain, index: int, seed: int = 0, structures: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Return (ct [HU, float32], label [uint8]) arrays of shape domain.shape (z, y, x).

    ``structures``: the label also holds the gland-like ellipsoids (``GLAND``) and both jugular veins
    (``VESSEL``), nodes winning where they overlap (``phantom-multi``); the image is the same either way."""
    rng = np.random.default_rng([seed, domain.seed_offset, index])
    nz, ny, nx = domain.shape
    sz, sy, sx = domain.spacing
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")

    # per-case acquisition and patient: what makes one case teach something another does not
    noise = rng.uniform(*domain.noise_hu)
    vessel_hu = rng.uniform(*domain.vessel_hu)
    contrast = rng.uniform(*domain.node_contrast_hu)
    node_hu = MUSCLE_HU + (-contrast if rng.random() < domain.hypodense_fraction else contrast)
    pattern = int(rng.choice(3, p=domain.patterns))   # 0 homogeneous, 1 necrotic, 2 matted

    ct = np.full(domain.shape, -1000.0)
    cy, cx = rng.uniform(-3, 3, 2)
    ry, rx = rng.uniform(34, 40), rng.uniform(40, 45)
    body = ((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2 <= 1
    inner = ((Y - cy) / (ry - 4)) ** 2 + ((X - cx) / (rx - 4)) ** 2 <= 1
    ct[body] = -100.0                      # subcutaneous fat
    ct[inner] = MUSCLE_HU                  # muscle / soft tissue
    texture = gaussian_filter(rng.normal(0, 1, domain.shape), 2.0)
    ct[inner] += 15.0 * texture[inner] / (texture.std() + 1e-6)

    def tube(yc, xc, r, wobble):
        phase = rng.uniform(0, 2 * np.pi)
        dy = wobble * np.sin(Z / 25.0 + phase)
        dx = wobble * np.cos(Z / 30.0 + phase)
        return (Y - yc - dy) ** 2 + (X - xc - dx) ** 2 <= r ** 2

    spine_y = cy + rng.uniform(18, 22)
    ct[tube(spine_y, cx, 10.0, 0.5)] = 700.0
    ct[tube(spine_y, cx, 6.0, 0.5)] = 250.0
    ct[tube(cy - rng.uniform(16, 20), cx, rng.uniform(6, 8), 1.0)] = -900.0   # trachea

    vessels = []
    jugular = np.zeros(domain.shape, bool)
    for side in (-1, 1):
        for dx, dy, r in ((18, -4, 3.5), (26, 1, 5.0)):     # carotid, jugular
            yc = cy + dy + rng.uniform(-2, 2)
            xc = cx + side * (dx + rng.uniform(-2, 2))
            value = vessel_hu + rng.normal(0, 8)   # drawn before the lumen, as the generator always has
            lumen = tube(yc, xc, r * rng.uniform(0.9, 1.2), 2.0)
            ct[lumen] = value
            if dx == 26:
                jugular |= lumen
            vessels.append((yc, xc, side))

    label = np.zeros(domain.shape, dtype=np.uint8)
    lo, hi = domain.nodes
    for _ in range(int(rng.integers(lo, hi + 1))):
        yc, xc, side = vessels[int(rng.integers(len(vessels)))]
        ang = rng.uniform(-0.3, 1.2)       # lateral to posterior of the vessel
        dist = rng.uniform(9, 14)
        ny_, nx_ = yc + dist * np.sin(ang), xc + side * dist * np.cos(ang)
        nz_ = rng.uniform(z[0] + 0.3 * (z[-1] - z[0]), z[-1] - 0.3 * (z[-1] - z[0]))
        radii = rng.uniform(*domain.node_radius_mm, 3) * np.array([1.3, 1.0, 1.0])
        blobs = [(nz_, ny_, nx_, radii)]
        if pattern == 2:                   # matted: 2-3 overlapping nodes, one irregular mass
            for _ in range(int(rng.integers(1, 3))):
                off = rng.normal(0, 1, 3)
                off *= 0.8 * radii.mean() / (np.linalg.norm(off) + 1e-6)
                blobs.append((nz_ + off[0], ny_ + off[1], nx_ + off[2], radii * rng.uniform(0.6, 0.9)))
        node, contour = np.zeros(domain.shape, bool), np.zeros(domain.shape, bool)
        for bz, by, bx, (a, b, c) in blobs:
            node |= ((Z - bz) / a) ** 2 + ((Y - by) / b) ** 2 + ((X - bx) / c) ** 2 <= 1
            a, b, c = a + domain.label_margin_mm, b + domain.label_margin_mm, c + domain.label_margin_mm
            contour |= ((Z - bz) / a) ** 2 + ((Y - by) / b) ** 2 + ((X - bx) / c) ** 2 <= 1
        node &= inner
        ct[node] = node_hu + rng.normal(0, 5) + 10.0 * texture[node] / (texture.std() + 1e-6)
        if pattern == 1:                   # necrotic: hypodense core, enhancing rim
            a, b, c = radii * rng.uniform(0.45, 0.65)
            core = ((Z - nz_) / a) ** 2 + ((Y - ny_) / b) ** 2 + ((X - nx_) / c) ** 2 <= 1
            ct[core & node] = rng.uniform(5.0, 30.0)
        label[contour & inner] = 1

    glands, normal = add_distractors(ct, domain, np.random.default_rng([seed, domain.seed_offset, index, 1]), (Z, Y, X),
                             (cy, cx), inner & (label == 0), node_hu, vessels)
    if structures:
        label[glands & (label == 0)] = GLAND
        label[jugular & inner & ~normal & (label == 0)] = VESSEL   # where a normal node covers it, a node
    ct = gaussian_filter(ct, 0.6)           # partial-volume blur
    ct = ct * domain.hu_scale + domain.hu_offset + rng.normal(0, noise, domain.shape)
    return np.clip(ct, -1024, 3071).astype(np.float32), label


def add_distractors(ct, domain: Domain, rng, grid, centre, free, node_hu, vessels) -> None:
    """What the target labels do not include, and the source never showed: normal (non-pathological) nodes,
    small and homogeneous like the source's labelled ones, and salivary-gland-like lobulated ellipsoids
    anterior-lateral to the vessels, as bright as the nodes. Drawn from their own random stream so that
    domains without them keep their bytes. ``free``: soft tissue outside every labelled node. Returns the
    masks of the glands and of the normal nodes."""
    Z, Y, X = grid
    cy, cx = centre
    lo, hi = domain.normal_nodes
    normal = np.zeros(ct.shape, bool)
    for _ in range(int(rng.integers(lo, hi + 1))):
        yc, xc, side = vessels[int(rng.integers(len(vessels)))]
        ang, dist = rng.uniform(-0.3, 1.2), rng.uniform(8, 14)
        ny_, nx_ = yc + dist * np.sin(ang), xc + side * dist * np.cos(ang)
        nz_ = rng.uniform(Z.min() * 0.6, Z.max() * 0.6)
        a, b, c = rng.uniform(3.5, 5.5, 3) * np.array([1.3, 1.0, 1.0])
        node = (((Z - nz_) / a) ** 2 + ((Y - ny_) / b) ** 2 + ((X - nx_) / c) ** 2 <= 1) & free
        ct[node] = node_hu + rng.normal(0, 5)
        normal |= node
    lobules = gaussian_filter(rng.normal(0, 1, ct.shape), 1.0)
    lobules /= lobules.std() + 1e-6
    lo, hi = domain.glands
    glands = np.zeros(ct.shape, bool)
    for _ in range(int(rng.integers(lo, hi + 1))):
        gy, gx = cy - rng.uniform(10, 22), cx + rng.choice([-1, 1]) * rng.uniform(18, 30)
        gz = rng.uniform(Z.min() / 2, Z.max() / 2)
        a, b, c = rng.uniform(7, 12), rng.uniform(6, 10), rng.uniform(6, 10)
        gland = (((Z - gz) / a) ** 2 + ((Y - gy) / b) ** 2 + ((X - gx) / c) ** 2 <= 1) & free
        ct[gland] = node_hu + rng.uniform(-5, 15) + 18.0 * lobules[gland]
        glands |= gland
    return glands, normal


def _write(array: np.ndarray, spacing_zyx, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path), useCompression=True)


class _PhantomBase(Dataset):
    needs_source = False
    domain: Domain
    n_cases: int
    prefix: str
    structures = False      # label glands and veins too (generate_case)

    def case_id(self, i: int) -> str:
        return f"{self.prefix}_{i:03d}"

    def prepare(self, source: Optional[Path] = None, seed: int = 0, **options) -> Path:
        if source is not None:
            raise ValueError(f"{self.name} is generated, it takes no --source")
        stamp = (f"phantom v{PHANTOM_VERSION} seed {seed} n {self.n_cases}"
                 + (" structures" if self.structures else "") + "\n")
        recipe = self.raw_dir() / "generator.txt"
        if self.is_prepared() and recipe.is_file() and recipe.read_text() == stamp:
            return self.raw_dir()  # idempotent: same recipe already generated
        with self.staging() as tmp:
            for i in range(self.n_cases):
                ct, lab = generate_case(self.domain, i, seed, structures=self.structures)
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
    n_cases = 40
    prefix = "src"


@DATASETS.register("phantom")
class Phantom(_PhantomBase):
    dataset_id = 902
    folder_name = "Dataset902_PhantomTarget"
    domain = TARGET
    n_cases = 60
    prefix = "ph"
    description = "embedded synthetic target domain (60 cases, generated in seconds)"
    # 60 iterations at 1 and 3 shots, 100 at 5, 600 for the oracle's 30 pool cases (docs/phantom.md, Budget)
    iterations_per_case = 20


def protocol_v2() -> dict:
    """How ``bench/protocols/phantom/v2.json`` was made (a test checks the committed file matches)."""
    return _protocol("v2", repeats=5, notes="Results of v1 (generator v1, 10 test cases) are not comparable.")


def protocol_v3() -> dict:
    """How ``bench/protocols/phantom/v3.json`` was made: v2 with 10 repeats instead of 5. Its first 5 are v2's
    (their runs are reused); 5 repeats left the 1-shot comparisons, which hinge on one support case, with
    about 4 degrees of freedom for the repeat component of the crossed CI (docs/phantom.md,
    Protocols v2 and v3)."""
    return _protocol("v3", repeats=10, extends="v2",
                     notes="Extends v2: repeats 0-4 are v2's (same splits and seeds), 5-9 are new.")


def _protocol(version: str, repeats: int, notes: str, extends: Optional[str] = None) -> dict:
    from bench.protocols import make_protocol
    ids = [Phantom().case_id(i) for i in range(Phantom.n_cases)]
    notes = (f"phantom generator v{PHANTOM_VERSION} (bench/datasets/phantom.py; docs/phantom.md): test = the first "
             "30 generated target cases; pool = the other 30 (supports, tuning sets and the oracle's training set). "
             + notes)
    return make_protocol("phantom", version, pool=ids[30:], test=ids[:30], shots=(1, 3, 5), repeats=repeats,
                         seed=2024, notes=notes, extends=extends)


# phantom-multi: the target domain with every case showing 1-2 glands, labelled with the nodes and both
# jugular veins. Its own cases (seed offset), its own smaller protocol.
MULTI_TARGET = replace(TARGET, glands=(1, 2), seed_offset=200_000)


@DATASETS.register("phantom-multi")
class PhantomMulti(_PhantomBase):
    dataset_id = 903
    folder_name = "Dataset903_PhantomMulti"
    domain = MULTI_TARGET
    n_cases = 24
    prefix = "pm"
    structures = True
    labels = {"background": 0, "lymph_node": NODE, "gland": GLAND, "vessel": VESSEL}
    description = "embedded synthetic multi-label task: nodes, glands, jugular veins (24 cases)"


def protocol_multi_v1() -> dict:
    """How ``bench/protocols/phantom-multi/v1.json`` was made (a test checks the committed file matches)."""
    from bench.protocols import make_protocol
    ids = [PhantomMulti().case_id(i) for i in range(PhantomMulti.n_cases)]
    notes = (f"phantom generator v{PHANTOM_VERSION}, multi-label variant (docs/phantom.md): labels lymph_node, "
             "gland, vessel. test = the first 12 generated cases; pool = the other 12. 3 repeats: a smaller "
             "protocol than phantom's, for a task with three labels per case.")
    return make_protocol("phantom-multi", "v1", pool=ids[12:], test=ids[:12], shots=(1, 3, 5), repeats=3,
                         seed=2025, notes=notes)
