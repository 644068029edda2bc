"""``melos ui``: the MLflow UI (and optionally the Prefect UI) as child processes.

Each child runs in its own process group, so a Ctrl-C in the terminal reaches only
``melos ui``, which then stops every group it started (SIGTERM, then SIGKILL after a grace
period): servers that fork workers (MLflow's uvicorn, Prefect's) leave no orphans.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

GRACE_S = 5.0  # then SIGKILL: Ctrl-C must end `melos ui` within seconds
START_TIMEOUT_S = 180.0


def _executable(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.is_file() else name


def _wait_ready(url: str, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=2.0).is_success:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)  # whatever of the group is left, the server's workers included
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    raise _Stop(signum)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_for(name: str, host: str, port: int) -> int:
    """``port`` if nothing listens on it, else a free one (said on stderr): with the port taken,
    the server would print its URL and then die on the bind, or the URL would lead to the
    other server's store."""
    if _port_free(host, port):
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        other = s.getsockname()[1]
    print(f"melos: port {port} on {host} is in use (another server?); the {name} takes port {other} instead "
          f"(--port N chooses)", file=sys.stderr, flush=True)
    return other


# MLflow's UI opens on its GenAI views unless asked for the model-training ones (3.17 lets a
# global switch, not the experiment's kind, decide; the URL parameter sets that switch).
RUNS_VIEW = "?workflowType=machine_learning"


def serve(store: str, host: str, port: int, prefect_port: int | None = None, experiment_id: str | None = None,
          access_log: bool = False) -> int:
    """Run the UIs until Ctrl-C / SIGTERM or until one of them exits; returns an exit status
    (128 + the signal's number when stopped by one, as a shell reports it)."""
    # One web worker and no background job runner (it serves GenAI judges): a light, quick start.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_TRACKING_URI": store}
    commands = []
    if store.startswith(("http://", "https://")):
        print(f"MLflow UI: {store}   (the tracking server serves it)", flush=True)
    else:
        port = free_port_for("MLflow UI", host, port)
        # otherwise one line per request, and uvicorn's start/stop chatter around Melos's own lines
        quiet = [] if access_log else ["--uvicorn-opts", "--no-access-log --log-level warning"]
        commands.append(("MLflow UI", [_executable("mlflow"), "ui", "--backend-store-uri", store, "--host", host,
                                       "--port", str(port), "--workers", "1", *quiet], f"http://{host}:{port}",
                         "/health"))
    if prefect_port is not None:
        prefect_port = free_port_for("Prefect UI", host, prefect_port)
        commands.append(("Prefect UI", [_executable("prefect"), "server", "start", "--host", host,
                                        "--port", str(prefect_port)], f"http://{host}:{prefect_port}", "/api/health"))
    if not commands:
        return 0
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen] = []
    try:
        for name, cmd, url, health in commands:
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL))
            if not _wait_ready(url + health, procs[-1]):
                print(f"melos: the {name} did not start (`{' '.join(cmd)}`); is port {url.rsplit(':', 1)[1]} free?",
                      file=sys.stderr)
                return 1
            if name == "MLflow UI":
                page = f"/#/experiments/{experiment_id}" if experiment_id else "/#/experiments"
                print(f"{name}: {url}{page}{RUNS_VIEW}   (store {store})", flush=True)
            else:
                print(f"{name}: {url}", flush=True)
        print("Ctrl-C stops them.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1  # a server stopped by itself
    except _Stop as stop:
        return 128 + stop.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop(procs)
