"""Peak memory of a window of work, the same way for ``bench perf`` and for every run.

CUDA: the caching allocator's peak (``max_memory_allocated``) above the window's start.
CPU: the resident set's high-water mark (VmHWM, reset through ``/proc/self/clear_refs``)
above the resident set at the window's start, after ``gc`` + ``malloc_trim`` so memory freed
before the window is not reused unseen. tracemalloc does not see torch's allocations, and
``ru_maxrss`` is a process-lifetime peak: in a sweep worker that runs several cells it would
report the largest earlier cell. Where ``clear_refs`` is unavailable the meter says so (None).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
from typing import Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class MemoryMeter:
    """Peak bytes allocated inside a window; ``paused()`` excludes the harness's own bookkeeping."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.available = True
        self.peak = 0
        self.base = 0

    def _current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return (_proc_status_kib("VmRSS") or 0) * 1024

    def _high_water(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return (_proc_status_kib("VmHWM") or 0) * 1024

    def _reset(self) -> None:
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_rss_high_water():
            self.available = False

    def start(self) -> "MemoryMeter":
        release_freed_memory()
        self._reset()
        self.base, self.peak = self._current(), 0
        return self

    def _take(self) -> int:
        sync(self.device)
        self.peak = max(self.peak, self._high_water() - self.base)
        return self._current() - self.base

    @contextlib.contextmanager
    def paused(self):
        level = self._take()
        yield
        release_freed_memory()  # memory freed while paused must not be reused unseen afterwards
        self._reset()
        self.base = self._current() - level

    def stop(self) -> Optional[int]:
        self._take()
        return self.peak if self.available else None
