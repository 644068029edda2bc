"""Processes a `melos` command starts, tied to its life: the temporary Prefect server, torchrun.

Prefect's own temporary server is stopped by an ``atexit`` hook, which SIGTERM's default
action and SIGKILL never run, so each killed run left a ``uvicorn`` behind. Here Melos starts
that server itself, as a child that the kernel kills when Melos dies however it dies
(``PR_SET_PDEATHSIG`` on Linux), and points ``PREFECT_API_URL`` at it. SIGTERM is turned into
an exception (``tasks.children.Stopped``) so that every ``finally`` and ``except`` on the way
out runs: the MLflow runs are marked KILLED and the server is stopped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from tasks.children import tied


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(port: int) -> list[str]:
    import prefect

    return [
        sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
        "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]


def _start(port: int, env: dict, timeout: float) -> subprocess.Popen | None:
    """Start the server on ``port``; None if it exited at once (the port was taken meanwhile)."""
    import httpx

    proc = subprocess.Popen(tied(_server_command(port)), env=env, stdin=subprocess.DEVNULL)
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
    raise RuntimeError(f"the temporary Prefect server on 127.0.0.1:{port} did not answer within {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def prefect_server(timeout: float = 120.0) -> Iterator[str | None]:
    """A temporary Prefect server for the block, unless ``PREFECT_API_URL`` names one already.

    Yields the API URL of the server started (None when an existing one is used)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        # as Prefect's own temporary server: no UI, and the server runs its own database migrations
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    for _ in range(3):
        port = _free_port()
        proc = _start(port, env, timeout)
        if proc is not None:
            break
    else:
        raise RuntimeError("the temporary Prefect server exited at start three times; see its output above")
    url = f"http://127.0.0.1:{port}/api"
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _deliver_queued_logs_and_events()
    finally:
        _stop(proc)


def _deliver_queued_logs_and_events(timeout: float = 10.0) -> None:
    """Send the flow's logs and events still queued while the server is up. Left for
    Prefect's exit hook, they would go to a server already stopped, and the process would
    hang for over a minute retrying before it exits."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort: a lost log line must not fail the run
            worker.drain_all(timeout=timeout)
