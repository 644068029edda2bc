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

from mlm_core.errors import UserError

from . import stores

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_FLOW_RUN = "prefect.flow_run_id"
TAG_FLOW_RUN_NAME = "prefect.flow_run_name"
TAG_STAGE = "melos.stage"
TAG_CACHED = "melos.cached"
TAG_TAKEN_OVER_BY = "melos.taken_over_by"
TAG_PROFILE = "melos.profile"  # the budget profile a --budget-minutes run took its settings from
TAG_PROFILE_WHY = "melos.profile_reason"
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


class TrackingOutage(UserError, RuntimeError):
    """The tracking server stayed unreachable for longer than the grace period."""


def check_reachable(timeout_s: float = 5.0) -> None:
    """Raise ``TrackingOutage`` at once when the tracking server does not answer at all, rather
    than let the next MLflow call wait out the client's own HTTP retries (minutes). Any HTTP
    answer counts as reachable; local stores need no check."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except httpx.TransportError as exc:
        raise TrackingOutage(
            f"the tracking server at {uri} does not answer ({type(exc).__name__}); the outputs so far are on disk: "
            "once it is back, run the same command again (with --resume if training had begun)"
        ) from None


class BackgroundSender:
    """Sends one run's metrics and tags from a thread, so training never waits on the server.

    While the server is away, batches wait in a bounded queue and are retried; when it is
    back they are sent in order, so nothing is lost. ``check()`` (called by the producer on
    every put) raises ``TrackingOutage`` once a batch has been failing for ``grace_s``.
    """

    def __init__(self, client_, run_id: str, grace_s: float, max_pending: int = 2_000_000) -> None:
        import threading

        self._client, self.run_id, self.grace_s, self._max = client_, run_id, grace_s, max_pending
        self._batches: list[tuple[list, list]] = []
        self._pending = 0
        self._failing_since: float | None = None  # when the batch now being sent was first tried
        self._last_error: BaseException | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"melos-mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    def put(self, metrics: list, tags: list = ()) -> None:
        self.check()
        with self._cv:
            if self._pending + len(metrics) > self._max:
                raise TrackingOutage(f"{self._max} metrics are waiting for the tracking server at {tracking_uri()}")
            self._batches.append((list(metrics), list(tags)))
            self._pending += len(metrics)
            self._cv.notify()

    def check(self) -> None:
        since = self._failing_since
        if since is not None and time.monotonic() - since > self.grace_s:
            raise TrackingOutage(
                f"the tracking server at {tracking_uri()} has not answered for {time.monotonic() - since:.0f}s "
                f"(grace period {self.grace_s:g}s, --tracking-grace): {self._last_error}; the checkpoints so far "
                "are on disk: once the server is back, run the same command with --resume"
            )

    def drain(self) -> None:
        """Wait until everything queued is sent; raises ``TrackingOutage`` after the grace period."""
        with self._cv:
            while self._batches:
                self._cv.wait(0.2)
                self.check()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._batches and not self._closed:
                    self._cv.wait()
                if not self._batches:
                    return
                metrics, tags = self._batches[0]
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            try:
                while metrics or tags:
                    chunk, rest = metrics[:1000], metrics[1000:]
                    self._client.log_batch(self.run_id, metrics=chunk, tags=tags)
                    with self._cv:  # a partly sent batch resumes where it stopped
                        self._batches[0] = (rest, [])
                        self._pending -= len(chunk)
                    metrics, tags = rest, []
            except Exception as exc:  # server away: keep the batch, try again shortly
                self._last_error = exc
                time.sleep(1.0)
                continue
            with self._cv:
                self._batches.pop(0)
                self._failing_since = None
                self._cv.notify_all()


class StageRun:
    """A thin handle on one MLflow run; metrics are buffered and sent in batches.

    With ``grace_s`` set, metrics and tags are sent by a ``BackgroundSender`` instead, and a
    tracking outage longer than ``grace_s`` seconds raises ``TrackingOutage`` at the next log call.
    """

    def __init__(self, run_id: str, flush_every: int = 200, grace_s: float | None = None) -> None:
        self.run_id = run_id
        self._client = client()
        self._pending: list = []
        self._flush_every = flush_every
        self._sender = BackgroundSender(self._client, run_id, grace_s) if grace_s is not None else None

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(prefix, dict(params)).items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items and self._sender is not None:
            self._sender.put(self._take_pending(), items)
        elif items:
            self._client.log_batch(self.run_id, tags=items)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, flush: bool = True) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if self._sender is not None:
            if len(self._pending) >= self._flush_every:
                self._sender.put(self._take_pending())
            else:
                self._sender.check()
            if flush:
                self.flush()
        elif flush or len(self._pending) >= self._flush_every:
            self.flush()

    def _take_pending(self) -> list:
        pending, self._pending = self._pending, []
        return pending

    def flush(self) -> None:
        """Send what is buffered; with a background sender, wait until all is sent (grace permitting)."""
        if self._sender is not None:
            if self._pending:
                self._sender.put(self._take_pending())
            self._sender.drain()
            return
        while self._pending:
            chunk, self._pending = self._pending[:1000], self._pending[1000:]
            self._client.log_batch(self.run_id, metrics=chunk)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()

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


def ensure_store() -> None:
    """Create the default SQLite store under a lock (``<db>.lock`` beside it).

    MLflow creates and migrates a new SQLite database on first use, and two processes doing
    that at once break it (alembic: "Online migration expected to match one row"); once it
    exists, concurrent runs are safe. Servers and other stores need nothing here.
    """
    path = stores.sqlite_path(tracking_uri())
    if path is None or str(path) == ":memory:":
        return
    from .locks import file_lock

    with file_lock(path.with_name(path.name + ".lock")):
        client().search_experiments(max_results=1)


def mark_taken_over(run_id: str, by_run_id: str) -> list[str]:
    """Mark a dead run's MLflow parent and its unfinished children KILLED, tagged with the run that
    took over; returns the ids marked. A run that already ended keeps its status."""
    c = client()
    try:
        parent = c.get_run(run_id)
    except Exception:  # e.g. the dead run logged to another store
        return []
    runs = [parent] + c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    marked = []
    for run in runs:
        if run.info.status in ("RUNNING", "SCHEDULED"):
            c.set_tag(run.info.run_id, TAG_TAKEN_OVER_BY, by_run_id)
            c.set_terminated(run.info.run_id, status="KILLED")
            marked.append(run.info.run_id)
    return marked


def start_parent(experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
    check_reachable()
    ensure_store()
    run = client().create_run(experiment_id(experiment), run_name=run_name, tags={**source_tags(), **tags})
    stores.remember(tracking_uri())
    return run.info.run_id


def end_status(exc: BaseException) -> str:
    """KILLED for a run stopped from outside (Ctrl-C, SIGTERM), FAILED for one that broke.

    Inside a flow run Prefect turns SIGTERM into its own ``TerminationSignal`` first."""
    from prefect.exceptions import TerminationSignal

    from .children import stop_requested

    stopped = isinstance(exc, (KeyboardInterrupt, SystemExit, TerminationSignal)) or stop_requested()
    return "KILLED" if stopped else "FAILED"


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


@contextmanager
def stage_run(
    parent_run_id: str, stage: str, tags: Mapping[str, str] | None = None, grace_s: float | None = None
) -> Iterator[StageRun]:
    """A nested child run of ``parent_run_id``; FAILED (KILLED when stopped) if the block raises.

    ``grace_s``: send metrics in the background, tolerating tracking outages that long (see
    ``StageRun``). After an outage the run is left for the next run to mark (the server is away)."""
    check_reachable()  # a stage never starts by waiting out an outage
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
    handle = StageRun(run.info.run_id, grace_s=grace_s)
    try:
        yield handle
        handle.flush()
    except TrackingOutage:
        handle.close()
        raise
    except BaseException as exc:
        try:
            handle.flush()
        finally:
            handle.close()
            c.set_terminated(run.info.run_id, status=end_status(exc))
        raise
    handle.close()
    c.set_terminated(run.info.run_id, status="FINISHED")


def run_url(run_id: str, experiment_id_: str | None = None) -> str | None:
    """A link into the MLflow UI when tracking to a server; None for a local store."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    exp = experiment_id_ or client().get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
