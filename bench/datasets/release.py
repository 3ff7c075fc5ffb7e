"""Converting a local copy of a data release (shared by segrap2023, lnq2023): walking the source and
the ``ReleaseDataset`` pipeline. Reading files is in ``image_io``, grids in ``geometry``, checks in ``validation``.

Every refusal is a ``DatasetError`` whose message names the file, says what is
wrong and what to do. Nothing is ever written into the source directory.

``ReleaseDataset`` is the conversion pipeline; a dataset module only says how
to find its cases (``discover``) and how to turn one case into images and a
binary lymph-node mask (``convert``). The pipeline adds what every converter
needs:
- all cases are checked and all problems reported at once (a 120-case release
  should not need 120 runs to find its bad files);
- output goes through ``Dataset.staging()``: a failure leaves the previous
  complete dataset (or none), never a half-written one;
- a manifest of the source files' sizes/mtimes and the options is stored in
  the raw folder: an unchanged source is not converted again, and a changed
  one re-converts only the cases whose files changed;
- an empty label is a warning, and an error for a case the dataset's protocol
  uses with labels (test, support, tuning): ``validation.check_labels_not_empty``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from bench.datasets.base import Dataset, DatasetError
from bench.datasets.validation import check_labels_not_empty, protocol_label_ids, warn
from bench.home import DEFAULT_HOME

log = logging.getLogger(__name__)

MANIFEST = "source_manifest.json"
# Copies made by browsers / unzip tools: "GTVnd (1).nii.gz", "lnq2023-val-0001-seg (2).nrrd".
DOWNLOAD_COPY = re.compile(r"\s?\(\d+\)\.(nii(\.gz)?|nrrd)$", re.IGNORECASE)
SKIPPED_DIRS = ("__MACOSX",)  # macOS zip metadata: mirrors the real tree with ._ files


def warn_download_copies(folder: Path, names: Sequence[str]) -> None:
    for name in names:
        if DOWNLOAD_COPY.search(name):
            warn(f"{folder / name}: ignored; looks like a duplicate download copy. Delete it if it is one.")


# --------------------------------------------------------------------------- source walking

def walk(source: Path, max_depth: Optional[int] = None) -> Iterator[Tuple[Path, List[str], List[str]]]:
    """os.walk from source (depth 0), skipping hidden folders and zip metadata.

    Callers may prune ``dirs`` in place, as with os.walk.
    """
    base = len(source.parts)
    for root, dirs, files in os.walk(source):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        if max_depth is not None and len(here.parts) - base >= max_depth:
            dirs[:] = []
        yield here, dirs, sorted(f for f in files if not f.startswith("."))


# --------------------------------------------------------------------------- the pipeline

@dataclass
class CaseSource:
    """Where one case's files are; ``missing`` maps a role to where it was expected."""
    case_id: str
    files: Dict[str, Path] = field(default_factory=dict)
    missing: Dict[str, str] = field(default_factory=dict)
    kind: str = ""          # converter-specific, e.g. how the label is encoded

    def stamps(self) -> Dict[str, list]:
        return {role: [str(p), p.stat().st_size, p.stat().st_mtime_ns] for role, p in sorted(self.files.items())}


def duplicate_error(case_id: str, places: Sequence[Path]) -> DatasetError:
    listed = ", ".join(str(p) for p in places)
    return DatasetError(f"case id {case_id} occurs {len(places)} times: {listed}. Keep one copy of the "
                        "release under --source (remove the duplicate folder or file).")


