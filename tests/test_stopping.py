"""Stopping `melos pretrain` from outside: SIGTERM unwinds cleanly, SIGKILL leaves no process
behind, and the next --resume run marks the killed run's MLflow runs KILLED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlm_core.checkpoint import list_checkpoints
from mlm_core.pause import ENV_MARKER, ENV_POINT

ARGS = [
    "--max-steps", "200", "--checkpoint-every", "20", "--batch-size", "16", "--eval-passes", "1",
    "--hidden-size", "64", "--intermediate-size", "256",
    "--experiment", "melos-stop", "--example", "メロスは[MASK]した。",
]


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent_of.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _start_and_wait_for_checkpoint(args, cwd, env, after_step: int = 0, held: Path | None = None):
    """Start a run and wait until it has a checkpoint after ``after_step``, or, given ``held``
    (a marker file), until the pause hook holds it writing its first checkpoint."""
    if held is not None:
        env = {**env, ENV_POINT: "checkpoint", ENV_MARKER: str(held)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "pretrain", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    workdir = Path(args[args.index("--workdir") + 1])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if held is not None and held.exists():
            return proc, _descendants(proc.pid)
        steps = [int(c.name.split("-")[1]) for d in workdir.glob("train/*/checkpoints") for c in list_checkpoints(d)]
        if held is None and steps and max(steps) > after_step:
            return proc, _descendants(proc.pid)
        time.sleep(0.1)
    raise AssertionError(f"the run ended before it could be stopped:\n{proc.communicate()[0]}")


def _wait_gone(pids: set[int], timeout: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


def test_sigterm_then_sigkill_leave_nothing_running_and_resume_takes_over(tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = [*ARGS, "--workdir", str(tmp_path / "work")]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])

    def parent_runs():
        exp = client.get_experiment_by_name("melos-stop")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
        return [r for r in runs if "mlflow.parentRunId" not in r.data.tags], runs

    # SIGTERM (as `timeout` or systemd send it) while the step-20 checkpoint is being written:
    # prompt exit after the step under way, with a checkpoint of it, runs marked KILLED, no child left
    held = tmp_path / "held"
    proc, children = _start_and_wait_for_checkpoint(args, tmp_path, env, held=held)
    assert children, "the run started no process (no temporary Prefect server?)"
    proc.send_signal(signal.SIGTERM)
    held.unlink()  # the checkpoint write goes on; the signal is acted on after the next step
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM" in out and "--resume" in out
    assert not _wait_gone(children), f"processes outlived the stopped run: {_alive(children)}"
    (stopped,), runs = parent_runs()
    assert stopped.info.status == "KILLED", out[-3000:]
    train = [r for r in runs if r.data.tags.get("melos.stage") == "train"]
    assert [r.info.status for r in train] == ["KILLED"]
    (run_dir,) = (tmp_path / "work" / "train").glob("*/")
    kept = list_checkpoints(run_dir / "checkpoints")
    assert [c.name for c in kept] == ["step-0000020", "step-0000021"], out[-3000:]  # the step it stopped at
    assert "training stopped at step 21" in out

    # SIGKILL of the --resume run, Melos alone (not its process group): its children die with it
    proc, children = _start_and_wait_for_checkpoint(
        [*args, "--resume"], tmp_path, env, after_step=int(kept[-1].name.split("-")[1])
    )
    assert children
    assert json.loads((run_dir / "run.json").read_text())["start_step"] == 21  # resumed where it was stopped
    proc.kill()
    proc.communicate(timeout=30)
    assert not _wait_gone(children), f"processes outlived the killed run: {_alive(children)}"
    parents, _ = parent_runs()
    killed = parents[1]
    assert killed.info.status == "RUNNING"  # nobody could mark it: that is the next run's job

    # the next --resume finishes the work and marks the killed run's MLflow runs KILLED, pointing at itself
    done = subprocess.run([sys.executable, "-m", "flows.cli", "pretrain", *args, "--resume", "--json"], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{\n"):done.stdout.rindex("}") + 1])
    parents, runs = parent_runs()
    assert [p.info.status for p in parents] == ["KILLED", "KILLED", "FINISHED"]
    assert parents[1].data.tags["melos.taken_over_by"] == result["mlflow_run_id"]
    of_killed = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == killed.info.run_id]
    assert of_killed and all(r.info.status in ("FINISHED", "KILLED") for r in of_killed)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
