"""Third-party chatter (nnU-Net's prints such as "Using device: cpu", library warnings) goes to the
``bench.thirdparty`` logger at DEBUG instead of the terminal, so a run prints the suite's own lines;
``--verbose`` shows it (``show_third_party``). Inside ``quiet()`` every write to stdout is captured:
around library calls that call back into the suite's own printing (the training loop reports progress)
use ``quiet(stdout=False)``, which captures warnings only."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

LOGGER = logging.getLogger("bench.thirdparty")


class _LineLogger(io.TextIOBase):
    """A stdout stand-in that logs each complete line at DEBUG."""

    def __init__(self, source: str):
        self.source, self.buffer_ = source, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer_ += text
        *lines, self.buffer_ = self.buffer_.split("\n")
        for line in lines:
            if line.strip():
                LOGGER.debug("%s: %s", self.source, line)
        return len(text)

    def flush(self) -> None:
        if self.buffer_.strip():
            LOGGER.debug("%s: %s", self.source, self.buffer_)
        self.buffer_ = ""


@contextlib.contextmanager
def quiet(source: str = "nnU-Net", stdout: bool = True):
    """Inside: warnings (and stdout writes unless ``stdout=False``) are logged at DEBUG as '<source>: <line>'."""
    sink = _LineLogger(source)

    def log_warning(message, category, filename, lineno, file=None, line=None):
        LOGGER.debug("%s: %s: %s (%s:%s)", source, category.__name__, message, filename, lineno)

    with warnings.catch_warnings(), contextlib.redirect_stdout(sink) if stdout else contextlib.nullcontext():
        warnings.showwarning = log_warning
        try:
            yield
        finally:
            sink.flush()


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record: a live progress display (``bench.progress``)
    replaces it for the time it runs, so lines scroll above the bars."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def show_third_party(stream=None) -> None:
    """``--verbose``: print what ``quiet()`` captured (to stderr, apart from the suite's results)."""
    if not any(getattr(h, "_bench_verbose", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(stream) if stream else _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._bench_verbose = True
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG)
