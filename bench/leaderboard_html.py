"""The leaderboard as one self-contained HTML page: ``leaderboards/<dataset>.html``.

Rendered from the same leaderboard table, legend, notes and caption as the Markdown page
(``bench.leaderboard``), never from a computation of its own: the shown columns are
``shown_columns``' frame, so a column added there appears here too. The page adds a sortable table
(click a header; numbers sort as numbers, missing values last), a CI bar per row (inline SVG on one
Dice scale for every tab, in the figures' method colours), one tab per shots and the figures embedded as
base64 PNG: the leaderboard's own and, when a ``bench report`` directory for the dataset is given, the
report's figures with the report's captions. Everything is inline (no script, style or image from
elsewhere), every text from the data is escaped, and the output is a function of its inputs only, so a
committed page regenerates byte-identically.
"""
from __future__ import annotations

import base64
import contextlib
import html
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import List, NamedTuple, Optional

import pandas as pd
from matplotlib.colors import to_hex

from bench.figures import palette
from bench.leaderboard import (DICE_COLUMN, HEADER, LEADER, REFERENCE_ROW, WORSE, legend, shots_note,
                               shown_columns)

CI_BAR = "95% CI bar"
_BAR_W, _BAR_H = 160, 14
# A cell sorts as a number when it starts with one ("0.812 [0.790, 0.834]", "12,345", "5 x 10").
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?=\s|$)")
_MISSING = {"", "-", "n/a", "—"}  # "—": not evaluated (bench.evaluation.summary)
_IMAGE = re.compile(r"^!\[(?P<caption>[^\]]*)\]\((?P<path>[^)]+\.png)\)\s*$")


class Figure(NamedTuple):
    path: Path
    caption: str
    shots: Optional[int]  # the shots tab it belongs to; None: the whole dataset


def report_figures(report_dir, dataset: str) -> List[Figure]:
    """The figures of ``dataset`` in a ``bench report`` directory, in the report's order with its
    captions (the image lines of ``report.md``); per-shots figures are tagged with their shots."""
    report = Path(report_dir) / "report.md"
    if not report.is_file():
        raise FileNotFoundError(f"{report} not found: pass the directory `bench report --out` wrote")
    figures = []
    for line in report.read_text().splitlines():
        m = _IMAGE.match(line)
        if not m:
            continue
        path = Path(report_dir) / m["path"]
        if not path.name.startswith(f"{dataset}_"):
            continue
        if not path.is_file():
            raise FileNotFoundError(f"{path}, named in {report}, is missing: regenerate the report")
        shots = re.match(rf"{re.escape(dataset)}_(\d+)shot_", path.name)
        figures.append(Figure(path, m["caption"], int(shots[1]) if shots else None))
    return figures


def check_report(report_dir, table: pd.DataFrame, dataset: str) -> None:
    """Refuse a report made from other results than ``table``: its per-shots summaries
    (``tables/<dataset>_<shots>shot_summary.csv``) must list the same methods with the same mean Dice."""
    report_dir = Path(report_dir)
    fix = (f"regenerate it (bench report --results <the snapshot> --out {report_dir}) or point --reports "
           "elsewhere")
    for shots, t in table.groupby("shots", sort=True):
        summary = report_dir / "tables" / f"{dataset}_{shots}shot_summary.csv"
        if not summary.is_file():
            raise ValueError(f"{report_dir} has no {summary.name}: it was not made from these results; {fix}")
        mean = pd.read_csv(summary).set_index("method")["mean"]
        ours = t.set_index("method").dice_mean
        if sorted(mean.index) != sorted(ours.index) or not all(
                math.isclose(mean[m], ours[m], rel_tol=1e-4, abs_tol=1e-6) for m in ours.index):
            raise ValueError(f"{summary} disagrees with the leaderboard's {shots}-shot mean Dice: the report "
                             f"was made from other results; {fix}")


def write_page(table: pd.DataFrame, dataset: str, caption: List[str], figures: List[Figure], path) -> Path:
    """Write the page for ``table`` (``leaderboard_table``'s rows of ``dataset``) to ``path``; ``dataset`` is
    the page's title (``bench.leaderboard.boards``: the dataset, with its foundation where it has several)."""
    path = Path(path)
    path.write_text(render_page(table, dataset, caption, figures))
    return path


