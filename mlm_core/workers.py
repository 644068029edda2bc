"""Worker processes that end with the process that started them, however it ended.

A process pool's workers (and the ``forkserver`` they fork from) wait on pipes that they
hold both ends of, so when the process that owns the pool is SIGKILLed they would wait
forever, one orphan per worker. ``exit_with`` is a pool initializer that ends the worker once
its owner is gone (Linux: checked against ``/proc``; elsewhere it does nothing), and ignores
SIGINT: Ctrl-C in a terminal reaches every process of the foreground group, and the owner,
not each worker, decides how the work stops (a worker dying of KeyboardInterrupt would print
its traceback and break the pool).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def _identity(pid: int) -> str | None:
    """The start time of a live process ``pid`` (tells it from a later one with the same pid);
    None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def exit_with(owner: int, interval: float = 0.5) -> None:
    """Pool initializer: a daemon thread ends this process when process ``owner`` is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = _identity(owner)
    if started is None:  # no /proc (not Linux), or the owner is already gone
        if not Path("/proc/self/stat").exists():
            return
        os._exit(1)

    def watch() -> None:
        while _identity(owner) == started:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="melos-exit-with-owner", daemon=True).start()
