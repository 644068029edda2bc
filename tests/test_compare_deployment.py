"""`melos compare --deployment`: settings fanned out as flow runs of the compare-setting
deployment, run by a real process worker against a real ``prefect server`` on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from conftest import REPO, free_port, stop_processes, wait_for_http
from test_deployment import PREFECT, _cli

pytestmark = pytest.mark.servers


def test_compare_fans_settings_out_to_a_deployment(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base_env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    base_env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client_env = {**base_env, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": uri}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=base_env, cwd=tmp_path, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,
        ))
        wait_for_http(f"{api}/health", timeout=180, proc=procs[0])
        _cli(["work-pool", "create", "melos-process", "--type", "process"], client_env)
        _cli(["--no-prompt", "deploy", "--name", "melos-compare"], client_env)
        deployment = httpx.get(f"{api}/deployments/name/compare-setting/melos-compare", timeout=30).json()
        assert deployment["work_pool_name"] == "melos-process"
        procs.append(subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "melos-process", "--limit", "2"],
            env=client_env, cwd=tmp_path, stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT,
        ))
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "compare", "--grid", "masking=static,dynamic",
             "--deployment", "compare-setting/melos-compare", "--hidden-size", "32", "--layers", "1", "--heads", "2",
             "--intermediate-size", "64", "--max-length", "64", "--max-steps", "3", "--checkpoint-every", "3",
             "--eval-passes", "1", "--eval-pll-sentences", "2", "--example", "メロスは[MASK]した。",
             "--workdir", str(tmp_path / "work"), "--experiment", "cmp-deploy"],
            env=client_env, cwd=REPO, capture_output=True, text=True, timeout=480,
        )
        assert out.returncode == 0, out.stdout + out.stderr + (logs / "worker.log").read_text()
        assert "| masking=static | 1 |" in out.stdout and "| masking=dynamic | 1 |" in out.stdout

        # each setting ran as a flow run of the deployment, and reported into the comparison run
        flow_runs = httpx.post(
            f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}}, timeout=30,
        ).json()
        assert sorted(fr["state"]["type"] for fr in flow_runs) == ["COMPLETED", "COMPLETED"]
        assert sorted(fr["parameters"]["label"] for fr in flow_runs) == ["masking=dynamic", "masking=static"]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("cmp-deploy")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        [parent] = [r for r in runs if r.data.tags.get("melos.comparison") == "parent"]
        children = [r for r in runs if r.data.tags.get("melos.comparison") == parent.info.run_id]
        assert {c.data.tags["prefect.flow_run_id"] for c in children} == {fr["id"] for fr in flow_runs}
        assert all("eval/top1_accuracy" in c.data.metrics for c in children)
        assert parent.info.status == "FINISHED"
    finally:
        stop_processes(procs)
