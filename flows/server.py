"""Processes a `melos` command starts, tied to its life: the temporary Prefect server, torchrun.

Prefect's own temporary server is stopped by an ``atexit`` hook, which SIGTERM's default
action and SIGKILL never run, so each killed run left a ``uvicorn`` behind. Here Melos starts
that server itself, as a child that the kernel kills when Melos dies however it dies
(``PR_SET_PDEATHSIG`` on Linux), and points ``PREFECT_API_URL`` at it. SIGTERM is turned into
an exception (``tasks.children.Stopped``) so that every ``finally`` and ``except`` on the way
out runs: the MLflow runs are marked KILLED and the server is stopped.

The server runs in a session of its own: Ctrl-C in a terminal sends SIGINT to the whole
foreground process group, and a server in that group would die with Melos's first
keystroke, before Melos could mark its flow runs Crashed (they stayed "Running" for ever, and
every later call waited minutes on a dead API). Melos stops it itself, last. Its output goes
to ``<workdir>/logs/prefect-server.log``; if it dies during a run, a watchdog starts it again
on the same port and database (Prefect's client retries a lost connection meanwhile), and
when it cannot, stops the run as a signal would, naming the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mlm_core.errors import UserError
from tasks.children import tied

LOG_NAME = "prefect-server.log"
# Prefect's and MLflow's analytics, off unless the user turned them on: a run must not print
# "Failed to send telemetry" (no network), nor race the run for the SQLite database.
QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def quiet_defaults() -> None:
    """Set the analytics/telemetry variables a user has not set (before Prefect is imported)."""
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(port: int) -> list[str]:
    import prefect

    return [
        sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
        "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log", "--lifespan", "on",
        # its clients are gone or going when it is stopped: their open connections (the events
        # websocket) must not hold the shutdown for the 5 s before it is killed
        "--timeout-graceful-shutdown", "1",
    ]


class ServerLost(UserError, RuntimeError):
    """The temporary Prefect server did not start, or died and could not be started again; the
    message names its log, where the reason is."""


def _start(port: int, env: dict, timeout: float, log: Path) -> subprocess.Popen | None:
    """Start the server on ``port``; None if it exited at once (the port was taken meanwhile)."""
    import httpx

    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting the temporary Prefect server on "
                  f"127.0.0.1:{port} (pid of melos {os.getpid()})\n".encode())
        out.flush()
        # own session: a terminal's Ctrl-C (SIGINT to the foreground group) does not reach it
        proc = subprocess.Popen(tied(_server_command(port)), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    _stop(proc)
    raise ServerLost(f"the temporary Prefect server on 127.0.0.1:{port} did not answer within {timeout:.0f}s "
                     f"(its output: {log})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Watchdog(threading.Thread):
    """Starts the server again (same port, same database) when it dies during the run; after
    ``attempts`` failures, or when it cannot, stops the run with SIGTERM (its checkpoint is
    written at the next step) after saying why."""

    def __init__(self, proc: subprocess.Popen, port: int, env: dict, timeout: float, log: Path,
                 attempts: int = 3, grace_s: float = 20.0) -> None:
        super().__init__(name="melos-prefect-server-watchdog", daemon=True)
        self.grace_s = grace_s
        self.proc, self.port, self.env, self.timeout, self.log, self.attempts = proc, port, env, timeout, log, attempts
        self.stopping = threading.Event()
        self.lost: str | None = None

    def run(self) -> None:
        restarts = 0
        while not self.stopping.wait(0.5):
            if self.proc.poll() is None:
                continue
            if self.stopping.is_set():
                return
            rc = self.proc.returncode
            print(f"melos: the temporary Prefect server exited (code {rc}; its output: {self.log}); "
                  "starting it again", file=sys.stderr, flush=True)
            proc = None
            while proc is None and restarts < self.attempts and not self.stopping.is_set():
                restarts += 1
                with contextlib.suppress(ServerLost):
                    proc = _start(self.port, self.env, self.timeout, self.log)
            if proc is None:
                if not self.stopping.is_set():
                    self.lost = (f"the temporary Prefect server died and could not be started again (its output: "
                                 f"{self.log})")
                    print(f"melos: {self.lost}; stopping the run", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)
                    # the stop writes the checkpoint at the next step; if Prefect's client then
                    # waits on the missing API (its retries take minutes), end the process
                    if not self.stopping.wait(self.grace_s):
                        print(f"melos: stopped without the Prefect server (its output: {self.log}); checkpoints "
                              "written so far are kept: run the same command with --resume to continue",
                              file=sys.stderr, flush=True)
                        os._exit(128 + signal.SIGTERM)
                return
            self.proc = proc


@contextlib.contextmanager
def prefect_server(timeout: float = 120.0, log_dir: str | Path | None = None) -> Iterator[str | None]:
    """A temporary Prefect server for the block, unless ``PREFECT_API_URL`` names one already.

    Its output goes to ``log_dir/prefect-server.log`` (default: Prefect's home directory).
    Yields the API URL of the server started (None when an existing one is used)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, get_current_settings, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    log = Path(log_dir if log_dir is not None else PREFECT_HOME.value()).resolve() / LOG_NAME
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        # as Prefect's own temporary server: no UI, and the server runs its own database migrations
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    for name, value in QUIET_DEFAULTS.items():
        env.setdefault(name, value)
    for _ in range(3):
        port = _free_port()
        proc = _start(port, env, timeout, log)
        if proc is not None:
            break
    else:
        raise ServerLost(f"the temporary Prefect server exited at start three times; its output: {log}")
    url = f"http://127.0.0.1:{port}/api"
    watchdog = _Watchdog(proc, port, env, timeout, log)
    watchdog.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                if watchdog.proc.poll() is None:  # nothing to deliver to a server that is gone
                    _deliver_queued_logs_and_events()
    finally:
        watchdog.stopping.set()
        watchdog.join(timeout=2)  # one starting the server again meanwhile: it is tied, it dies with melos
        _stop(watchdog.proc)


def _deliver_queued_logs_and_events(timeout: float = 5.0) -> None:
    """Send the flow's logs and events still queued while the server is up. Left for
    Prefect's exit hook, they would go to a server already stopped, and the process would
    hang for over a minute retrying before it exits."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort: a lost log line must not fail the run
            worker.drain_all(timeout=timeout)