def render_page(table: pd.DataFrame, dataset: str, caption: List[str], figures: List[Figure]) -> str:
    colours = {m: to_hex(c) for m, c in palette(list(table.method.unique())).items()}
    scale = _scale(table)
    groups = list(table.groupby("shots", sort=True))
    tabs = "".join(
        f'<button type="button" role="tab" class="tab" id="tab-{s}" data-shots="{s}" aria-controls="panel-{s}" '
        f'aria-selected="{"true" if i == 0 else "false"}">{s}-shot</button>' for i, (s, _) in enumerate(groups))
    panels = "\n".join(_panel(int(s), t, colours, scale, [f for f in figures if f.shots == s]) for s, t in groups)
    whole = [f for f in figures if f.shots is None]
    title = f"Leaderboard: {dataset}"
    return _PAGE.format(
        title=_esc(title), style=_STYLE, script=_SCRIPT, header=_inline(HEADER),
        caption="\n".join(f"<li>{_inline(line)}</li>" for line in caption),
        legend=_inline(legend(table)), tabs=tabs, panels=panels,
        figures="\n".join(_figure(f) for f in whole))


def _panel(shots: int, t: pd.DataFrame, colours, scale, figures: List[Figure]) -> str:
    shown = shown_columns(t)
    at = list(shown.columns).index(DICE_COLUMN) + 1 if DICE_COLUMN in shown.columns else len(shown.columns)
    names = list(shown.columns[:at]) + [CI_BAR] + list(shown.columns[at:])
    lo, hi = scale
    head = "".join(f'<th scope="col" tabindex="0" aria-sort="none">{_esc(n)}'
                   + (f' <span class="scale">({lo:g}&ndash;{hi:g})</span>' if n == CI_BAR else "") + "</th>"
                   for n in names)
    rows = []
    for (_, raw), cells in zip(t.iterrows(), shown.itertuples(index=False)):
        # Dice and its bar sort by the unrounded mean (the rank's order), other cells by the number they show
        mean = _sort_attr(raw.dice_mean)
        tds = [f"<td{mean}>{_esc(v)}</td>" if n == DICE_COLUMN else _cell(str(v)) for n, v in zip(shown.columns, cells)]
        tds.insert(at, f'<td class="bar"{mean}>{_bar(raw, colours, scale)}</td>')
        kind = {LEADER: "leader", WORSE: "worse", REFERENCE_ROW: "reference"}.get(raw.marker, "")
        rows.append(f'<tr data-method="{_esc(raw.method)}" class="{kind}">{"".join(tds)}</tr>')
    note = shots_note(t)
    return (f'<section class="panel" role="tabpanel" id="panel-{shots}" aria-labelledby="tab-{shots}" '
            f'data-shots="{shots}">\n<h2>{shots}-shot</h2>\n'
            + (f'<p class="note">{_inline(note)}</p>\n' if note else "")
            + f'<div class="scroll"><table class="board">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows)
            + "\n</tbody>\n</table></div>\n" + "\n".join(_figure(f) for f in figures) + "\n</section>")


def _cell(text: str) -> str:
    """A cell with the number it sorts by, if it shows one; missing values carry data-missing."""
    if text.strip() in _MISSING:
        return f'<td data-missing="1">{_esc(text)}</td>'
    m = _NUMBER.match(text.strip())
    return f"<td{_sort_attr(float(m[0].replace(',', ''))) if m else ''}>{_esc(text)}</td>"


def _sort_attr(value: float) -> str:
    return f' data-sort="{float(value)!r}"' if math.isfinite(value) else ' data-missing="1"'


def _scale(table: pd.DataFrame):
    """One Dice axis for every tab (whole tenths around every interval), so bars compare across shots."""
    lo, hi = table.dice_lo.min(), table.dice_hi.max()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0
    lo, hi = max(0.0, math.floor(lo * 10) / 10), min(1.0, math.ceil(hi * 10) / 10)
    return (lo, hi) if hi > lo else (0.0, 1.0)


def _bar(r, colours, scale) -> str:
    lo, hi = scale

    def x(v: float) -> str:
        return f"{2 + (_BAR_W - 4) * (min(max(v, lo), hi) - lo) / (hi - lo):.1f}"

    text = f"{r.method}: mean Dice {r.dice_mean:.3f}, 95% CI [{r.dice_lo:.3f}, {r.dice_hi:.3f}]"
    if not all(math.isfinite(v) for v in (r.dice_mean, r.dice_lo, r.dice_hi)):
        return f'<svg width="{_BAR_W}" height="{_BAR_H}" role="img"><title>{_esc(text)}</title></svg>'
    reference = r.marker == REFERENCE_ROW
    colour = "#808080" if reference else colours[r.method]
    mid = _BAR_H // 2
    return (f'<svg width="{_BAR_W}" height="{_BAR_H}" role="img" aria-label="{_esc(text)}"><title>{_esc(text)}</title>'
            f'<line x1="2" x2="{_BAR_W - 2}" y1="{mid}" y2="{mid}" stroke="#e3e3e3"/>'
            f'<line x1="{x(r.dice_lo)}" x2="{x(r.dice_hi)}" y1="{mid}" y2="{mid}" stroke="{colour}" stroke-width="3"/>'
            f'<circle cx="{x(r.dice_mean)}" cy="{mid}" r="4" stroke="{colour}" stroke-width="1.5" '
            f'fill="{"#ffffff" if reference else colour}"/></svg>')


