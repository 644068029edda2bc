"""The life of a run's processes: children that die with it (even when it is SIGKILLed), and
SIGTERM turned into an exception so that a stopped run unwinds through its cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

_stop_signal: int | None = None

# Run in a fresh interpreter between fork and the real command: sets the parent-death signal,
# exits if the parent is already gone, then becomes the command (the setting survives exec).
# A preexec_fn could do the same but is unsafe in a process with threads, as a flow run has.
_TIE = (
    "import ctypes, os, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def tied(cmd: list[str]) -> list[str]:
    """``cmd`` wrapped so that it is killed when this process dies, SIGKILL included.

    The command's first element must be an executable path (``sys.executable`` for Python)."""
    return [sys.executable, "-c", _TIE, str(os.getpid()), *cmd]


class Stopped(KeyboardInterrupt):
    """The run was asked to stop by a signal (SIGTERM from `timeout`, systemd or a scheduler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_requested() -> int | None:
    """The signal that asked this process to stop, if one did (whatever exception it became on
    the way up: Prefect's engines may wrap it)."""
    return _stop_signal


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Stopped`` in the main thread, as Ctrl-C raises
    KeyboardInterrupt, so the run unwinds through its cleanup instead of vanishing."""

    def handler(signum, _frame):
        global _stop_signal
        _stop_signal = signum
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Within the block a first SIGTERM is only recorded (``stop_requested()``): the code polls
    it and stops where its state is whole (training: after a step, with a checkpoint of it).
    When the block ends, the handler in place before it (ours, or Prefect's while a flow runs)
    gets the signal, so the run stops as it would have. A second SIGTERM goes to it at once.
    Without a handler to defer to (SIGTERM's default action) or off the main thread, the
    block changes nothing."""
    received: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)

    def record(signum, frame):
        global _stop_signal
        _stop_signal = signum
        received.append(signum)
        if len(received) > 1:
            previous(signum, frame)

    deferring = callable(previous) and threading.current_thread() is threading.main_thread()
    if not deferring:
        yield
        return
    signal.signal(signal.SIGTERM, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            os.kill(os.getpid(), received[0])
