"""Giving freed memory back to the system.

glibc keeps freed heap and arena pages for reuse, so a process that once held a large transient allocation (an
image decode, a load, the tensors of a burst of requests) keeps that resident size although nothing uses it.
``trim_heap`` hands it back (glibc's ``malloc_trim(0)``; a no-op elsewhere). ``IdleTrimmer`` is the serving
engine's policy: trim when the engine goes idle after work, and while it stays busy at most once per
``busy_interval`` seconds, since one trim after a burst can take ~0.2 s (measured with ~2 GB freed; see
bench/HISTORY.md, the soak of 2026-12-03).
"""

from __future__ import annotations

import ctypes
import functools
import time


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> bool:
    """Return the C heap's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class IdleTrimmer:
    """Call ``after_step(idle)`` after each engine iteration; it trims on the step that leaves the engine idle,
    and while busy once ``busy_interval`` seconds have passed since the last trim (0 or None: never while busy)."""

    def __init__(self, busy_interval: float | None = 30.0, clock=time.monotonic, trim=trim_heap):
        self.busy_interval = busy_interval
        self.clock = clock
        self.trim = trim
        self.last = clock()
        self.worked = False  # work since the last trim
        self.trims = 0

    def after_step(self, idle: bool, worked: bool) -> None:
        self.worked = self.worked or worked
        now = self.clock()
        due = idle or (self.busy_interval and now - self.last >= self.busy_interval)
        if self.worked and due:
            self.trim()
            self.trims += 1
            self.last, self.worked = now, False