def _figure(f: Figure) -> str:
    data = base64.b64encode(Path(f.path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_esc(f.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(f.caption)}</figcaption></figure>")


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    """Escaped text with Markdown's `inline code` as <code> (the captions and legend are Markdown)."""
    parts = _esc(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium chromium-driver
# No network: without these Chromium tries to reach update, sync and QUIC services.
_CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


@contextlib.contextmanager
def headless_chromium(width: int = 1400, height: int = 900):
    """A Selenium driver for the system's headless Chromium with a fresh profile, quit on exit. Needs the
    ``test`` extra (selenium) and Debian's ``chromium chromium-driver``; never downloads a browser."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise ImportError("selenium is not installed: pip install -e '.[test]'") from e
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    profile = tempfile.mkdtemp(prefix="lnbench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*_CHROMIUM_ARGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(page, png, width: int = 1400, height: int = 1000) -> Path:
    """Save what a ``width`` x ``height`` window shows of ``page`` (the top: caption, tabs and table)."""
    with headless_chromium(width, height) as driver:
        driver.get(Path(page).resolve().as_uri())
        driver.save_screenshot(str(png))
    return Path(png)


_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
<p>{header}</p>
<ul class="caption">
{caption}
</ul>
<div class="tabs" role="tablist">{tabs}</div>
{panels}
<h2>How to read the table</h2>
<p class="legend">{legend}</p>
<h2>Figures</h2>
{figures}
<script>{script}</script>
</body>
</html>
"""

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; }
code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
ul.caption { padding-left: 1.2em; }
.tabs { margin: 1em 0 .5em; }
.tab { font: inherit; padding: .35em 1em; border: 1px solid #bbb; background: #f6f6f6; cursor: pointer; }
.tab[aria-selected="true"] { background: #fff; border-bottom-color: #fff; font-weight: 600; }
.js .panel:not(.active), .js .panel h2 { display: none; }
table.board { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.board th, table.board td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: left;
  white-space: nowrap; }
table.board th { cursor: pointer; user-select: none; background: #fafafa; }
.scroll { overflow-x: auto; }
table.board th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.board th[aria-sort="descending"]::after { content: " \\25BC"; }
tr.leader td { font-weight: 600; }
tr.reference td { color: #777; font-style: italic; }
td.bar { padding: 0 .6em; }
.scale { font-weight: normal; color: #777; }
.legend, .note { max-width: 75em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; }
figcaption { color: #555; }
"""

# Sorting: numbers (data-sort) as numbers, other cells as text; missing cells last in both directions;
# ties keep their current order. Tabs: one panel shown at a time once the script runs.
_SCRIPT = """
document.documentElement.classList.add("js");
function show(shots) {
  document.querySelectorAll(".tab").forEach(function (t) {
    t.setAttribute("aria-selected", String(t.dataset.shots === shots)); });
  document.querySelectorAll(".panel").forEach(function (p) {
    p.classList.toggle("active", p.dataset.shots === shots); });
}
function sortBy(th) {
  var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
  table.querySelectorAll("th").forEach(function (h) { h.setAttribute("aria-sort", "none"); });
  th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
  var rows = Array.prototype.slice.call(body.rows);
  var numeric = rows.every(function (r) {
    var c = r.cells[col]; return c.dataset.missing || c.dataset.sort !== undefined; });
  var keyed = rows.map(function (r, i) {
    var c = r.cells[col];
    return {row: r, i: i, missing: !!c.dataset.missing,
            key: numeric ? parseFloat(c.dataset.sort) : c.textContent.trim()}; });
  keyed.sort(function (a, b) {
    if (a.missing !== b.missing) return a.missing ? 1 : -1;
    var d = a.missing ? 0 : (numeric ? a.key - b.key : a.key.localeCompare(b.key));
    return d !== 0 ? dir * d : a.i - b.i; });
  keyed.forEach(function (k) { body.appendChild(k.row); });
}
document.querySelectorAll(".tab").forEach(function (t) {
  t.addEventListener("click", function () { show(t.dataset.shots); }); });
document.querySelectorAll("table.board th").forEach(function (th) {
  th.addEventListener("click", function () { sortBy(th); });
  th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortBy(th); }); });
var first = document.querySelector(".tab");
if (first) show(first.dataset.shots);
"""
