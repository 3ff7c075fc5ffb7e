"""Foundation checkpoints: loaded without unpickling arbitrary objects, key prefixes undone, tensors
matched to a network by name and shape.

``torch.load(weights_only=True)`` always, with only the numpy reconstructors that nnU-Net's trainer needs
allowed: it pickles its logged values and ``_best_ema`` as numpy scalars and arrays. numpy 1 wrote them
under ``numpy.core``, numpy 2 under ``numpy._core``; both names are allowed, since published checkpoints
predate numpy 2. Anything else is refused, naming the file and the types; there is no fallback to a
full unpickle.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

# Key prefixes of wrapped modules, outermost first; both can stack (DDP around a compiled module).
PREFIXES = {"module.": "DistributedDataParallel / DataParallel", "_orig_mod.": "torch.compile"}
# numpy dtypes of the values nnU-Net logs: no object, string or void dtypes (those carry arbitrary data).
_DTYPE_CODES = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]


class CheckpointError(ValueError):
    """A checkpoint that is refused: the message names the file (or layer), what is wrong and the fix."""


class PartialState(dict):
    """A foundation state dict that covers only part of the network (e.g. a self-supervised encoder and
    stem): tensors under ``fresh_prefixes`` that it lacks keep the network's own initialisation instead of
    being a mismatch. ``why`` says what the checkpoint holds, for the load report."""

    def __init__(self, state: Dict[str, torch.Tensor], fresh_prefixes: Sequence[str], why: str):
        super().__init__(state)
        self.fresh_prefixes, self.why = tuple(fresh_prefixes), why


def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    return multiarray


def numpy_globals() -> list:
    """What ``weights_only`` loading may reconstruct besides tensors: numpy scalars, arrays and dtypes."""
    ma = _multiarray()
    allowed: list = [np.ndarray, np.dtype]
    allowed += sorted({type(np.dtype(c)) for c in _DTYPE_CODES}, key=lambda t: t.__name__)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(ma.scalar, f"{module}.scalar"), (ma._reconstruct, f"{module}._reconstruct")]
    return allowed


def _allowed_names() -> set:
    return {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in numpy_globals()}


def _disallowed(path: Path, error: Exception) -> List[str]:
    """The globals of ``path`` that loading refused: from the archive, else from torch's message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) format: only the error message says
        names = []
    names = [n for n in names if n not in _allowed_names()]
    if names:
        return names
    text = " ".join(str(error).split())
    names = re.findall(r"GLOBAL (\S+) was not an allowed global|but got <class '([^']+)'>", text)
    if names:
        return [a or b for a, b in names]
    said = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    return [f"an object torch refuses ({said.group(1) if said else text})"]


def load_checkpoint(path) -> dict:
    path = Path(path)
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: it pickles {', '.join(_disallowed(path, e))}, which only a full unpickle could "
            "rebuild, and a full unpickle can run arbitrary code. Tensors, plain Python values and numpy "
            "scalars/arrays load. If you trust the file, re-save its weights alone: ckpt = torch.load(path, "
            "weights_only=False); torch.save({'network_weights': ckpt['network_weights']}, path).") from None
    except (RuntimeError, EOFError, OSError) as e:  # torch's zip reader on a truncated or foreign file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({str(e).strip().splitlines()[0]}); "
                              "the file is truncated or not a checkpoint: copy or download it again.") from None


def strip_prefixes(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Keys without the wrappers' prefixes, and one note per prefix removed (for the load report)."""
    counts = dict.fromkeys(PREFIXES, 0)
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
                    counts[prefix] += 1
        out[key] = value
    notes = [f"stripped prefix '{p}' ({PREFIXES[p]}) from {n} keys" for p, n in counts.items() if n]
    return out, notes


# Segmentation heads by state-dict key: nnU-Net's decoders keep every deep-supervision output in
# ``seg_layers``; MONAI's SwinUNETR (bench.architectures.swin_unetr) has one output block, ``out``.
HEAD_PATTERN = re.compile(r"(^|\.)seg_layers\.|^out\.conv\.")


def is_head(key: str) -> bool:
    return HEAD_PATTERN.search(key) is not None


def _channel_mismatch(key: str, own: Sequence[int], theirs: Sequence[int]) -> bool:
    """Same kernel, other input-channel count: dim 1 of a conv weight is its input channels."""
    return len(own) == len(theirs) >= 3 and own[1] != theirs[1] and \
        tuple(own[:1]) + tuple(own[2:]) == tuple(theirs[:1]) + tuple(theirs[2:])


def match_weights(own: Dict[str, Sequence[int]], state: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """(keys loaded from ``state``, keys re-initialised) for a network whose state-dict shapes are ``own``.
    Heads load when their shape matches (same label set); tensors a ``PartialState`` leaves out under its
    fresh prefixes are re-initialised too; any other mismatch is refused, an input-channel mismatch of the
    first layer by name."""
    loaded, reinit, mismatched = [], [], []
    first = next(iter(own), None)
    fresh = getattr(state, "fresh_prefixes", ())
    for key, shape in own.items():
        src = state.get(key)
        if src is not None and tuple(src.shape) == tuple(shape):
            loaded.append(key)
        elif is_head(key) or (src is None and key.startswith(fresh)):
            reinit.append(key)
        elif src is not None and key == first and _channel_mismatch(key, shape, src.shape):
            raise CheckpointError(
                f"foundation checkpoint takes {src.shape[1]} input channel(s), the target {shape[1]} (first layer "
                f"{key}: checkpoint {tuple(src.shape)}, network {tuple(shape)}). Use a dataset with the "
                f"foundation's {src.shape[1]} channel(s) (its dataset.json channel_names), e.g. segrap2023 "
                "without --contrast-channel, or a foundation trained on your channels.")
        else:
            mismatched.append(f"{key}: network {tuple(shape)} vs checkpoint "
                              f"{tuple(src.shape) if src is not None else 'missing'}")
    if mismatched:
        raise CheckpointError("foundation checkpoint does not match the architecture in its plans: "
                              + "; ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else ""))
    return loaded, reinit
