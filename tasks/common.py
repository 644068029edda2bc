"""Shared plumbing of the stage tasks: where outputs live, cache keys, stage records.

A stage's output directory is named by its key (a fingerprint of its inputs' content and
its config), so a cache hit always points at a complete directory. Prefect caches the
small record a task returns under ``melos-<stage>-<key>-<workdir hash>``; the flow asks for a
fresh run when the directory has vanished (``run_cached``), so a deleted work directory
never yields a stale cache hit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlm_core.io import fingerprint, read_json

MANIFEST = "manifest.json"


def stage_dir(workdir: str | Path, stage: str, key: str) -> Path:
    return Path(workdir).resolve() / stage / key


def cache_key(stage: str, key: str, workdir: str | Path) -> str:
    return f"melos-{stage}-{key}-{fingerprint(str(Path(workdir).resolve()), length=8)}"


def cache_key_fn(stage: str, key_of: Callable[[dict[str, Any]], str]) -> Callable:
    """A Prefect ``cache_key_fn`` from a function of the task's parameters."""

    def compute(_context, parameters: dict[str, Any]) -> str:
        return cache_key(stage, key_of(parameters), parameters["workdir"])

    return compute


def record(stage: str, out_dir: Path, key: str, manifest: dict, mlflow_run_id: str, **extra: Any) -> dict:
    """What a stage task returns: small, JSON-able, enough to find its outputs."""
    from prefect.runtime import flow_run

    return {
        "stage": stage,
        "dir": str(out_dir),
        "key": key,
        "fingerprint": manifest.get("fingerprint", key),
        "counts": manifest.get("counts", {}),
        "mlflow_run_id": mlflow_run_id,
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        **extra,
    }


def run_cached(task, out_dir: Path, **kwargs: Any) -> dict:
    """Call a cached stage task, refreshing its cache when its output directory is gone, or
    when it left files out after failures (a re-run retries them; the rest is in the raw cache)."""
    manifest = out_dir / MANIFEST
    fresh = not manifest.is_file() or bool(read_json(manifest).get("failures"))
    return task.with_options(refresh_cache=fresh)(**kwargs)


def stage_progress(stage: str, unit: str = "documents"):
    """A progress reporter for a stage: a bar or log lines, and a Prefect progress artifact
    (``melos-<stage>-progress``) so the Prefect UI shows where a run is."""
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from mlm_core.progress import Progress

    artifact = create_progress_artifact(0.0, key=f"melos-{stage}-progress", description=f"{stage}: {unit} done (%)")

    def report(done: int, total: int) -> None:
        update_progress_artifact(artifact, progress=100.0 * done / total if total else 100.0)

    return Progress(stage, unit, listeners=(report,), log=get_run_logger().info)


def log_corpus_dataset(run_ids: list[str], name: str, fingerprint_: str, location: str, profile: dict) -> None:
    """Record the corpus as an MLflow dataset input (name, digest, source, counts) of each run,
    so the MLflow UI shows what a run was trained on."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from .tracking import client

    dataset = Dataset(
        name=name,
        digest=fingerprint_,
        source_type="local",
        source=json.dumps({"uri": location}),
        profile=json.dumps(profile, ensure_ascii=False),
    )
    c = client()
    for run_id in run_ids:
        c.log_inputs(run_id, [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])])
