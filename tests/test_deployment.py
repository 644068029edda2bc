"""The scheduled deployment from prefect.yaml, run for real: a ``prefect server`` on
127.0.0.1, ``prefect deploy``, a process worker, and ``prefect deployment run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import REPO, free_port, stop_processes, wait_for_http

pytestmark = pytest.mark.servers

PREFECT = str(Path(sys.executable).with_name("prefect"))
TINY_TRAIN = {
    "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 64,
    "max_steps": 4, "checkpoint_every": 2,
}


def _cli(args: list[str], env: dict, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    out = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def test_deploy_and_run_on_a_real_server_and_worker(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base_env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    base_env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    client_env = {**base_env, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            subprocess.Popen(
                [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=base_env, cwd=tmp_path, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
            )
        )
        wait_for_http(f"{api}/health", timeout=180, proc=procs[0])

        _cli(["work-pool", "create", "melos-process", "--type", "process"], client_env)
        deployed = _cli(["--no-prompt", "deploy", "--all"], client_env)
        assert "melos-nightly" in deployed.stdout

        deployment = httpx.get(f"{api}/deployments/name/pretrain/melos-nightly", timeout=30).json()
        assert deployment["work_pool_name"] == "melos-process"
        [schedule] = deployment["schedules"]
        assert schedule["active"] and schedule["schedule"]["cron"] == "0 3 * * *"
        assert schedule["schedule"]["timezone"] == "Asia/Tokyo"
        assert deployment["parameters"]["experiment"] == "melos-nightly"
        assert deployment["parameters"]["register_as"] == "melos-nightly"
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]

        procs.append(
            subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "melos-process", "--limit", "1"],
                env=client_env, cwd=tmp_path, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT,
            )
        )
        workdir = tmp_path / "work"
        run = _cli(
            [
                "deployment", "run", "pretrain/melos-nightly",
                "--param", f"workdir={json.dumps(str(workdir))}",
                "--param", "experiment=\"melos-deploy\"",
                "--param", f"train={json.dumps(TINY_TRAIN)}",
                "--param", 'evaluate={"passes": 1}',
                "--watch", "--watch-timeout", "420",
            ],
            client_env,
            timeout=480,
        )
        assert "Completed" in run.stdout, run.stdout + (logs / "worker.log").read_text()

        flow_runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={"deployments": {"id": {"any_": [deployment["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}},
            timeout=30,
        ).json()
        assert len(flow_runs) == 1
        flow_run = flow_runs[0]
        assert flow_run["parameters"]["train"]["max_steps"] == 4

        # the run landed in MLflow, tagged with the Prefect flow-run id, with its model
        from mlflow.tracking import MlflowClient

        client = MlflowClient(client_env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("melos-deploy")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run['id']}'")
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        # the MLflow UI's Source column names the deployment that made the run
        assert parents[0].data.tags["mlflow.source.name"] == "prefect deployment pretrain/melos-nightly"
        assert parents[0].data.tags["mlflow.source.type"] == "JOB"
        assert len(runs) == 6  # parent + five stages
        assert (workdir / "train").is_dir() and any(workdir.glob("train/*/model/model.pt"))
        assert "eval/top1_accuracy" in parents[0].data.metrics
        # artifacts sit beside the SQLite store, not in the worker's working directory (the checkout)
        assert exp.artifact_location == (tmp_path / "mlruns").as_uri()
        assert any((tmp_path / "mlruns").rglob("model.pt"))
        # the nightly model went through the registry's champion gate (the first one wins it)
        champion = client.get_model_version_by_alias("melos-nightly", "champion")
        assert champion.run_id == parents[0].info.run_id
        assert champion.tags["melos.promotion"].startswith("promoted: first version")
    finally:
        stop_processes(procs)
