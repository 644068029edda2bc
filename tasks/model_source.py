"""Find a Melos model (and what the pipeline recorded about it) from an MLflow model URI,
a run id or a directory, for the CLI's ``fill-mask --model`` and ``export``.

Every failure is a ``LookupError`` with a one-line message naming the bad value.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from mlm_core.hf_export import CARD_FILE

from . import tracking
from .pyfunc_model import melos_model_dir

URI_SCHEMES = ("models:/", "runs:/")


def _first_line(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


class ModelNotInStore(LookupError):
    """The store holds no model at the URI (another store may)."""


def download_model(uri: str, dst: Path, store: str | None = None) -> Path:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH`` -> the local
    Melos model directory inside it, from ``store`` (default: the current tracking URI)."""
    if not uri.startswith(URI_SCHEMES):
        raise LookupError(
            f"{uri!r} is not an MLflow model URI; use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"
        )
    from mlflow.artifacts import download_artifacts

    store = store or tracking.tracking_uri()
    try:
        # MLflow resolves models:/ against the default registry (./mlflow.db, created by asking),
        # whatever registry_uri says: name the store for this call through the environment too
        with _store_env(store):
            local = download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=store, registry_uri=store)
    except Exception as exc:
        raise ModelNotInStore(f"no model at {uri} in the MLflow store {store}: {_first_line(exc)}") from None
    model_dir = melos_model_dir(local)
    if not (model_dir / "model.pt").is_file():
        raise LookupError(f"{uri} is not a Melos model (no model.pt in it); log one with `melos pretrain`")
    return model_dir


@contextlib.contextmanager
def _store_env(store: str):
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {n: os.environ.get(n) for n in names}
    os.environ.update({n: store for n in names})
    try:
        yield
    finally:
        for n, v in before.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def card_next_to(model_dir: Path) -> dict | None:
    """The pipeline's record beside a train run's ``model/`` (or one of its checkpoints),
    or inside a downloaded MLflow Model."""
    # run dir/model, run dir/checkpoints/step-*, downloaded MLflow Model/artifacts/model
    for candidate in (model_dir.parent / CARD_FILE, model_dir.parent.parent / CARD_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    return None


def card_for_run(run_id: str, dst: Path, store: str | None = None) -> dict | None:
    """``card.json`` of the pipeline run that ``run_id`` is (or is a stage of), in ``store``
    (default: the current tracking URI)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    store = store or tracking.tracking_uri()
    client = MlflowClient(store)
    try:
        run = client.get_run(run_id)
        parent = run.data.tags.get("mlflow.parentRunId", run_id)
        path = download_artifacts(run_id=parent, artifact_path=CARD_FILE, dst_path=str(dst), tracking_uri=store)
    except Exception:
        return None  # older runs have no card; the export says what it does not know
    return json.loads(Path(path).read_text(encoding="utf-8"))
