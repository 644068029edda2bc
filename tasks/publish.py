"""Prefect task after evaluation: the model as an MLflow Model, optionally registered and
promoted to the ``champion`` alias by a gate on held-out top-1 accuracy.

The pyfunc model is logged into the pipeline's parent run under the name ``model`` (the
train stage's run already holds the raw model files at artifact path ``model``), so
``runs:/<pipeline run id>/model`` is the MLflow Model and ``melos fill-mask --run`` keeps
reading the train run's files. ``card.json`` (corpus provenance, metrics, run ids) is
written beside the trained model and into the MLflow Model, for the Hugging Face export's
model card.

The gate compares like with like: a version records a key of the data its top-1 was
measured on (held-out shards, vocabulary, sequence length, evaluation mask). When the
champion's key differs, the champion is scored again on this run's held-out sentences
with the same mask settings instead of comparing numbers from different data.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mlm_core.config import EvalConfig, RuntimeConfig
from mlm_core.hf_export import CARD_FILE
from mlm_core.io import atomic_write_json, fingerprint, read_json

from . import stores, tracking
from .common import MANIFEST

CHAMPION = "champion"
MODEL_NAME = "model"  # runs:/<parent run id>/model
TAG_EVAL_KEY, TAG_TOP1, TAG_RUN = "melos.eval_key", "melos.heldout_top1", "melos.mlflow_run_id"
TAG_DECISION = "melos.promotion"
EXAMPLE_TEXTS = ["メロスは[MASK]した。", "私は、[MASK]を信じている。"]


def eval_data_key(shards: dict, vocab: dict, max_length: int, cfg: EvalConfig) -> str:
    """What a held-out top-1 was measured on; equal keys -> comparable numbers."""
    mask = {k: v for k, v in cfg.fingerprint_fields().items() if k in ("mask_rate", "seed", "passes")}
    return fingerprint("heldout-eval", shards["fingerprint"], vocab["fingerprint"], max_length, mask)


def promotion_decision(new_top1: float, champion: dict | None) -> tuple[bool, str]:
    """(promote?, why). ``champion``: {"version", "top1", "basis"} or None when there is none."""
    if champion is None:
        return True, f"first version with the alias: held-out top-1 {new_top1:.4f}"
    if new_top1 > champion["top1"]:
        return True, (f"held-out top-1 {new_top1:.4f} beats champion version {champion['version']}'s "
                      f"{champion['top1']:.4f} ({champion['basis']})")
    return False, (f"held-out top-1 {new_top1:.4f} does not beat champion version {champion['version']}'s "
                   f"{champion['top1']:.4f} ({champion['basis']})")


def build_card(documents: dict, trained: dict, report: dict, parent_run_id: str, flow_run_id: str | None,
               cfg: EvalConfig) -> dict:
    manifest = read_json(Path(documents["dir"]) / MANIFEST)
    uri = tracking.tracking_uri()
    return {
        "mlflow_run_id": parent_run_id,
        "train_run_id": trained["mlflow_run_id"],
        "tracking_uri": uri if uri.startswith(("http://", "https://")) else None,
        "prefect_flow_run_id": flow_run_id,
        "documents": [
            {k: d.get(k) for k in ("doc_id", "source", "member", "title", "author", "provenance", "text_chars")}
            for d in manifest["documents"]
        ],
        "metrics": report["metrics"],
        "initial_metrics": report.get("initial_metrics"),
        "eval_mask": (f"{cfg.mask_rate:.0%} of held-out tokens replaced by [MASK] (seed {cfg.seed}, "
                      f"{cfg.passes} pass(es) with distinct fixed masks)."),
    }


def log_pyfunc(model_dir: Path, card_path: Path, parent_run_id: str):
    """Log the pyfunc into the parent run; returns MLflow's ModelInfo."""
    from importlib.metadata import version

    import mlflow
    import pandas as pd
    from mlflow.models import Model, infer_signature
    from mlflow.pyfunc import PythonModelContext

    from .pyfunc_model import CARD_ARTIFACT, MODEL_ARTIFACT, TEXT_COLUMN, MelosFillMask

    example = pd.DataFrame({TEXT_COLUMN: EXAMPLE_TEXTS})
    probe = MelosFillMask()
    probe.load_context(PythonModelContext(artifacts={MODEL_ARTIFACT: str(model_dir)}, model_config=None))
    with warnings.catch_warnings():  # MLflow's hints about type hints and integer columns
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, probe.predict(None, example), params={"top_k": 5})
    # Created here, in the run's experiment: left to itself MLflow would file the model
    # under the process-wide "active" experiment, where runs:/<id>/model cannot find it.
    client = tracking.client()
    logged = client.create_logged_model(
        client.get_run(parent_run_id).info.experiment_id, name=MODEL_NAME, source_run_id=parent_run_id,
        model_type="fill-mask",
    )
    return Model.log(
        artifact_path=None,  # MLflow 3 names models instead (and lets the run id be given)
        name=MODEL_NAME,
        flavor=mlflow.pyfunc,
        run_id=parent_run_id,
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),  # models from code: nothing pickled
        artifacts={MODEL_ARTIFACT: str(model_dir), CARD_ARTIFACT: str(card_path)},
        signature=signature,
        input_example=example,
        # explicit, so MLflow does not start a process to guess them; serving uses the
        # environment Melos is installed in (--env-manager local)
        pip_requirements=[f"melos=={version('melos')}"],
        model_id=logged.model_id,
    )


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging and registration read the process-wide tracking URI: point it
    at ours for the duration, then put back both it and ``MLFLOW_TRACKING_URI`` (which
    ``mlflow.set_tracking_uri`` rewrites, and unsets when restoring "no URI")."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    env_before, global_before = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(global_before)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


