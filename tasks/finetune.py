"""Prefect task of ``melos finetune``: load the model and the task, fine-tune with the random-init
control (``mlm_core.finetune``), and record it: an MLflow run linked to the model's run (params,
``finetune/<task>/...`` metrics, the fine-tuned model as a logged model, the result JSON) and a
Prefect table artifact."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mlm_core.errors import UserError
from mlm_core.finetune_data import BUILTIN_TASKS, TaskDataError

from . import tracking

TAG_MODEL_RUN = "melos.model_run_id"
STAGE = "finetune"  # the stage tag keeps these runs out of `melos runs` and `latest`
LOGGED_MODEL_NAME = "finetuned"


class ModelLoadError(UserError, ValueError):
    """The model directory cannot be loaded; the message is one line."""


def load_encoder(model_dir: str | Path, device):
    """(BertForMaskedLM, WordPieceTokenizer) from a Melos model directory, or from a Hugging Face
    directory through ``mlm_core.hf_import`` when this Melos has it."""
    from mlm_core.checkpoint import load_pretrained

    if check_model_dir(model_dir) == "melos":
        return load_pretrained(Path(model_dir), device)
    from mlm_core.hf_import import load_hf_pretrained

    return load_hf_pretrained(Path(model_dir), device)


def check_model_dir(model_dir: str | Path) -> str:
    """"melos" or "hf" for a loadable model directory; ModelLoadError (one line) otherwise."""
    from mlm_core.checkpoint import CONFIG, MODEL, VOCAB

    path = Path(model_dir)
    if not (path / CONFIG).is_file():
        raise ModelLoadError(f"{path}: no config.json; pass a Melos model directory, a run id or a Hugging Face model directory")
    if (path / MODEL).is_file():
        if not (path / VOCAB).is_file():
            raise ModelLoadError(f"{path}: the model has no tokenizer (vocab.txt missing); copy the run's vocab.txt beside it")
        return "melos"
    if not (path / "vocab.txt").is_file():
        raise ModelLoadError(f"{path}: the Hugging Face model has no tokenizer (vocab.txt missing); save its tokenizer there")
    try:
        from mlm_core.hf_import import load_hf_pretrained  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"{path} is a Hugging Face model directory, and this Melos cannot load those (mlm_core.hf_import "
            "is missing); export a Melos run instead or update Melos"
        ) from None
    return "hf"


def task_name(task_ref: str) -> str:
    return task_ref if task_ref in BUILTIN_TASKS else Path(task_ref).stem


def load_task(task_ref: str, task_type: str | None, dev: str | None, test: str | None, corpus: str | None,
              model_dir: str, doc_ids: set[str] | None, seed: int, columns: dict | None = None):
    from mlm_core.finetune_data import builtin_task, find_corpus, guess_kind, load_task_files

    if task_ref in BUILTIN_TASKS:
        tokenize_dir, documents = find_corpus(Path(corpus or model_dir), doc_ids)
        return builtin_task(task_ref, tokenize_dir, documents, seed=seed)
    path = Path(task_ref)
    if not path.is_file():
        raise TaskDataError(f"{task_ref}: no such file, and not a built-in task ({', '.join(BUILTIN_TASKS)})")
    kind = {"classification": "classification", "ner": "ner"}.get(task_type or "") or guess_kind(path)
    return load_task_files(path, kind, dev, test, seed=seed, **(columns or {}))


def metric_names(task: str, summary: dict) -> dict[str, float]:
    """The stable names: finetune/<task>/f1, .../random_f1, .../gain, accuracy and spreads."""
    keys = ("f1", "f1_std", "accuracy", "accuracy_std", "random_f1", "random_f1_std", "random_accuracy",
            "random_accuracy_std", "gain", "accuracy_gain")
    out = {f"finetune/{task}/{k}": float(summary[k]) for k in keys if k in summary}
    if "separated" in summary:
        out[f"finetune/{task}/separated"] = float(summary["separated"])
    return out


def table_rows(result: dict) -> list[dict]:
    rows = []
    for r in result["runs"]:
        rows.append({"init": r["init"], "seed": r["seed"], "test_f1": round(r["test"]["f1"], 4),
                     "test_accuracy": round(r["test"]["accuracy"], 4),
                     "dev_f1": round(r["dev"]["f1"], 4) if "dev" in r else None,
                     "steps": r["steps"], "seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"]})
    return rows


def _setup(model_dir: str, cfg: dict, runtime):
    """Threads, device and autocast from ``runtime``; the model's encoder and tokenizer; the settings."""
    import torch

    from mlm_core.finetune import FinetuneConfig
    from mlm_core.train import resolve_device

    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    device, amp = resolve_device(runtime)
    encoder, tokenizer = load_encoder(model_dir, device)
    return device, amp, encoder, tokenizer, FinetuneConfig(**cfg, compile=runtime.compile)


