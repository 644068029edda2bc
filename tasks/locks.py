"""File locks for runs that share a machine: the MLflow SQLite store and a run directory.

Both are ``fcntl.flock`` locks on a small file that stays in place. The kernel drops such a
lock when its holder dies, SIGKILL included, so a lock left by a killed process is free to
take at once; the file still names the dead holder (pid, host, MLflow run id), which lets
the next run say whom it took over from. Lock files are never deleted: unlinking one while
another process waits on it would let two processes hold "the" lock at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from mlm_core.errors import UserError
from mlm_core.io import exclusive

OnBusy = Literal["wait", "fail"]


class RunBusyError(UserError, RuntimeError):
    """Another live run holds the lock and the caller asked not to wait."""


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not yet written its name)"
    return f"process {holder.get('pid')} on {holder.get('host')} (MLflow run {holder.get('mlflow_run_id')})"


def _read_holder(fh) -> dict:
    fh.seek(0)
    try:
        holder = json.loads(fh.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def file_lock(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock on ``path`` (created if missing, kept) for the block, waiting for it."""
    return exclusive(path, remove=False)


class RunLock:
    """Ownership of one run directory by one live run.

    ``taken_over`` is the record of a holder that died without letting go (empty if the
    lock was free and clean), so the caller can mark that run's MLflow runs as killed.
    """

    def __init__(self, path: Path, fh, taken_over: dict) -> None:
        self.path, self._fh, self.taken_over = path, fh, taken_over
        # set when this run could not close its MLflow runs (tracking server away): the record
        # stays, so the next run takes over and marks them
        self.leave_record = False

    def release(self) -> None:
        if self._fh.closed:
            return
        if not self.leave_record:
            self._fh.seek(0)
            self._fh.truncate()  # a clean release leaves no holder behind to "take over"
            self._fh.flush()
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_run_lock(
    path: str | os.PathLike[str],
    mlflow_run_id: str,
    on_busy: OnBusy = "wait",
    log: Callable[[str], None] = print,
    poll_s: float = 0.5,
) -> RunLock:
    """Take the lock at ``path`` for the run ``mlflow_run_id``.

    While another live run holds it: ``on_busy="wait"`` logs once who holds it and waits;
    ``"fail"`` raises ``RunBusyError`` naming that run's process and MLflow run id.
    """
    if on_busy not in ("wait", "fail"):
        raise ValueError(f"on_busy must be 'wait' or 'fail', got {on_busy!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")
    try:
        waited_for: dict | None = None
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fh)
                if on_busy == "fail":
                    raise RunBusyError(
                        f"{path.with_suffix('')} is in use by {describe(holder)}, a run with the same settings; "
                        "wait for it to finish, or pass --on-busy wait to queue behind it"
                    ) from None
                if waited_for is None or (holder and holder != waited_for):
                    log(f"waiting: a run with the same settings is training in {path.with_suffix('')}, "
                        f"held by {describe(holder)}")
                    waited_for = holder
                time.sleep(poll_s)
        previous = _read_holder(fh)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "mlflow_run_id": mlflow_run_id,
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        fh.flush()
        os.fsync(fh.fileno())
    except BaseException:
        fh.close()
        raise
    if previous:
        log(f"took over the lock on {path.with_suffix('')} left by {describe(previous)}, which is no longer running")
    return RunLock(path, fh, previous)
