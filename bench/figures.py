"""Figure helpers shared by the report and the leaderboards: files only, reproducible.

Importing this module selects matplotlib's Agg backend (no window, no display needed); import it before
``matplotlib.pyplot``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402


def save_figure(fig, path: Path, tight: bool = False) -> Path:
    """Save a PNG reproducibly (no software/version metadata) and free the figure. ``tight`` grows the
    canvas to every artist, for figures that draw text outside their axes (the CD diagram)."""
    extra = {"bbox_inches": "tight", "pad_inches": 0.15} if tight else {}
    fig.savefig(path, dpi=100, metadata={"Software": None}, **extra)
    plt.close(fig)
    return path


def palette(methods: List[str]) -> Dict[str, tuple]:
    """One fixed colour per method (sorted names), the same in every figure."""
    methods = sorted(methods)
    return dict(zip(methods, sns.color_palette("tab10" if len(methods) <= 10 else "husl", len(methods))))
