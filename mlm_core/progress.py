"""Progress a person can watch: done / total, rate and ETA of a long stage.

On a terminal it is a ``rich`` progress bar; elsewhere (CI logs, a Prefect worker) one log
line every ``log_every_s`` seconds and at the end. Extra listeners (e.g. a Prefect
progress artifact) get ``(done, total)`` at most every ``notify_every_s`` seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

logger = logging.getLogger("melos")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Call with ``(done, total)`` as work completes; ``close()`` at the end."""

    def __init__(
        self,
        label: str,
        unit: str = "documents",
        *,
        listeners: tuple[Callable[[int, int], None], ...] = (),
        log: Callable[[str], None] | None = None,
        log_every_s: float = 10.0,
        notify_every_s: float = 2.0,
        tty: bool | None = None,
    ) -> None:
        self.label, self.unit = label, unit
        self.listeners = listeners
        self.log = log or logger.info
        self.log_every_s, self.notify_every_s = log_every_s, notify_every_s
        self.start = time.monotonic()
        self._last_log = self._last_notify = self._last_change = self.start
        self.done = self.total = 0
        self._bar = None
        if sys.stderr.isatty() if tty is None else tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=None, rate="")

    def line(self) -> str:
        """done/total, rate, elapsed and ETA. The ETA is given only while work is finishing: when
        nothing finished since the last change for a while (a slow download), the line says
        so instead of repeating an estimate that time has made stale."""
        now = time.monotonic()
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 0.0
        if self.total and self.done >= self.total:
            tail = "done"
        elif now - self._last_change >= self.log_every_s:
            tail = f"none finished in the last {_duration(now - self._last_change)}"
        elif rate > 0 and self.total:
            tail = f"ETA {_duration((self.total - self.done) / rate)}"
        else:
            tail = "ETA unknown"
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.1f} {self.unit}/s, "
            f"elapsed {_duration(elapsed)}, {tail}"
        )

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done != self.done:
            self._last_change = now
        self.done, self.total = done, total
        if self._bar is not None:
            elapsed = now - self.start
            self._bar.update(self._task, completed=done, total=total,
                             rate=f"{done / elapsed:.1f} {self.unit}/s" if elapsed > 0 else "")
        elif now - self._last_log >= self.log_every_s:
            self._last_log = now
            self.log(self.line())
        if self.listeners and (now - self._last_notify >= self.notify_every_s or done == total):
            self._last_notify = now
            for listener in self.listeners:
                listener(done, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self.log(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
