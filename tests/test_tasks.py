"""Stage tasks under a temporary Prefect server: retries on network errors only."""

from __future__ import annotations

import shutil

import pytest
from prefect import flow

from conftest import EMBEDDED_ZIP
from mlm_core.config import DownloadConfig
from mlm_core.download import SourceError
from tasks import tracking
from tasks.download import download_stage

FAST_RETRIES = download_stage.with_options(retry_delay_seconds=0)


@pytest.fixture
def parent_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_parent("melos-tasks", "test", {})
    yield run_id
    tracking.end_run(run_id)


def _stage_statuses(parent_run_id: str) -> list[str]:
    client = tracking.client()
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", order_by=["start_time ASC"])
    return [r.info.status for r in runs]


def _download_in_a_flow(cfg: DownloadConfig, workdir, parent_run_id: str, task=FAST_RETRIES) -> dict:
    """Run the download task alone inside a flow (tasks retry only under a flow run)."""

    @flow
    def one_stage():
        return task(cfg=cfg, workdir=str(workdir), parent_run_id=parent_run_id)

    return one_stage()


def test_download_task_retries_a_flaky_server_then_succeeds(prefect_harness, http_server, tmp_path, parent_run):
    shutil.copy(EMBEDDED_ZIP, http_server.root / "merosu.zip")
    http_server.flaky_failures = 2

    record = _download_in_a_flow(
        DownloadConfig(sources=[http_server.url("flaky/merosu.zip")], retries=0), tmp_path / "work", parent_run
    )
    assert http_server.requests.count("/flaky/merosu.zip") == 3  # two 503s, then the file
    assert record["counts"]["documents"] == 1
    # every attempt is visible in MLflow: two failed, the last one finished
    assert _stage_statuses(parent_run) == ["FAILED", "FAILED", "FINISHED"]


def test_download_task_does_not_retry_a_404(prefect_harness, http_server, tmp_path, parent_run):
    with pytest.raises(SourceError, match="404"):
        _download_in_a_flow(DownloadConfig(sources=[http_server.url("nope.zip")]), tmp_path / "work", parent_run)
    assert http_server.requests == ["/nope.zip"]
    assert _stage_statuses(parent_run) == ["FAILED"]


def test_download_task_retries_a_timeout(prefect_harness, http_server, tmp_path, parent_run):
    shutil.copy(EMBEDDED_ZIP, http_server.root / "merosu.zip")
    http_server.slow_seconds = 2.0

    with pytest.raises(SourceError, match="timed out"):
        _download_in_a_flow(
            DownloadConfig(sources=[http_server.url("slow/merosu.zip")], timeout_s=0.3, retries=0),
            tmp_path / "work",
            parent_run,
            task=FAST_RETRIES.with_options(retries=1),
        )
    assert http_server.requests == ["/slow/merosu.zip", "/slow/merosu.zip"]  # tried, retried once, gave up


def test_a_fresh_run_replaces_a_finished_one_but_keeps_an_unfinished_one(tmp_path):
    import json

    from tasks.train import prepare_run_dir

    run_dir = tmp_path / "train" / "abc"
    (run_dir / "checkpoints" / "step-0000010").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"status": "running"}))
    aside = prepare_run_dir(run_dir, resume=False)
    assert not run_dir.exists() and aside.parent == run_dir.parent and aside.name.startswith("abc.")
    assert (aside / "checkpoints" / "step-0000010").is_dir()  # the resumable state survives

    (run_dir / "model").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"status": "completed"}))
    assert prepare_run_dir(run_dir, resume=False) is None
    assert not run_dir.exists() and sorted(p.name for p in run_dir.parent.iterdir()) == [aside.name]

    with pytest.raises(FileNotFoundError, match="drop --resume"):
        prepare_run_dir(run_dir, resume=True)
