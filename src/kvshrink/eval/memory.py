"""Peak memory of a block of code: the process's resident set on the CPU, `torch.cuda` allocations on a GPU.

On Linux the CPU figure is the kernel's own high-water mark (`VmHWM` in /proc/self/status), reset on entry by
writing 5 to /proc/self/clear_refs: exact, whatever the block's allocations last. Where that reset is not allowed
(other systems, restricted containers) a thread samples the resident set every millisecond instead, which can miss
an allocation shorter than that; `exact` says which was used. Freed heap memory is handed back to the system
(`malloc_trim`) on entry so the base is what is really held.
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import threading
import time

import torch

_ACTIVE: list["PeakMemory"] = []  # nested blocks: a reset inside must not lose what the outer ones saw


def rss() -> int:
    """The process's resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def trim() -> None:
    """Collect garbage and return freed heap pages to the system (glibc), so RSS reflects what is held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """`peak`: the highest resident set (or CUDA allocation) while the block ran, in bytes; `base`: the level at
    entry; `growth` = peak - base."""

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.001):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.interval = interval
        self.peak = self.base = 0
        self.exact = True

    @property
    def growth(self) -> int:
        return self.peak - self.base

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = self.peak = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = rss()
        hwm = _hwm()
        for outer in _ACTIVE:  # what the outer blocks have seen so far survives the reset
            outer.peak = max(outer.peak, hwm or 0)
        self.exact = hwm is not None and _reset_hwm()
        self._thread = None
        if not self.exact:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            return
        _ACTIVE.remove(self)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss(), (_hwm() or 0) if self.exact else 0)
        for outer in _ACTIVE:
            outer.peak = max(outer.peak, self.peak)
