"""A real `mlflow server` stopped and started again on the same port while metrics are logged:
nothing is lost within the grace period, and a longer outage ends with a clear error."""

from __future__ import annotations

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
