"""The pretrain flow end to end on the embedded corpus, under a real (temporary) Prefect
server, tracked in a local MLflow SQLite store and in a real ``mlflow server``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, wait_for_http
from mlm_core.config import DownloadConfig, EvalConfig, TrainConfig

TINY_TRAIN = TrainConfig(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=64, batch_size=32,
    max_steps=6, checkpoint_every=3,
)
TINY_EVAL = EvalConfig(passes=1, fill_mask_examples=["メロスは[MASK]した。"])
STAGES = ["download", "tokenize", "vocab", "train", "evaluate"]


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out |= _artifact_paths(client, run_id, item.path)
        else:
            out.add(item.path)
    return out


def _task_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in task_runs}


def _check_tracking(client, experiment: str, result: dict, *, cached: tuple[str, ...] = ()) -> tuple:
    parents, children = _runs(client, experiment)
    parent = next(p for p in parents if p.info.run_id == result["mlflow_run_id"])
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert parent.info.status == "FINISHED"
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert sorted(c.data.tags["melos.stage"] for c in mine) == sorted(STAGES)
    by_stage = {c.data.tags["melos.stage"]: c for c in mine}
    for child in mine:
        assert child.info.status == "FINISHED"
        assert child.data.tags["prefect.flow_run_id"] == flow_run_id
        assert child.info.run_id == result["stages"][child.data.tags["melos.stage"]]
    for stage in ("download", "tokenize", "vocab"):
        assert (by_stage[stage].data.tags.get("melos.cached") == "true") is (stage in cached), stage

    # parameters: the parent has everything, each stage its own section
    assert parent.data.params["train.max_steps"] == "6"
    assert parent.data.params["download.sources"] == '["embedded"]'
    assert by_stage["train"].data.params["train.hidden_size"] == "32"
    assert by_stage["train"].data.params["run.total_steps"] == "6"
    assert by_stage["evaluate"].data.params["evaluate.mask_rate"] == "0.15"

    # metrics: a per-step training curve, evaluation numbers on the child and the parent
    train_id = by_stage["train"].info.run_id
    loss = client.get_metric_history(train_id, "train/loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]
    assert len(client.get_metric_history(train_id, "train/lr")) == 6
    assert all(m.value > 0 for m in client.get_metric_history(train_id, "train/tokens_per_s"))
    for run in (by_stage["evaluate"], parent):
        m = run.data.metrics
        assert 0 <= m["eval/top1_accuracy"] <= m["eval/top5_accuracy"] <= 1
        assert "eval/unigram_top1_accuracy" in m and m["eval/loss"] > 0
    assert result["metrics"]["eval/top1_accuracy"] == pytest.approx(parent.data.metrics["eval/top1_accuracy"])

    # artifacts
    assert {"model/config.json", "model/model.pt", "model/vocab.txt", "run.json"} <= _artifact_paths(client, train_id)
    assert {"report.json", "report.md"} <= _artifact_paths(client, by_stage["evaluate"].info.run_id)
    assert "report.md" in _artifact_paths(client, parent.info.run_id)
    if "download" not in cached:
        assert _artifact_paths(client, by_stage["download"].info.run_id) == {"manifest.json"}
        assert {"manifest.json", "sample_sentence.json"} <= _artifact_paths(client, by_stage["tokenize"].info.run_id)
        assert {"vocab.txt", "manifest.json"} <= _artifact_paths(client, by_stage["vocab"].info.run_id)
        assert by_stage["download"].data.metrics["download/documents"] == 1
        assert by_stage["vocab"].data.metrics["vocab/train_unk_word_rate"] == 0.0
    for stage in cached:  # a cached stage points at the run that produced its output
        source = client.get_run(by_stage[stage].data.tags["melos.source_run_id"])
        assert source.data.tags["melos.stage"] == stage and source.info.status == "FINISHED"
    return flow_run_id, by_stage


@pytest.fixture
def sqlite_tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_flow_end_to_end_then_cached_rerun(prefect_harness, sqlite_tracking, tmp_path):
    from flows.pretrain import pretrain

    workdir = tmp_path / "work"
    kwargs = dict(train=TINY_TRAIN, evaluate=TINY_EVAL, workdir=str(workdir), experiment="melos-test")
    first = pretrain(**kwargs)

    flow_run_id, _ = _check_tracking(sqlite_tracking, "melos-test", first)
    assert _task_states(flow_run_id) == {s: "Completed" for s in [*STAGES, "publish"]}  # publish: tests/test_publish.py
    assert first["model_uri"] == f"runs:/{first['mlflow_run_id']}/model" and first["registered"] is None
    report = json.loads((Path(first["report"]).with_suffix(".json")).read_text())
    assert report["metrics"] == pytest.approx(first["metrics"])
    assert report["fill_mask"][0]["text"] == "メロスは[MASK]した。" and len(report["fill_mask"][0]["predictions"][0]) == 5
    manifests = sorted(workdir.glob("*/*/manifest.json"))
    assert [p.parts[-3] for p in manifests] == ["download", "tokenize", "vocab"]
    mtimes = [p.stat().st_mtime_ns for p in manifests]

    # the Prefect artifact leads to the MLflow run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["melos-evaluation"])))
    assert any(first["mlflow_run_id"] in (a.data or "") and str(a.flow_run_id) == flow_run_id for a in artifacts)

    second = pretrain(**kwargs)
    data_stages = ("download", "tokenize", "vocab")
    flow_run_2, _ = _check_tracking(sqlite_tracking, "melos-test", second, cached=data_stages)
    assert flow_run_2 != flow_run_id
    states = _task_states(flow_run_2)
    assert [states[s] for s in STAGES] == ["Cached", "Cached", "Cached", "Completed", "Completed"]
    assert [p.stat().st_mtime_ns for p in manifests] == mtimes  # data stages not rewritten
    assert second["metrics"] == pytest.approx(first["metrics"])  # same seed, same data -> same model

    # a deleted stage output is rebuilt rather than served stale from the cache
    import shutil

    shutil.rmtree(workdir / "vocab")
    third = pretrain(**kwargs)
    flow_run_3, _ = _check_tracking(sqlite_tracking, "melos-test", third, cached=("download", "tokenize"))
    states = _task_states(flow_run_3)
    assert [states[s] for s in STAGES] == ["Cached", "Cached", "Completed", "Completed", "Completed"]
    assert (workdir / "vocab").is_dir() and third["metrics"] == pytest.approx(first["metrics"])


def test_flow_fails_clearly_and_marks_the_mlflow_run_failed(prefect_harness, sqlite_tracking, tmp_path, http_server):
    from flows.pretrain import pretrain

    bad = http_server.url("cards/000035/files/missing.zip")
    with pytest.raises(Exception, match=r"missing\.zip.*404"):
        pretrain(
            download=DownloadConfig(sources=[bad]), train=TINY_TRAIN, evaluate=TINY_EVAL,
            workdir=str(tmp_path / "work"), experiment="melos-fail",
        )
    assert http_server.requests.count("/cards/000035/files/missing.zip") == 1  # a 404 is not retried
    parents, children = _runs(sqlite_tracking, "melos-fail")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert [(c.data.tags["melos.stage"], c.info.status) for c in children] == [("download", "FAILED")]
    assert not (tmp_path / "work" / "download").exists() or not any((tmp_path / "work" / "download").iterdir())


def test_flow_against_a_real_mlflow_server_and_fill_mask_cli(prefect_harness, tmp_path, monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env={**os.environ},
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=server)
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        from mlflow.tracking import MlflowClient

        from flows.pretrain import pretrain

        result = pretrain(train=TINY_TRAIN, evaluate=TINY_EVAL, workdir=str(tmp_path / "work"), experiment="melos-srv")
        _check_tracking(MlflowClient(uri), "melos-srv", result)
        assert not (tmp_path / "mlflow.db").exists() and (tmp_path / "server-artifacts").is_dir()

        # fill-mask by MLflow run id: the model comes back from the server's artifact store
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "fill-mask", "メロスは[MASK]した。", "--run", result["mlflow_run_id"]],
            capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=300,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        assert lines[0] == "[MASK] #1" and len(lines) == 6
        expected = [t for t, _ in result["fill_mask"][0]["predictions"][0]]
        assert [line.split()[1] for line in lines[1:]] == expected
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_fill_mask_cli_errors_are_readable(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "fill-mask", "メロスは激怒した。", "--run", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "not a Melos model" in out.stderr and "Traceback" not in out.stderr


def test_a_missing_local_source_fails_the_run_before_any_stage(prefect_harness, sqlite_tracking, tmp_path):
    from flows.pretrain import pretrain

    missing = tmp_path / "no-such-novel.txt"
    with pytest.raises(Exception, match="no-such-novel.txt.*no such file"):
        pretrain(download=DownloadConfig(sources=[str(missing)]), workdir=str(tmp_path / "w"), experiment="melos-missing")
    parents, children = _runs(sqlite_tracking, "melos-missing")
    assert [p.info.status for p in parents] == ["FAILED"] and children == []
