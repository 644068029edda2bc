"""Ctrl-C in a real terminal: the terminal sends SIGINT to the whole foreground process group,
Melos and every process it started. The command must still stop within seconds, exit 130,
print the --resume line, leave its MLflow runs KILLED and its Prefect flow runs in a final
state (not Running), and leave no process behind.

Each command is started in its own session (as a shell starts a foreground job) and its
process group is signalled, as the terminal does. The pretrain test first SIGKILLs Melos's
temporary Prefect server mid-run: the run must go on (a new server on the same port and
database) and still stop cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlm_core.checkpoint import list_checkpoints
from tests.test_stopping import _alive, _wait_gone

TINY = [
    "--max-steps", "5000", "--checkpoint-every", "10", "--batch-size", "8", "--eval-passes", "1",
    "--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64", "--max-length", "64",
    "--threads", "1", "--workers", "1", "--experiment", "ctrl-c",
    "--example", "メロスは[MASK]した。",
]


def _group(pgid: int) -> set[int]:
    """Live processes of process group ``pgid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid or int(fields[3]) == pgid:  # group, or session (a child in a session of its own)
            found.add(int(stat.parent.name))
    return found


def _descendants_now(pid: int) -> set[int]:
    from tests.test_stopping import _descendants

    return _descendants(pid)


def _server_pid(pid: int) -> int:
    (server,) = [k for k in _descendants_now(pid) if b"uvicorn" in Path(f"/proc/{k}/cmdline").read_bytes()]
    return server


def _kill_the_server_and_wait_for_its_return(pid: int, log: Path) -> None:
    """SIGKILL Melos's temporary Prefect server mid-run (as happened on a busy machine); the
    run goes on and a new server answers on the same port."""
    import httpx

    first = _server_pid(pid)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text()
        if text.count("starting the temporary Prefect server") >= 2:
            port = text.rsplit("127.0.0.1:", 1)[1].split()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not started again:\n{log.read_text()[-3000:]}")


def _ctrl_c_while_training(command: list[str], tmp_path: Path, lose_server: bool = False
                           ) -> tuple[subprocess.CompletedProcess, float, set[int]]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    # as run outside make: no analytics settings (Melos turns them off for its own server and clients)
    for name in ("PREFECT_API_URL", "MELOS_DEBUG", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
                 "MLFLOW_DISABLE_TELEMETRY"):
        env.pop(name, None)
    work = tmp_path / "work"
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *command, "--workdir", str(work)], cwd=tmp_path,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(list_checkpoints(d) for d in work.glob("train/*/checkpoints")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the command ended before it could be stopped:\n{log.read_text()[-3000:]}"
    if lose_server:
        _kill_the_server_and_wait_for_its_return(proc.pid, work / "logs" / "prefect-server.log")
        assert proc.poll() is None, f"the run did not survive the loss of its server:\n{log.read_text()[-3000:]}"
    started = _descendants_now(proc.pid) | _group(proc.pid)
    assert started, "the command started no process (no temporary Prefect server?)"
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running 60 s after Ctrl-C:\n{log.read_text()[-3000:]}")
    took = time.monotonic() - t0
    print(f"{command[0]}: stopped {took:.1f} s after Ctrl-C")
    text = log.read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, text, ""), took, started


def _prefect_flow_run_states(tmp_path: Path) -> list[str]:
    """The flow runs' states in the temporary server's database (PREFECT_HOME/prefect.db)."""
    import sqlite3

    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        return [row[0] for row in db.execute("select state_type from flow_run")]


def _check_stopped(done, took, started, tmp_path, flow_runs: int) -> None:
    from mlflow.tracking import MlflowClient

    out = done.stdout
    assert done.returncode == 130, out[-3000:]
    assert took < 10, f"took {took:.1f} s to stop:\n{out[-3000:]}"
    assert "stopped by SIGINT" in out, out[-3000:]
    assert "Traceback" not in out and "Error logging to API" not in out, out[-3000:]
    assert not _wait_gone(started, timeout=10), f"processes outlived the stopped command: {_alive(started)}"
    server_log = (tmp_path / "work" / "logs" / "prefect-server.log").read_text()
    for noise in ("telemetry", "database is locked"):
        assert noise not in out and noise not in server_log, server_log[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    assert runs and not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status) for r in runs]
    assert "KILLED" in {r.info.status for r in runs}
    states = _prefect_flow_run_states(tmp_path)
    assert len(states) >= flow_runs and set(states) <= {"CANCELLED", "CRASHED", "COMPLETED"}, states
    assert {"CANCELLED", "CRASHED"} & set(states), states


def test_pretrain_survives_its_server_and_ctrl_c_stops_its_whole_process_group(tmp_path):
    done, took, started = _ctrl_c_while_training(["pretrain", *TINY], tmp_path, lose_server=True)
    _check_stopped(done, took, started, tmp_path, flow_runs=1)
    assert "the temporary Prefect server exited" in done.stdout and "prefect-server.log" in done.stdout
    assert "--resume" in done.stdout
    assert [c.name for d in (tmp_path / "work").glob("train/*/checkpoints") for c in list_checkpoints(d)]


def test_ctrl_c_stops_compare_and_its_whole_process_group(tmp_path):
    done, took, started = _ctrl_c_while_training(["compare", "--grid", "masking=static,dynamic", *TINY], tmp_path)
    _check_stopped(done, took, started, tmp_path, flow_runs=1)