@task(name="finetune", cache_policy=NO_CACHE, persist_result=False)
def finetune_task(
    model_dir: str, task_ref: str, out_dir: str, parent_run_id: str, cfg: dict, runtime, task_type: str | None = None,
    dev: str | None = None, test: str | None = None, corpus: str | None = None, doc_ids: list[str] | None = None,
    columns: dict | None = None, model_run_id: str | None = None,
) -> dict:
    from prefect.artifacts import create_table_artifact

    from mlm_core.finetune import finetune, save_finetuned
    from mlm_core.io import atomic_write_json

    logger = get_run_logger()
    device, amp, encoder, tokenizer, settings = _setup(model_dir, cfg, runtime)
    data = load_task(task_ref, task_type, dev, test, corpus, model_dir, set(doc_ids) if doc_ids else None,
                     settings.seed, columns)
    name = task_name(task_ref)
    logger.info("%s: %s task, %d labels, split %s (train %d, dev %d, test %d)", name, data.kind, len(data.labels),
                data.split.get("method"), len(data.train), len(data.dev), len(data.test))
    run = tracking.StageRun(parent_run_id)
    run.log_params({"task": task_ref, "kind": data.kind, "labels": len(data.labels), "model_dir": model_dir,
                    **{f"finetune.{k}": v for k, v in cfg.items()},
                    **{f"split.{k}": v for k, v in data.split.items() if not isinstance(v, (list, dict))}})
    out = Path(out_dir)
    # finished arms are kept under arms/, so running the same command again after an interruption
    # (out_dir is keyed by the model, task and settings) resumes at the first unfinished arm
    result = finetune(encoder, tokenizer, data, settings, device, amp, log=logger.info, arms_dir=out / "arms")
    out.mkdir(parents=True, exist_ok=True)
    record = {**result.as_dict(), "task_ref": task_ref, "model_dir": model_dir, "settings": cfg}
    atomic_write_json(out / "result.json", record)
    model_path = save_finetuned(out / "model", result.model, tokenizer, result.labels,
                                {"task": name, "base_model": model_dir, "base_run_id": model_run_id,
                                 "finetune_run_id": parent_run_id})
    from mlm_core.finetune_export import export_finetuned_hf

    hf_dir = export_finetuned_hf(result.model, tokenizer, result.labels, out / "hf")
    metrics = metric_names(name, result.summary)
    run.log_metrics(metrics)
    for i, r in enumerate(result.runs):
        prefix = f"finetune/{name}/{'seed' if r['init'] == 'pretrained' else 'random_seed'}"
        run.log_metrics({f"{prefix}_f1": r["test"]["f1"], f"{prefix}_accuracy": r["test"]["accuracy"]}, step=r["seed"])
    run.log_artifact(out / "result.json")
    run.log_artifact(hf_dir, "hf")  # BertForSequenceClassification / BertForTokenClassification
    model_uri = _log_model(parent_run_id, model_path, name, data.kind)
    rows = table_rows(record)
    s = result.summary
    desc = (f"{name}: f1 {s['f1']:.4f} ± {s['f1_std']:.4f}"
            + (f", random-init {s['random_f1']:.4f} ± {s['random_f1_std']:.4f}, gain {s['gain']:+.4f}"
               f" ({'beyond' if s['separated'] else 'within'} the seed spread)" if "gain" in s else "")
            + f"; MLflow run {parent_run_id}")
    create_table_artifact(table=rows, key="melos-finetune", description=desc)
    logger.info(desc)
    return {"task": name, "kind": data.kind, "metrics": metrics, "summary": s, "runs": rows, "split": data.split,
            "truncated": result.truncated, "model_dir": str(model_path), "hf_dir": str(hf_dir), "model_uri": model_uri,
            "result": str(out / "result.json")}


def _log_model(run_id: str, model_path: Path, name: str, kind: str) -> str | None:
    """The fine-tuned model directory as an MLflow logged model of the run."""
    client = tracking.client()
    try:
        logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=LOGGED_MODEL_NAME,
                                            source_run_id=run_id, model_type=f"finetune-{kind}",
                                            tags={"melos.task": name})
        client.log_model_artifacts(logged.model_id, str(model_path))
        client.finalize_logged_model(logged.model_id, "READY")
    except Exception as exc:  # an older server without logged models: the run keeps the files
        get_run_logger().warning("could not log the model as a logged model (%s); logging it as run artifacts",
                                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        client.log_artifacts(run_id, str(model_path), "model")
        return f"runs:/{run_id}/model"
    return f"models:/{logged.model_id}"


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2)


@task(name="downstream", cache_policy=NO_CACHE, persist_result=False)
def downstream_task(model_dir: str, task_ref: str, corpus: str | None, cfg: dict, runtime, run_id: str,
                    control: bool = False) -> dict:
    """Fine-tune one model on one task for ``melos compare --downstream`` and log
    ``finetune/<task>/f1`` and ``.../accuracy`` to ``run_id``. ``control``: the same architecture
    from random weights instead (the comparison's control row)."""
    from mlm_core.finetune import finetune

    logger = get_run_logger()
    device, amp, encoder, tokenizer, settings = _setup(model_dir, cfg, runtime)
    data = load_task(task_ref, None, None, None, corpus, model_dir, None, settings.seed)
    result = finetune(encoder, tokenizer, data, settings, device, amp, log=logger.info,
                      inits=["random"] if control else ["pretrained"])
    name = task_name(task_ref)
    prefix = "random_" if control else ""
    s = result.summary
    metrics = {f"finetune/{name}/f1": s[f"{prefix}f1"], f"finetune/{name}/accuracy": s[f"{prefix}accuracy"]}
    if control:  # one value per seed, for the comparison's spread
        per_seed = [{f"finetune/{name}/f1": r["test"]["f1"], f"finetune/{name}/accuracy": r["test"]["accuracy"]}
                    for r in result.runs]
    else:
        per_seed = [metrics]
    run = tracking.StageRun(run_id)
    for i, m in enumerate(per_seed):
        run.log_metrics(m, step=i)
    return {"task": name, "metrics": metrics, "per_seed": per_seed}
