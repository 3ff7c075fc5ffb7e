"""bench.leaderboard_html: the self-contained leaderboard page, read as text and driven in headless Chromium.

The browser tests open the committed ``leaderboards/phantom.html`` and a page freshly generated from a
small synthetic results table; they skip (with the reason) only where no Chromium or chromedriver is
installed (`.ci/run` installs Debian's ``chromium chromium-driver`` when it can).
"""
import re
from pathlib import Path

import pandas as pd
import pytest

from bench.leaderboard import DICE_COLUMN, write_leaderboards
from bench.leaderboard_html import check_report, headless_chromium, report_figures
from bench.results import synthetic_results

ROOT = Path(__file__).resolve().parent.parent / "leaderboards"
COMMITTED = ROOT / "phantom.html"
N_BOOT = 200
# Names of very different lengths (synthetic trainable params = 1000 x (1 + len(name))): "17,000" sorts before
# "5,000" as text, after it as a number. One name is markup, to check it is escaped, not rendered.
HOSTILE = '<b class="x">bold</b> & "co"'
EFFECTS = {"dgst": 0.80, "lora": 0.62, "a-much-longer-name": 0.70, HOSTILE: 0.66, "oracle": 0.95}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A page from synthetic results at 1, 3 and 5 shots, with its leaderboard table."""
    df = synthetic_results(EFFECTS, shots=(1, 3, 5), repeats=3, cases=5)
    out = tmp_path_factory.mktemp("page")
    page = [p for p in write_leaderboards(df, out, n_boot=N_BOOT) if p.suffix == ".html"]
    assert [p.name for p in page] == ["phantom.html"]
    return page[0], pd.read_csv(page[0].with_suffix(".csv"))  # the table the page was made from


def _committed():
    if not COMMITTED.is_file():
        pytest.skip("no committed leaderboards/phantom.html")
    return COMMITTED, pd.read_csv(ROOT / "phantom.csv")


# --- as text -------------------------------------------------------------------------------------------

def _self_contained(text: str) -> None:
    refs = re.findall(r"""\b(?:src|href|action|srcset|poster)\s*=\s*["']?([^"'\s>]*)""", text, re.I)
    assert refs, "no src/href at all: the figures are missing"
    outside = [r for r in refs if not r.startswith(("data:image/png;base64,", "#"))]
    assert not outside, f"references outside the page: {outside[:3]}"
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|<link\b|<iframe\b|url\(", text, re.I)
    assert not re.search(r"<script[^>]*\bsrc\b", text, re.I)


def test_page_is_self_contained_and_escapes_method_names(fresh):
    page, table = fresh
    text = page.read_text()
    _self_contained(text)
    assert text.startswith("<!DOCTYPE html>") and text.count("<script>") == 1
    assert HOSTILE not in text and "<b class=" not in text
    escaped = "&lt;b class=&quot;x&quot;&gt;bold&lt;/b&gt; &amp; &quot;co&quot;"
    assert f'data-method="{escaped}"' in text and f"<td>{escaped}</td>" in text
    # the same caption lines and legend as the Markdown page, with `code` as <code>
    md = page.with_suffix(".md").read_text()
    assert "<li>Data: <code>phantom</code> is synthetic" in text and "- Data: `phantom` is synthetic" in md
    assert "<code>*</code>: significantly worse than the leader" in text
    assert text.count('<section class="panel"') == 3 and text.count("<tr data-method=") == len(table)
    assert text.count("<img ") == 1  # the leaderboard figure only: this output has no report beside it


def test_committed_page_is_self_contained_with_the_report_figures():
    page, table = _committed()
    text = page.read_text()
    _self_contained(text)
    figures = report_figures(ROOT / "phantom-report", "phantom")
    assert len(figures) >= 2 and {f.shots for f in figures} - {None} == set(table.shots)
    assert text.count("<img ") == 1 + len(figures)
    for f in figures:
        assert f"<figcaption>{f.caption}</figcaption>" in text


def test_a_report_from_other_results_is_refused(tmp_path):
    """The page embeds a report's figures only when the report's mean Dice per method and shots are the
    leaderboard's: a stale report would show other results beside the table."""
    _, table = _committed()
    check_report(ROOT / "phantom-report", table, "phantom")  # the committed pair agrees
    shifted = table.copy()
    shifted.loc[shifted.index[3], "dice_mean"] += 0.01
    with pytest.raises(ValueError, match="disagrees with the leaderboard's 1-shot mean Dice.*bench report"):
        check_report(ROOT / "phantom-report", shifted, "phantom")
    with pytest.raises(ValueError, match="disagrees"):
        check_report(ROOT / "phantom-report", table[table.method != "lora"], "phantom")
    # bench leaderboard checks a report it finds before writing that dataset's files
    (tmp_path / "phantom-report").mkdir()
    (tmp_path / "phantom-report" / "report.md").write_text("# lnbench statistics report\n")
    df = synthetic_results({"dgst": 0.8, "lora": 0.6}, shots=(1,), repeats=2, cases=4)
    with pytest.raises(ValueError, match="has no phantom_1shot_summary.csv: it was not made from these results"):
        write_leaderboards(df, tmp_path / "out", n_boot=N_BOOT, reports=tmp_path)
    assert not list((tmp_path / "out").iterdir())
    # ... except for freshly collected results (`bench leaderboard` without --from-snapshot): their report
    # comes next, so the page is written without its figures and the stale report is named
    told = []
    written = write_leaderboards(df, tmp_path / "out", n_boot=N_BOOT, reports=tmp_path, stale_report=told.append)
    page = next(p for p in written if p.suffix == ".html").read_text()
    assert len(told) == 1 and "it was not made from these results" in told[0] and "--from-snapshot" in told[0]
    assert page.count("data:image/png;base64,") == 1   # the leaderboard's own figure only



def test_bench_leaderboard_warns_on_collecting_and_refuses_from_the_snapshot(tmp_path, capsys):
    """The README's regeneration: collecting results writes pages without an outdated report's figures and
    says what to do; rendering the snapshot (the last step, after `bench report`) refuses the stale report."""
    from bench.cli import main
    from bench.results import write_snapshot
    (tmp_path / "phantom-report").mkdir()
    (tmp_path / "phantom-report" / "report.md").write_text("# lnbench statistics report\n")
    source = write_snapshot(synthetic_results({"dgst": 0.8, "lora": 0.6}, shots=(1,), repeats=2, cases=4),
                            tmp_path / "collected.csv")
    common = ["--snapshot", str(tmp_path / "results.csv"), "--out", str(tmp_path / "out"), "--reports", str(tmp_path)]
    assert main(["leaderboard", "--results", str(source), *common]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "phantom-report" in err and "--from-snapshot" in err
    assert (tmp_path / "out" / "phantom.html").is_file()
    assert main(["leaderboard", "--from-snapshot", *common]) == 2
    assert "it was not made from these results" in capsys.readouterr().err


def test_report_figures_name_a_missing_file(tmp_path):
    (tmp_path / "report.md").write_text("## phantom\n\n![Dice versus shots, phantom](figures/phantom_x.png)\n")
    with pytest.raises(FileNotFoundError, match="phantom_x.png.*regenerate the report"):
        report_figures(tmp_path, "phantom")
    with pytest.raises(FileNotFoundError, match="bench report --out"):
        report_figures(tmp_path / "nothing", "phantom")


# --- in a browser ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    try:
        with headless_chromium() as driver:
            yield driver
    except (FileNotFoundError, ImportError) as e:  # raised before the driver exists, never by a test
        pytest.skip(f"no browser to drive: {e}")


def _panel(driver, shots):
    return driver.find_element("id", f"panel-{shots}")


def _shown(driver):
    """Per panel (in page order): is it displayed?"""
    return driver.execute_script("return Array.from(document.querySelectorAll('.panel'))"
                                 ".map(function (p) { return getComputedStyle(p).display !== 'none'; });")


def _column(driver, shots, name):
    """Index of the column headed ``name`` (textContent: Selenium's .text is empty for cells scrolled
    out of view)."""
    heads = driver.execute_script(
        "return Array.from(document.querySelectorAll('#panel-' + arguments[0] + ' thead th'))"
        ".map(function (h) { return h.firstChild.textContent.trim(); });", shots)
    return heads.index(name)


def _header(driver, shots, name):
    return _panel(driver, shots).find_elements("css selector", "thead th")[_column(driver, shots, name)]


def _cells(driver, shots, col):
    return driver.execute_script(
        "var col = arguments[1];"
        "return Array.from(document.querySelectorAll('#panel-' + arguments[0] + ' tbody tr'))"
        ".map(function (r) { return [r.dataset.method, r.cells[col].textContent.trim()]; });", shots, col)


def _number(text):
    return float("inf") if text in ("n/a", "-") else float(text.split(" ")[0].replace(",", ""))


@pytest.mark.parametrize("which", ["committed", "fresh"])
def test_page_in_chromium(browser, fresh, which):
    page, table = _committed() if which == "committed" else fresh
    browser.get(page.resolve().as_uri())
    shots = sorted(int(s) for s in table.shots.unique())
    assert len(shots) >= 2

    # one tab per shots; only the first panel shows, and each tab shows its own
    tabs = browser.find_elements("css selector", ".tab")
    assert [t.text for t in tabs] == [f"{s}-shot" for s in shots]
    assert _shown(browser) == [True] + [False] * (len(shots) - 1)
    for tab, s in reversed(list(zip(tabs, shots))):
        tab.click()
        assert _shown(browser) == [x == s for x in shots]
        assert tab.get_attribute("aria-selected") == "true"

    for s in shots:
        t = table[table.shots == s]
        tabs[shots.index(s)].click()
        panel = _panel(browser, s)
        # every method row, best first as in the Markdown, each with a drawn CI bar
        rows = panel.find_elements("css selector", "tbody tr")
        assert [r.get_attribute("data-method") for r in rows] == list(t.method)
        assert len(panel.find_elements("css selector", "td.bar svg circle")) == len(t)
        # a numeric column sorts as numbers (text order would differ), ascending then descending
        col = _column(browser, s, "trainable params")
        before = [v for _, v in _cells(browser, s, col)]
        header = _header(browser, s, "trainable params")
        header.click()
        shown = [v for _, v in _cells(browser, s, col)]
        after = [_number(v) for v in shown]
        assert after == sorted(map(_number, before)) and header.get_attribute("aria-sort") == "ascending"
        if which == "fresh":
            assert shown != sorted(before)  # "17,000" < "5,000" as text: the sort did compare numbers
        header.click()
        known = sorted((v for v in after if v != float("inf")), reverse=True)
        assert [_number(v) for _, v in _cells(browser, s, col)] == known + [float("inf")] * (len(after) - len(known))
        # Dice sorts by its mean: ascending gives the reverse of the rank order (reference rows included)
        _header(browser, s, DICE_COLUMN).click()
        order = [m for m, _ in _cells(browser, s, 0)]
        assert order == list(t.sort_values("dice_mean", kind="stable").method) and order != list(t.method)
        # the CI bar column sorts by the same mean
        bar = _header(browser, s, "95% CI bar")
        bar.click()
        bar.click()
        assert [m for m, _ in _cells(browser, s, 0)] == list(t.sort_values("dice_mean", ascending=False,
                                                                             kind="stable").method)
        if which == "fresh":  # the escaped name shows as text, not as markup
            assert HOSTILE in [name for _, name in _cells(browser, s, _column(browser, s, "method"))]
            assert not panel.find_elements("css selector", "tbody b")

    # images are embedded and decode
    images = browser.execute_script(
        "return Array.from(document.images).map(function (i) {"
        "  return [i.getAttribute('src').slice(0, 22), i.complete && i.naturalWidth > 0]; });")
    assert images and all(src == "data:image/png;base64," and ok for src, ok in images)
