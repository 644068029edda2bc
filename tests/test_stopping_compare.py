"""Stopping `melos compare` with SIGTERM: like pretrain, it exits promptly, marks its MLflow
runs KILLED and leaves no process behind (it used to leave Prefect's temporary server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlm_core.checkpoint import list_checkpoints
from test_stopping import ARGS, _alive, _descendants, _wait_gone


def test_sigterm_stops_a_comparison_cleanly(tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "compare", "--grid", "masking=static,dynamic", *ARGS, "--workdir", str(work)],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(list_checkpoints(d) for d in work.glob("train/*/checkpoints")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the comparison ended before it could be stopped:\n{proc.communicate()[0]}"
    children = _descendants(proc.pid)
    assert children, "the comparison started no process (no temporary Prefect server?)"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM" in out
    assert not _wait_gone(children), f"processes outlived the stopped comparison: {_alive(children)}"

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("melos-stop")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("melos.comparison") == "parent"]
    assert parent.info.status == "KILLED", out[-3000:]
    settings = [r for r in runs if "melos.setting" in r.data.tags]
    assert [r.info.status for r in settings] == ["KILLED"]  # the one running; the other never started
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert Path(work).is_dir()
