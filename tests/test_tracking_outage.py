"""A real `mlflow server` stopped and started again on the same port while metrics are logged:
nothing is lost within the grace period, and a longer outage ends with a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_for_http


def _server(port: int, root: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root, start_new_session=True,
    )
    wait_for_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers, at once, as a crashed machine would
    proc.wait(timeout=30)


def test_metrics_wait_out_an_outage_and_a_long_one_fails_clearly(tmp_path, monkeypatch):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # the client's own retries would only delay noticing that the server is back; ours go on
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow.tracking import MlflowClient

    from tasks.tracking import StageRun, TrackingOutage, experiment_id

    server = _server(port, tmp_path)
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(experiment_id("outage")).info.run_id
        run = StageRun(run_id, flush_every=5, grace_s=600)
        for step in range(1, 11):
            run.log_metrics({"train/loss": 1.0 / step}, step=step, flush=False)
        run.flush()

        _stop(server)  # outage shorter than the grace period: logging goes on, nothing is sent
        for step in range(11, 31):
            run.log_metrics({"train/loss": 1.0 / step}, step=step, flush=False)
        run.set_tags({"melos.last_checkpoint_step": 30})
        server = _server(port, tmp_path)
        run.flush()  # drains the queue into the restarted server
        history = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 31))
        assert client.get_run(run_id).data.tags["melos.last_checkpoint_step"] == "30"
        run.close()

        # an outage longer than the grace period: the next log call fails, naming the fix
        short = StageRun(client.create_run(experiment_id("outage")).info.run_id, flush_every=1, grace_s=1)
        _stop(server)
        with pytest.raises(TrackingOutage) as err:
            for step in range(1, 100_000):
                short.log_metrics({"train/loss": 1.0}, step=step, flush=False)
                if step % 100 == 0:
                    time.sleep(0.05)  # a training step's worth of time between log calls
        short.close()
        message = str(err.value)
        assert uri in message and "grace period 1s" in message and "--resume" in message and "--tracking-grace" in message
    finally:
        if server.poll() is None:
            _stop(server)


def test_cli_run_failed_by_an_outage_resumes_with_its_whole_history(tmp_path):
    """`melos pretrain` against a real `mlflow server` that dies mid-training for longer than
    --tracking-grace: the run fails with the outage line, its checkpoints on disk. With the
    server back, the same command with --resume finishes, and the resumed run's MLflow history
    holds every step; the failed run's MLflow runs are marked KILLED, pointing at it."""
    from mlflow.tracking import MlflowClient

    from mlm_core.checkpoint import list_checkpoints
    from mlm_core.pause import ENV_MARKER, ENV_POINT

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    steps = 120
    args = [sys.executable, "-m", "flows.cli", "pretrain", "--max-steps", str(steps), "--checkpoint-every", "10",
            "--batch-size", "16", "--eval-passes", "1", "--hidden-size", "32", "--layers", "1", "--heads", "2",
            "--intermediate-size", "64", "--max-length", "64", "--experiment", "outage-cli",
            "--example", "メロスは[MASK]した。", "--tracking-grace", "2", "--workdir", str(tmp_path / "work")]
    held = tmp_path / "held"
    server = _server(port, tmp_path)
    try:
        # the server dies while the step-20 checkpoint is being written, and stays away
        with open(tmp_path / "failed.log", "w") as log:
            proc = subprocess.Popen(args, cwd=tmp_path, env={**env, ENV_POINT: "checkpoint#2", ENV_MARKER: str(held)},
                                    stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not held.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.exists(), (tmp_path / "failed.log").read_text()[-3000:]
        _stop(server)
        held.unlink()
        assert proc.wait(timeout=300) == 1
        out = (tmp_path / "failed.log").read_text()
        assert f"melos: the tracking server at {uri} has not answered" in out and "--resume" in out, out[-3000:]
        (run_dir,) = [d for d in (tmp_path / "work" / "train").iterdir() if d.is_dir()]
        kept = list_checkpoints(run_dir / "checkpoints")
        assert kept and int(kept[-1].name.split("-")[1]) >= 20

        server = _server(port, tmp_path)
        done = subprocess.run([*args, "--resume", "--json"], cwd=tmp_path, env=env, text=True, capture_output=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        result = json.loads(done.stdout[done.stdout.index("{\n"):done.stdout.rindex("}") + 1])
        client = MlflowClient(uri)
        train_run = result["stages"]["train"]
        assert client.get_run(train_run).data.tags["melos.resumed_from_step"] == kept[-1].name.split("-")[1].lstrip("0")
        history = client.get_metric_history(train_run, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))
        exp = client.get_experiment_by_name("outage-cli")
        parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
        failed = [p for p in parents if p.info.run_id != result["mlflow_run_id"]]
        assert [p.info.status for p in failed] == ["KILLED"]
        assert failed[0].data.tags["melos.taken_over_by"] == result["mlflow_run_id"]
    finally:
        if proc.poll() is None:
            proc.kill()
        if server.poll() is None:
            _stop(server)


def test_a_stage_that_starts_while_the_server_is_away_fails_at_once_naming_it(monkeypatch):
    """No server at the tracking URI: starting the parent or a stage raises the outage error
    straight away, instead of waiting out the MLflow client's own retries (minutes)."""
    from tasks.tracking import TrackingOutage, stage_run, start_parent

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingOutage) as err:
        start_parent("away", "run", {})
    assert f"the tracking server at {uri} does not answer" in str(err.value) and "--resume" in str(err.value)
    with pytest.raises(TrackingOutage):
        with stage_run("0" * 32, "tokenize"):
            pass
