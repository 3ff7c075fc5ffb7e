"""Progress: bounded plain lines off a terminal, live rich bars on one, nothing with --quiet; tuning
trials and sweep cells report through it. A real training run's progress lines: tests/test_run_e2e.py."""
import io
import re
import sys

import optuna
import pytest

from bench import progress
from bench.cli import main


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(progress, "clock", c)
    return c


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's width for a fake terminal: room for every column


def run_task(clock, total, seconds_per_unit):
    with progress.task("training", total=total) as bar:
        for i in range(total):
            clock.now += seconds_per_unit
            bar.advance(loss=1.0 / (i + 1))


def test_plain_lines_are_bounded_and_carry_counts_rate_and_eta(clock, capsys):
    run_task(clock, total=1000, seconds_per_unit=0.1)   # 100 s: one line per 10%, then the final one
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 10
    assert lines[0] == "training: 100/1000 it (10%)  loss 0.01  10.0 it/s  ETA 1:30"
    assert lines[4].startswith("training: 500/1000 it (50%)") and lines[4].endswith("ETA 0:50")
    assert lines[-1] == "training: 1000/1000 it (100%)  loss 0.001  10.0 it/s  took 1:40"


def test_plain_heartbeat_while_slow_and_final_line_only_when_fast(clock, capsys):
    run_task(clock, total=1000, seconds_per_unit=10.0)   # 0.1% per unit: a line per HEARTBEAT_S
    lines = capsys.readouterr().err.splitlines()
    assert 1000 * 10 / progress.HEARTBEAT_S - 5 <= len(lines) - 1 <= 1000 * 10 / progress.HEARTBEAT_S
    assert lines[0].startswith("training: 6/1000 it (1%)") and "10.0 s/it  ETA 2:45:40" in lines[0]

    run_task(clock, total=30, seconds_per_unit=0.01)     # done within MIN_INTERVAL_S: one line
    assert capsys.readouterr().err.splitlines() == ["training: 30/30 it (100%)  loss 0.0333  100.0 it/s  took 0:00"]


def test_stopped_task_says_so(clock, capsys):
    with pytest.raises(KeyboardInterrupt):
        with progress.task("predicting", total=30, unit="case") as bar:
            clock.now += 12
            bar.advance(2)   # under 10%: no line until the end
            raise KeyboardInterrupt
    assert capsys.readouterr().err == "predicting: 2/30 case (7%)  6.0 s/case  stopped after 0:12\n"


def final_screen(text):
    """What a terminal shows after ``text``: lines, with rich's carriage returns, line erases and
    cursor-up moves applied and colours dropped."""
    lines, row = [""], 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", text):
        if token == "\n":
            row += 1
            lines += [""] * (row + 1 - len(lines))
        elif token in ("\r", "\x1b[2K"):
            lines[row] = "" if token == "\x1b[2K" else lines[row]
        elif token == "\x1b[1A":
            row -= 1
        elif not token.startswith("\x1b"):
            lines[row] += token
    return [line.rstrip() for line in lines if line.strip()]


def test_live_bars_on_a_terminal_with_the_suites_lines_above(capsys):
    term = sys.stdout
    screen = FakeTerminal()
    with progress.settings(live=True, stream=screen):
        with progress.task("training", total=4) as bar:
            for i in range(4):
                print(f"a line of the suite's own {i}")
                bar.advance(loss=0.5)
                with progress.task("inner", total=2) as inner:   # a second bar while the first is open
                    inner.advance(2)
    assert sys.stdout is term                       # rich's stdout redirection is undone
    text = screen.getvalue()
    assert "\x1b[" in text and "━" in text          # a rendered, redrawn rich bar
    shown = final_screen(text)
    assert shown[:4] == [f"a line of the suite's own {i}" for i in range(4)]
    assert len(shown) == 5 and re.match(r"training ━+ 4/4 it  loss 0.5  [\d.]+ it/s +0:00:0\d$", shown[4])
    assert capsys.readouterr().err == ""            # nothing went to the real stderr


def test_verbose_third_party_lines_scroll_above_live_bars(monkeypatch):
    from bench.quiet import LOGGER, quiet, show_third_party
    monkeypatch.setattr(LOGGER, "handlers", [])
    monkeypatch.setattr(LOGGER, "level", LOGGER.level)
    show_third_party()
    screen = FakeTerminal()
    with progress.settings(live=True, stream=screen), progress.task("predicting", total=1, unit="case") as bar:
        with quiet():
            print("Using device: cpu")
        bar.advance()
    assert "nnU-Net: Using device: cpu\n" in screen.getvalue()   # through the display, not past it


def test_terminal_detection(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", FakeTerminal())
    with progress.settings(stream=FakeTerminal()):
        assert progress._live_wanted()
    assert not progress._live_wanted()                # pytest's captured stderr is no terminal


def test_quiet_prints_nothing_and_the_flag_reaches_progress(clock, capsys, monkeypatch):
    import bench.commands.methods as methods_command

    def command(args):
        print("result line")
        run_task(clock, total=100, seconds_per_unit=1.0)
        return 0
    monkeypatch.setattr(methods_command, "main", command)  # the parser binds it when main() builds it
    for argv in (["-q", "methods"], ["methods", "--quiet"]):
        assert main(argv) == 0
        assert capsys.readouterr() == ("result line\n", "")
    assert main(["methods"]) == 0
    out, err = capsys.readouterr()
    assert out == "result line\n" and "training: 100/100 it (100%)" in err
    with progress.settings(quiet=True, live=True, stream=FakeTerminal()):
        run_task(clock, total=5, seconds_per_unit=1.0)
    assert progress._Live.progress is None           # no live display started either


def test_nested_tasks_of_a_hiding_task_are_silent_off_a_terminal(clock, capsys):
    with progress.task("tuning", total=1, unit="trial", plain=False, hide_nested=True) as outer:
        run_task(clock, total=10, seconds_per_unit=10.0)
        outer.advance()
    assert capsys.readouterr().err == ""


def test_trials_callback_counts_states_and_best(capsys):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        if trial.number == 1:
            raise optuna.TrialPruned()
        if trial.number == 2:
            raise RuntimeError("boom")
        return 0.1 * trial.number
    screen = FakeTerminal()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with progress.settings(live=True, stream=screen):
        with progress.trials(5) as on_trial:
            study.optimize(objective, n_trials=5, callbacks=[on_trial], catch=(RuntimeError,))
    assert re.search(r"5/5 trial\s+complete 3\s+pruned 1\s+failed 1\s+best 0.4", screen.getvalue())


def test_sweep_cells_eta_from_measured_cell_times(clock):
    with progress.cells(total=5, workers=2, estimate_seconds=600) as cells:
        bar = progress._open[-1]
        assert bar.remaining_seconds == 300           # the sweep's estimate until a cell ends
        assert cells.finished(10.0) == "1/5 done, 2 running, 0 failed, ETA 0.3 min"   # 4 x 10 s / 2
        assert cells.finished(50.0, failed=True) == "2/5 done, 2 running, 1 failed, ETA 0.8 min"  # 3 x 30 / 2
        clock.now += 20
        assert bar.remaining_seconds == 25            # counts down between cells
        assert bar.fields == {"running": 2, "failed": 1}
