"""Progress of the long steps (foundation build, preprocessing, training, prediction, tuning trials,
sweep cells), on stderr so stdout keeps the results.

On a terminal (stdout and stderr both TTYs) tasks are live ``rich`` bars; the suite's own printed lines
scroll above them. Elsewhere (CI logs, pipes, pytest capture) each task writes plain lines, rate-limited:
one when at least ``EVERY_PERCENT`` more is done, at most one per ``MIN_INTERVAL_S``, a heartbeat every
``HEARTBEAT_S`` while it advances slowly, and always one when it ends; never a carriage return.
``bench --quiet`` (``settings(quiet=True)``) silences all of it; a sweep worker sends it to its cell log
(``to_file``).

Call sites hold one line::

    with progress.task("training", total=60) as bar:   # bar.advance(loss=0.41) per iteration
    for cid in progress.track(case_ids, "predicting", unit="case"):
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, TextIO

EVERY_PERCENT = 10      # plain mode: a line per this much progress ...
MIN_INTERVAL_S = 5.0    # ... but not more often than this (a task done sooner prints its final line only)
HEARTBEAT_S = 60.0      # ... and at least this often while it advances

clock: Callable[[], float] = time.monotonic  # replaced by tests


@dataclass(frozen=True)
class _Settings:
    quiet: bool = False
    live: Optional[bool] = None       # None: live bars when stdout and stderr are terminals
    stream: Optional[TextIO] = None   # None: sys.stderr at the time of writing


_settings = _Settings()
_open: List["Task"] = []              # open tasks, innermost last


@contextlib.contextmanager
def settings(**changes):
    """Inside: progress with ``changes`` (quiet, live, stream) applied; restored afterwards."""
    global _settings
    previous, _settings = _settings, replace(_settings, **changes)
    try:
        yield
    finally:
        _settings = previous


def to_file(stream: TextIO):
    """Plain progress lines into ``stream`` (a sweep worker's cell log), whatever the terminal."""
    return settings(live=False, stream=stream, quiet=False)


def format_seconds(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class Task:
    """One task's counts and fields; its sink (plain lines, a live bar or nothing) shows them."""

    def __init__(self, description: str, total: Optional[int], unit: str = "it"):
        self.description, self.total, self.unit = description, total, unit
        self.completed = 0
        self.fields: Dict[str, Any] = {}
        self.started = clock()
        self.hide_nested = False
        self.sink: Optional[_Sink] = None
        self._eta: Optional[tuple] = None   # (seconds left, when said): the caller's own estimate

    # --- what call sites use ---------------------------------------------------------
    def advance(self, n: int = 1, **fields) -> None:
        self.update(completed=self.completed + n, **fields)

    def update(self, completed: Optional[int] = None, total: Optional[int] = None,
               eta: Optional[float] = None, **fields) -> None:
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if eta is not None:
            self._eta = (eta, clock())
        self.fields.update(fields)
        if self.sink:
            self.sink.show(self, final=False)

    # --- numbers ---------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return clock() - self.started

    @property
    def rate(self) -> Optional[float]:
        """Units per second, the mean since the task started."""
        return self.completed / self.elapsed if self.completed and self.elapsed > 0 else None

    @property
    def remaining_seconds(self) -> Optional[float]:
        if self._eta is not None:
            left, said = self._eta
            return max(0.0, left - (clock() - said))
        if self.total is None or not self.rate:
            return None
        return max(0, self.total - self.completed) / self.rate

    @property
    def done(self) -> bool:
        return self.total is not None and self.completed >= self.total

    def status(self, final: bool = False, percent: bool = False, timing: bool = True) -> str:
        """'30/60 it (50%)  loss 0.412  2.1 it/s  ETA 0:14': counts, fields, rate and, with ``timing``,
        the time left (or, ``final``, the time taken)."""
        count = f"{self.completed}/{self.total if self.total is not None else '?'} {self.unit}"
        if percent and self.total:
            count += f" ({100 * self.completed / self.total:.0f}%)"
        parts = [count] + [f"{k.replace('_', ' ')} {_format_value(v)}" for k, v in list(self.fields.items())
                           if v is not None]  # list(): a live display renders from its own thread
        rate = self.rate
        if rate:
            parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{self.unit}")
        left = self.remaining_seconds
        if timing and final:
            parts.append(f"{'took' if self.done else 'stopped after'} {format_seconds(self.elapsed)}")
        elif timing and left is not None and math.isfinite(left):
            parts.append(f"ETA {format_seconds(left)}")
        return "  ".join(parts)


class _Sink:
    def show(self, task: Task, final: bool) -> None:
        raise NotImplementedError

    def close(self, task: Task) -> None:
        self.show(task, final=True)


class _Plain(_Sink):
    """Rate-limited whole lines: 'training: 30/60 it (50%)  loss 0.412  2.1 it/s  ETA 0:14'."""

    def __init__(self, stream: Optional[TextIO]):
        self.stream = stream
        self.last_time = clock()
        self.last_completed = 0

    def show(self, task: Task, final: bool) -> None:
        now = clock()
        since = now - self.last_time
        if not final:
            if task.done or task.completed == self.last_completed or since < MIN_INTERVAL_S:
                return
            step = (task.total or 0) * EVERY_PERCENT / 100
            if not (step and task.completed - self.last_completed >= step) and since < HEARTBEAT_S:
                return
        self.last_time, self.last_completed = now, task.completed
        stream = self.stream or sys.stderr
        if stream is sys.stderr:
            sys.stdout.flush()  # the suite's own lines first: both often end in the same log
        stream.write(f"{task.description}: {task.status(final=final, percent=True)}\n")
        stream.flush()


class _Live(_Sink):
    """A bar in the one ``rich`` display shared by all open tasks; ``transient`` bars vanish when done."""
    progress = None     # the rich Progress while any live task is open
    users = 0

    def __init__(self, task: Task, stream: Optional[TextIO], force_terminal: bool, transient: bool):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class Status(ProgressColumn):
            """Our status, rendered at each refresh: the ETA counts down between updates."""
            def render(self, rich_task):
                ours = rich_task.fields["task"]
                return Text(ours.status(timing=not rich_task.fields["final"]))  # final: the elapsed column

        if _Live.progress is None:
            console = Console(file=stream or sys.stderr, force_terminal=True if force_terminal else None)
            _Live.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), Status(),
                                      TimeElapsedColumn(), console=console)
            _Live.progress.start()
        _Live.users += 1
        self.transient = transient
        self.id = _Live.progress.add_task(task.description, total=task.total, task=task, final=False)

    def show(self, task: Task, final: bool) -> None:
        _Live.progress.update(self.id, completed=task.completed, total=task.total, final=final)

    def close(self, task: Task) -> None:
        self.show(task, final=True)
        if self.transient:
            _Live.progress.remove_task(self.id)
        _Live.users -= 1
        if _Live.users == 0:
            _Live.progress.stop()
            _Live.progress = None


