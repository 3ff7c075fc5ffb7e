"""Number and table formatting shared by the report and the leaderboards (Markdown, fixed digits)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub Markdown table; cells are written with ``str`` (format numbers before)."""
    rows = [list(map(str, df.columns))] + [[str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("---" for _ in df.columns) + "|")
    return "\n".join(lines)


def fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def fmt_ci(x, lo, hi, digits: int = 3) -> str:
    return f"{fmt(x, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def fmt_p(p) -> str:
    return "n/a" if p is None or np.isnan(p) else ("<0.001" if p < 1e-3 else f"{p:.3f}")


def p_text(p) -> str:
    """'p = 0.012' or 'p < 0.001' for running text."""
    s = fmt_p(p)
    return f"p < {s[1:]}" if s.startswith("<") else f"p = {s}"