class ReleaseDataset(Dataset):
    """A dataset converted from a local copy of a public release."""
    options: ClassVar[Dict[str, bool]] = {}   # option name -> default; CLI flag --option-name
    layout: ClassVar[str] = ""                # the accepted layout, quoted when nothing is found
    converter_version: ClassVar[int] = 1      # bump when output for the same input changes

    def __init__(self) -> None:
        self._channels: Optional[Dict[str, str]] = None

    # -- what a dataset module provides
    def discover(self, source: Path, **options) -> Dict[str, CaseSource]:
        raise NotImplementedError

    def convert(self, case: CaseSource, **options) -> Tuple[List[sitk.Image], np.ndarray]:
        """Images (channel order) and a binary z, y, x mask on the first image's grid."""
        raise NotImplementedError

    def channels_for(self, **options) -> Dict[str, str]:
        return {"0": "CT"}

    # -- channel names follow the prepared data (e.g. segrap2023 with a contrast channel)
    @property
    def channel_names(self) -> Dict[str, str]:  # type: ignore[override]
        return self.from_prepared("channel_names", "_channels", lambda: self.channels_for(**self.options))

    def from_prepared(self, key: str, cache: str, otherwise: Callable[[], Any]) -> Any:
        """The prepared dataset.json's ``key`` (kept in attribute ``cache``), else ``otherwise()``: what a
        preparation with the current options would write."""
        if getattr(self, cache) is None:
            meta = self.raw_dir() / "dataset.json"
            if not (self.is_prepared() and meta.is_file()):
                return otherwise()
            setattr(self, cache, json.loads(meta.read_text())[key])
        return getattr(self, cache)

    def manifest(self) -> Optional[dict]:
        path = self.raw_dir() / MANIFEST
        return json.loads(path.read_text()) if self.is_prepared() and path.is_file() else None

    def foreground_counts(self) -> Dict[str, int]:
        """Lymph-node voxels per prepared case, from the manifest (no image reading)."""
        m = self.manifest() or {"cases": {}}
        return {cid: c["foreground_voxels"] for cid, c in m["cases"].items()}

    # -- the pipeline
    def prepare(self, source: Optional[Path] = None, **options) -> Path:
        options = self._resolve_options(options)
        source = self._resolve_source(source)
        cases = self.discover(source, **options)
        if not cases:
            raise DatasetError(f"no {self.name} cases found under {source}. Expected: {self.layout}")
        new = {"converter": f"{self.name} v{self.converter_version}", "options": options,
               "cases": {cid: {"inputs": c.stamps()} for cid, c in sorted(cases.items())}}
        old = self.manifest()
        if old is not None and _inputs(old) == _inputs(new):
            log.info("%s: nothing changed since the last preparation (%d cases in %s)",
                     self.name, len(cases), self.raw_dir())
            return self.raw_dir()

        self._channels = self.channels_for(**options)
        needs_label = protocol_label_ids(self.name)
        errors: List[str] = []
        converted = 0
        with self.staging() as tmp:
            for cid, case in sorted(cases.items()):
                entry = new["cases"][cid]
                try:
                    reused = self._reuse(old, new, cid, tmp)
                    if reused is None:
                        entry["foreground_voxels"] = self._convert_one(case, tmp, options)
                        converted += 1
                    else:
                        entry["foreground_voxels"] = reused
                    check_labels_not_empty({cid: entry["foreground_voxels"]}, needs_label,
                                           {cid: case.files.get("label", cid)})
                except DatasetError as e:
                    errors.append(str(e))
            if errors:
                raise DatasetError(f"{self.name}: {len(errors)} problem(s) in {source}; nothing was written "
                                   "(fix them and run again):\n- " + "\n- ".join(errors))
            (tmp / MANIFEST).write_text(json.dumps(new, indent=1) + "\n")
        log.info("%s: %d cases ready in %s (%d converted, %d unchanged)", self.name, len(cases),
                 self.raw_dir(), converted, len(cases) - converted)
        return self.raw_dir()

    def _resolve_options(self, given: dict) -> Dict[str, bool]:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise DatasetError(f"{self.name} has no option {', '.join(unknown)}; its options: {valid}.")
        return {k: bool(given.get(k, default)) for k, default in self.options.items()}

    def _resolve_source(self, source: Optional[Path]) -> Path:
        if source is None:
            raise DatasetError(f"{self.name} needs --source DIR: your local copy of the release "
                               f"(data is never downloaded). Expected: {self.layout}")
        source = Path(source).expanduser().resolve()
        if not source.is_dir():
            raise DatasetError(f"{source}: not a directory. Point --source at your local copy of the "
                               f"{self.name} release. Expected: {self.layout}")
        # Not bench_home(): it creates the folder, which must not happen inside the source.
        home = Path(os.environ.get("BENCH_HOME", DEFAULT_HOME)).expanduser().resolve()
        if home == source or source in home.parents:
            raise DatasetError(f"{source}: BENCH_HOME {home} lies inside the source; set BENCH_HOME outside the "
                               "release folder so that nothing is written into it.")
        return source

    def _convert_one(self, case: CaseSource, tmp: Path, options: dict) -> int:
        if case.missing:
            what = "; ".join(f"{role}: expected {where}" for role, where in case.missing.items())
            raise DatasetError(f"{case.case_id}: missing {what}. Check that the release was extracted "
                               "completely, or remove the incomplete case.")
        images, mask = self.convert(case, **options)
        for c, img in enumerate(images):
            sitk.WriteImage(img, str(tmp / "imagesTr" / f"{case.case_id}_{c:04d}.nii.gz"), useCompression=True)
        label = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
        label.CopyInformation(images[0])  # exact grid equality for nnU-Net's integrity check
        sitk.WriteImage(label, str(tmp / "labelsTr" / f"{case.case_id}.nii.gz"), useCompression=True)
        return int(np.count_nonzero(mask))

    def _outputs(self, folder: Path, cid: str) -> List[Path]:
        return ([folder / "imagesTr" / f"{cid}_{int(c):04d}.nii.gz" for c in sorted(self._channels, key=int)]
                + [folder / "labelsTr" / f"{cid}.nii.gz"])

    def _reuse(self, old: Optional[dict], new: dict, cid: str, tmp: Path) -> Optional[int]:
        """Link the previous output of an unchanged case into the staging folder; its foreground count."""
        if old is None or old["converter"] != new["converter"] or old["options"] != new["options"]:
            return None
        prev = old["cases"].get(cid)
        if prev is None or prev["inputs"] != new["cases"][cid]["inputs"]:
            return None
        srcs, dsts = self._outputs(self.raw_dir(), cid), self._outputs(tmp, cid)
        if not all(p.is_file() for p in srcs):
            return None
        for s, d in zip(srcs, dsts):
            try:
                os.link(s, d)   # same file system: no copy, mtimes kept
            except OSError:
                shutil.copy2(s, d)
        return int(prev["foreground_voxels"])


def _inputs(manifest: dict) -> tuple:
    return (manifest["converter"], manifest["options"],
            {cid: c["inputs"] for cid, c in manifest["cases"].items()})