def _live_wanted() -> bool:
    if _settings.live is not None:
        return _settings.live
    streams = (sys.stdout, _settings.stream or sys.stderr)
    return all(getattr(s, "isatty", lambda: False)() for s in streams)


@contextlib.contextmanager
def task(description: str, total: Optional[int], unit: str = "it", *, plain: bool = True,
         hide_nested: bool = False) -> Iterator[Task]:
    """A progress task for the ``with`` block. ``plain=False``: no plain lines (the caller already logs
    a line per unit); ``hide_nested``: tasks opened inside print no plain lines (a tuning study's
    per-trial training). A live bar opened inside another vanishes when done: the outer one sums it up."""
    t = Task(description, total, unit)
    hidden = any(o.hide_nested for o in _open)
    t.hide_nested = hide_nested or hidden
    if not _settings.quiet:
        if _live_wanted():
            t.sink = _Live(t, _settings.stream, force_terminal=_settings.live is True, transient=bool(_open))
        elif plain and not hidden:
            t.sink = _Plain(_settings.stream)
    _open.append(t)
    try:
        yield t
    finally:
        _open.remove(t)
        if t.sink:
            t.sink.close(t)


def track(items: Iterable, description: str, unit: str = "case", total: Optional[int] = None) -> Iterator:
    """``for x in track(items, "predicting"):`` one unit per item."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with task(description, total if total is not None else len(items), unit) as t:
        for item in items:
            yield item
            t.advance()


class Cells:
    """A sweep's cells: done / running / failed, and an ETA from the measured cell times
    (before the first cell ends: the sweep's own estimate)."""

    def __init__(self, bar: Task, workers: int, estimate_seconds: float):
        self.bar, self.workers = bar, max(1, workers)
        self.seconds: List[float] = []
        self.failed = 0
        bar.update(eta=estimate_seconds / self.workers, running=min(self.workers, bar.total), failed=0)

    def finished(self, seconds: float, failed: bool = False) -> str:
        """Record one finished cell; returns '3/10 done, 2 running, 0 failed, ETA 4.1 min'."""
        self.seconds.append(seconds)
        self.failed += bool(failed)
        left = self.bar.total - len(self.seconds)
        eta = left * (sum(self.seconds) / len(self.seconds)) / self.workers
        running = min(self.workers, left)
        self.bar.update(completed=len(self.seconds), eta=eta, running=running, failed=self.failed)
        return f"{len(self.seconds)}/{self.bar.total} done, {running} running, {self.failed} failed, " \
               f"ETA {eta / 60:.1f} min"


@contextlib.contextmanager
def cells(total: int, workers: int, estimate_seconds: float) -> Iterator[Cells]:
    """The sweep's bar (the sweep logs a line per finished cell, so no plain lines of its own)."""
    with task("sweep", total, "cell", plain=False) as bar:
        yield Cells(bar, workers, estimate_seconds)


@contextlib.contextmanager
def trials(total: int, hide_nested: bool = True) -> Iterator[Callable]:
    """The tuning study's bar; yields an Optuna callback (``study.optimize(callbacks=[...])``) that counts
    complete / pruned / failed trials and shows the best value so far. The tuner logs a line per trial,
    so no plain lines of its own; the trials' own training is hidden unless ``hide_nested=False``."""
    with task("tuning", total, "trial", plain=False, hide_nested=hide_nested) as bar:
        counts = {"complete": 0, "pruned": 0, "failed": 0}

        def on_trial(study, trial) -> None:
            from optuna.trial import TrialState
            key = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state, "failed")
            counts[key] += 1
            values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                      if t.value is not None and math.isfinite(t.value)]
            bar.advance(**counts, best=max(values) if values else None)
        yield on_trial
