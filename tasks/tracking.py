"""MLflow bookkeeping for the pipeline: one parent run per flow run, one child per stage.

Run ids are passed explicitly and every call goes through ``MlflowClient``: the fluent
``mlflow.active_run()`` is thread-local, and Prefect runs tasks in worker threads.
The default store is ``sqlite:///mlflow.db`` in the working directory (MLflow 3's own
default, set explicitly so an old ``./mlruns`` folder never switches it); setting
``MLFLOW_TRACKING_URI`` sends everything to a tracking server instead.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import stores

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_FLOW_RUN = "prefect.flow_run_id"
TAG_FLOW_RUN_NAME = "prefect.flow_run_name"
TAG_STAGE = "melos.stage"
TAG_CACHED = "melos.cached"
# MLflow 3's experiment kind: its UI opens such an experiment on the runs table and charts
# rather than on the GenAI overview of traces.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
_CHECKOUT = Path(__file__).resolve().parents[1]
_MAX_PARAM_LEN = 6000


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri())


def _artifact_location() -> str | None:
    """For a SQLite store, artifacts live in ``mlruns/`` beside the database file (not in
    whatever directory the process happens to run in); servers choose their own."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent.resolve() / "mlruns").as_uri()


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if TAG_EXPERIMENT_KIND not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return c.create_experiment(
            name, artifact_location=_artifact_location(), tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
        )
    except Exception:  # created concurrently by another flow run
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(prefix: str, obj: Any) -> dict[str, str]:
    """Nested config -> ``{"train.hidden_size": "128", ...}`` as MLflow params."""
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
    else:
        value = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        out[prefix] = value[:_MAX_PARAM_LEN]
    return out


class StageRun:
    """A thin handle on one MLflow run; metrics are buffered and sent in batches."""

    def __init__(self, run_id: str, flush_every: int = 200) -> None:
        self.run_id = run_id
        self._client = client()
        self._pending: list = []
        self._flush_every = flush_every

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(prefix, dict(params)).items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self._client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, flush: bool = True) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if flush or len(self._pending) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:1000], self._pending[1000:]
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self._client.log_dict(self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)


def source_tags() -> dict[str, str]:
    """Where a run comes from, for the UI's Source column: the Prefect deployment that started
    it (type JOB), else the command line (type LOCAL); plus the git commit of the checkout
    Melos runs from, when it runs from one."""
    from prefect.runtime import deployment, flow_run

    if deployment.id:
        tags = {TAG_SOURCE_NAME: f"prefect deployment {flow_run.flow_name}/{deployment.name}", TAG_SOURCE_TYPE: "JOB"}
    else:
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        if prog in ("melos", "cli.py", "__main__.py"):
            prog = "melos"
        tags = {TAG_SOURCE_NAME: shlex.join([prog, *sys.argv[1:]])[:_MAX_PARAM_LEN], TAG_SOURCE_TYPE: "LOCAL"}
    commit = git_commit(_CHECKOUT)
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    return tags


def git_commit(path: Path) -> str | None:
    """HEAD of the git checkout at ``path``; None when it is not one (e.g. an installed wheel)."""
    if not (path / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def start_parent(experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
    run = client().create_run(experiment_id(experiment), run_name=run_name, tags={**source_tags(), **tags})
    stores.remember(tracking_uri())
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


@contextmanager
def stage_run(parent_run_id: str, stage: str, tags: Mapping[str, str] | None = None) -> Iterator[StageRun]:
    """A nested child run of ``parent_run_id``; FAILED if the block raises."""
    c = client()
    parent = c.get_run(parent_run_id)
    all_tags = {
        "mlflow.parentRunId": parent_run_id,
        TAG_STAGE: stage,
        **{
            k: v for k, v in parent.data.tags.items()
            if k in (TAG_FLOW_RUN, TAG_FLOW_RUN_NAME, TAG_SOURCE_NAME, TAG_SOURCE_TYPE, TAG_GIT_COMMIT)
        },
        **(tags or {}),
    }
    run = c.create_run(parent.info.experiment_id, run_name=stage, tags=all_tags)
    handle = StageRun(run.info.run_id)
    try:
        yield handle
    except BaseException:
        handle.flush()
        c.set_terminated(run.info.run_id, status="FAILED")
        raise
    handle.flush()
    c.set_terminated(run.info.run_id, status="FINISHED")


def run_url(run_id: str, experiment_id_: str | None = None) -> str | None:
    """A link into the MLflow UI when tracking to a server; None for a local store."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    exp = experiment_id_ or client().get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
