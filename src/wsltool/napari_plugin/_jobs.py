"""Heavy work out of the viewer process: a spawned child process that reports through a queue.

The viewer process never imports torch: a job names its task as ``"module:function"`` and the child
imports it.  A crash in the child (even a segfault or the OOM killer) cannot take the viewer down; the
job then reports an ``error`` message with the exit code.  Cancelling sets a shared event that the
task polls between batches (the store or checkpoint stays resumable).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import multiprocessing as mp
import queue
import traceback
import weakref
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

Message = tuple[str, Any]

_LIVE: weakref.WeakSet[ProcessJob] = weakref.WeakSet()


@atexit.register
def _kill_live_jobs() -> None:
    """Terminate running jobs when the viewer exits.

    Job processes are not daemonic (a daemon could not start DataLoader workers), so without this
    ``multiprocessing`` would wait at exit for a training run to finish.
    """
    for job in list(_LIVE):
        job.kill()


def _child(task: str, kwargs: dict[str, Any], q: Any, cancel: Any) -> None:
    """Entry point of the child process."""
    mod_name, fn_name = task.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
        result = fn(emit=lambda kind, payload=None: q.put((kind, payload)), cancelled=cancel.is_set, **kwargs)
        q.put(("done", result))
    except Exception as exc:  # report every failure as one line, details in the log
        from wsltool.errors import WslError

        text = str(exc) if isinstance(exc, WslError) else f"{type(exc).__name__}: {exc}"
        q.put(("error", text.splitlines()[0] if text else type(exc).__name__))
        log.debug("task %s failed:\n%s", task, traceback.format_exc())


class ProcessJob:
    """Run ``task(emit=..., cancelled=..., **kwargs)`` in a spawned process.

    Parameters
    ----------
    task
        ``"package.module:function"``; the function reports with ``emit(kind, payload)`` and polls
        ``cancelled()``; its return value arrives as a ``("done", value)`` message.
    kwargs
        Picklable keyword arguments.
    """

    def __init__(self, task: str, **kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self.task = task
        self._q = ctx.Queue()
        self._cancel = ctx.Event()
        self._proc = ctx.Process(target=_child, args=(task, kwargs, self._q, self._cancel), daemon=False)
        self.finished = False

    def start(self) -> ProcessJob:
        """Start the child process."""
        self._proc.start()
        _LIVE.add(self)
        return self

    def cancel(self) -> None:
        """Ask the task to stop at its next check."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel.is_set()

    def poll(self) -> list[Message]:
        """Messages available now (non-blocking); adds an ``error`` if the child died without a word."""
        out: list[Message] = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                break
        if any(k in ("done", "error") for k, _ in out):
            self.finished = True
            self._proc.join(timeout=5)
        elif not self._proc.is_alive() and not self.finished:
            # a last look: the final message may have landed after the liveness check
            try:
                out.append(self._q.get(timeout=0.5))
                self.finished = out[-1][0] in ("done", "error")
            except queue.Empty:
                pass
            if not self.finished:
                self.finished = True
                out.append(("error", f"worker process died (exit code {self._proc.exitcode})"))
        return out

    def messages(self, timeout: float = 0.1) -> Iterator[Message]:
        """Blocking iterator over messages until the job finishes (for scripts and tests)."""
        while not self.finished:
            yield from self.poll()
            if not self.finished:
                try:
                    msg = self._q.get(timeout=timeout)
                except queue.Empty:
                    continue
                if msg[0] in ("done", "error"):
                    self.finished = True
                    self._proc.join(timeout=5)
                yield msg

    def kill(self) -> None:
        """Terminate the child process now."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self.finished = True