@task(name="publish", cache_policy=NO_CACHE, persist_result=False)
def publish_stage(
    documents: dict, shards: dict, vocab: dict, trained: dict, report: dict, cfg: EvalConfig,
    runtime: RuntimeConfig, parent_run_id: str, register_as: str | None = None,
) -> dict:
    from prefect.runtime import flow_run

    logger = get_run_logger()
    tracking.check_reachable()  # the uploads would otherwise wait out an outage
    model_dir = Path(trained["model_dir"])
    card_path = Path(trained["dir"]) / CARD_FILE
    atomic_write_json(card_path, build_card(documents, trained, report, parent_run_id, str(flow_run.id), cfg))
    tracking.StageRun(parent_run_id).log_artifact(card_path)
    with fluent_tracking_uri(tracking.tracking_uri()):
        info = log_pyfunc(model_dir, card_path, parent_run_id)
        registered = register_and_gate(register_as, info.model_uri, trained, shards, vocab, report, cfg,
                                       runtime, parent_run_id) if register_as else None
    model_uri = f"runs:/{parent_run_id}/{MODEL_NAME}"
    logger.info("MLflow Model %s (%s)", model_uri, info.model_uri)
    out = {"stage": "publish", "model_uri": model_uri, "logged_model_uri": info.model_uri, "card": str(card_path)}
    lines = [f"**MLflow Model:** `{model_uri}`", ""]
    if registered:
        out["registered"] = registered
        verdict = "promoted to" if registered["promoted"] else "not promoted to"
        logger.info("registered %s version %s, %s @%s: %s", register_as, registered["version"], verdict,
                    CHAMPION, registered["reason"])
        lines += [
            f"**Registered:** `{register_as}` version {registered['version']}",
            "",
            f"**Alias `{CHAMPION}`:** {verdict} this version: {registered['reason']}.",
            "",
            f"Serve the champion: `mlflow models serve -m models:/{register_as}@{CHAMPION} --env-manager local`",
        ]
    create_markdown_artifact(markdown="\n".join(lines), key="melos-model",
                             description="MLflow Model, registration and promotion of the pretrain flow run")
    return out


def gate_lock_name(model_name: str) -> str:
    """The Prefect global concurrency limit that serialises the gate of ``model_name``."""
    return "melos-registry-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)


