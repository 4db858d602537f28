"""Shared helpers for the benchmarks: peak RSS of a process tree, machine description, timing."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


def machine() -> str:
    """One line describing this machine."""
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:
        gpu = "no GPU"
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}"


class TreeRSS:
    """Samples the summed memory of this process and all its descendants (DataLoader workers...).

    Uses PSS (proportional set size) where the kernel reports it: forked workers share most pages with
    their parent, and summing plain RSS would count those pages once per process.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _mem(p: psutil.Process) -> int:
        try:
            return int(p.memory_full_info().pss)
        except (AttributeError, psutil.AccessDenied):
            return int(p.memory_info().rss)

    def _sample(self) -> int:
        me = psutil.Process()
        total = self._mem(me)
        for c in me.children(recursive=True):
            try:
                total += self._mem(c)
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


@contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the elapsed wall time in seconds."""
    out = [0.0]
    t0 = time.perf_counter()
    yield out
    out[0] = time.perf_counter() - t0