@contextmanager
def gate_lock(model_name: str, timeout_s: float = 1800.0) -> Iterator[None]:
    """Hold the champion gate of ``model_name`` against every other run deciding about it.

    The gate reads the alias, compares, then moves it; two runs doing that at once could
    both read the old champion and the worse one could write last. A local store (SQLite
    file or ``file:`` directory) is locked with a file lock beside it. Any other store
    (a tracking server) is locked with a Prefect global concurrency limit of one slot,
    created on first use: every run launched through the same Prefect server, on any worker
    machine, waits for it. Its slot is leased, so a run killed while holding it frees it
    when the lease (60 s) runs out.
    """
    uri = tracking.tracking_uri()
    local = stores.sqlite_path(uri)  # the database file, or the file store's directory
    if local is None and (uri.startswith("file:") or "://" not in uri):
        local = Path(uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:"))
    if local is not None and str(local) != ":memory:":
        from .locks import file_lock

        with file_lock(local.with_name(f"{local.name}.{gate_lock_name(model_name)}.lock")):
            yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = gate_lock_name(model_name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    with concurrency(limit, occupy=1, timeout_seconds=timeout_s, strict=True, lease_duration=60):
        yield


def register_and_gate(name: str, logged_uri: str, trained: dict, shards: dict, vocab: dict, report: dict,
                      cfg: EvalConfig, runtime: RuntimeConfig, parent_run_id: str) -> dict:
    import mlflow

    from mlm_core.checkpoint import read_meta

    client = tracking.client()
    max_length = read_meta(Path(trained["model_dir"]))["model"]["max_position_embeddings"]
    key = eval_data_key(shards, vocab, max_length, cfg)
    top1 = float(report["metrics"]["eval/top1_accuracy"])
    version = mlflow.register_model(logged_uri, name, tags={TAG_EVAL_KEY: key, TAG_TOP1: repr(top1),
                                                             TAG_RUN: parent_run_id}).version
    return gate(client, name, version, key, top1, shards, cfg, runtime)


def gate(client, name: str, version: str, key: str, top1: float, shards: dict, cfg: EvalConfig,
         runtime: RuntimeConfig) -> dict:
    """Move the champion alias to ``version`` if its ``top1`` beats the champion's; the read,
    the comparison and the write happen under ``gate_lock``, one run at a time."""
    with gate_lock(name):
        return _gate(client, name, version, key, top1, shards, cfg, runtime)


def _gate(client, name: str, version: str, key: str, top1: float, shards: dict, cfg: EvalConfig,
          runtime: RuntimeConfig) -> dict:
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    champion = None
    if current is not None:
        if current.tags.get(TAG_EVAL_KEY) == key and TAG_TOP1 in current.tags:
            champion = {"version": current.version, "top1": float(current.tags[TAG_TOP1]),
                        "basis": "measured on the same held-out data"}
        else:
            champion = {"version": current.version,
                        "top1": rescore(f"models:/{name}/{current.version}", shards, cfg, runtime),
                        "basis": "champion re-scored on this run's held-out data, which differs from its own"}
    promoted, reason = promotion_decision(top1, champion)
    client.set_model_version_tag(name, version, TAG_DECISION, ("promoted: " if promoted else "not promoted: ") + reason)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return {"name": name, "version": str(version), "promoted": promoted, "reason": reason,
            "champion_before": champion and champion["version"]}


def rescore(model_uri: str, shards: dict, cfg: EvalConfig, runtime: RuntimeConfig) -> float:
    """Held-out top-1 of a registered model on this run's held-out sentences, tokenised
    with the model's own vocabulary (the unigram baseline is not needed here)."""
    from mlflow.artifacts import download_artifacts

    from mlm_core.checkpoint import load_pretrained
    from mlm_core.data import EncodedCorpus, encode_shards
    from mlm_core.evaluate import evaluate_heldout
    from mlm_core.shards import shard_paths
    from mlm_core.train import resolve_device

    from .pyfunc_model import melos_model_dir

    device, _ = resolve_device(runtime)
    with tempfile.TemporaryDirectory(prefix="melos-champion-") as tmp:
        local = download_artifacts(artifact_uri=model_uri, dst_path=tmp, tracking_uri=tracking.tracking_uri())
        model, tokenizer = load_pretrained(melos_model_dir(local), device)
        max_length = model.config.max_position_embeddings
        paths = shard_paths(Path(shards["dir"]), "heldout", read_json(Path(shards["dir"]) / MANIFEST))
        encoded = encode_shards(paths, tokenizer, Path(tmp) / "heldout", max_length, key="champion")
        metrics = evaluate_heldout(model, tokenizer, EncodedCorpus(encoded), np.zeros(len(tokenizer), np.int64),
                                   cfg, device)
    return float(metrics["eval/top1_accuracy"])
