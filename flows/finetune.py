"""The ``finetune`` flow: fine-tune a pre-trained model on a labelled task, beside the same
architecture from random weights (``melos finetune``; a deployment in prefect.yaml)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from mlm_core.config import RuntimeConfig
from mlm_core.io import fingerprint
from tasks import tracking
from tasks.finetune import STAGE, TAG_MODEL_RUN, finetune_task, task_name


@flow(name="finetune", description="Fine-tune a Melos model on a labelled task, against a random-init control.")
def finetune_flow(
    model_dir: str,
    task: str,
    task_type: str | None = None,
    dev: str | None = None,
    test: str | None = None,
    corpus: str | None = None,
    model_run_id: str | None = None,
    doc_ids: list[str] | None = None,
    seeds: int = 3,
    baseline: str = "random",
    epochs: float = 3.0,
    max_steps: int | None = None,
    minutes: float | None = None,
    learning_rate: float = 3e-4,
    batch_size: int = 32,
    seed: int = 0,
    columns: dict | None = None,
    runtime: RuntimeConfig = RuntimeConfig(),
    workdir: str = "melos-work",
    experiment: str = "melos",
) -> dict:
    """Fine-tune ``model_dir`` on ``task`` with ``seeds`` seeds (and the random-init control).

    Args:
        model_dir: a Melos model directory (``melos finetune`` downloads it from a run), or a
            Hugging Face BERT directory.
        task: a labelled file (JSONL/CSV/Parquet with text[, text_b], label; or CoNLL IOB2), or a
            built-in task: aozora-authors, aozora-pos.
        task_type: classification or ner (default: from the file's suffix).
        dev: a dev file (default: split from the training file).
        test: a test file (default: a seeded split of the training file; k-fold when small).
        corpus: for built-in tasks, the pre-training work directory or tokenize stage directory
            (default: found from the model's directory).
        model_run_id: the MLflow run of the model, tagged on this run.
        doc_ids: the documents the model was trained on (picks its corpus for built-in tasks).
        seeds: seeds per arm; the spread is over these.
        baseline: "random" (the same architecture from random weights, same settings) or "none".
        epochs: passes over the training split.
        max_steps: cap on optimizer steps per training run.
        minutes: time budget per training run.
        learning_rate: AdamW peak learning rate (warm-up 10%, linear decay).
        batch_size: sequences per batch (as a token budget; sequences are packed).
        seed: first seed (seeds are seed, seed+1, ...); also the seed of the data split.
        columns: text_column / text_b_column / label_column of a table file.
        runtime: device, precision, threads, compile (speed only).
        workdir: directory for outputs (``<workdir>/finetune/<key>/``).
        experiment: MLflow experiment name.
    """
    logger = get_run_logger()
    name = task_name(task)
    tags = {tracking.TAG_FLOW_RUN: str(flow_run.id), tracking.TAG_FLOW_RUN_NAME: flow_run.name or "",
            tracking.TAG_STAGE: STAGE, TAG_MODEL_RUN: model_run_id or "", "melos.model_dir": model_dir,
            "melos.task": name}
    parent = tracking.start_parent(experiment, run_name=f"finetune {name}", tags=tags)
    logger.info("MLflow run %s fine-tunes %s on %s", parent, model_run_id or model_dir, task)
    cfg = {"epochs": epochs, "max_steps": max_steps, "minutes": minutes, "learning_rate": learning_rate,
           "batch_size": batch_size, "seeds": seeds, "seed": seed, "baseline": baseline}
    key = fingerprint("finetune", model_dir, model_run_id, task, task_type, dev, test, corpus, cfg)
    out_dir = Path(workdir).resolve() / "finetune" / key
    try:
        result = finetune_task(model_dir=model_dir, task_ref=task, out_dir=str(out_dir), parent_run_id=parent,
                               cfg=cfg, runtime=runtime, task_type=task_type, dev=dev, test=test, corpus=corpus,
                               doc_ids=doc_ids, columns=columns, model_run_id=model_run_id)
    except BaseException as exc:
        tracking.end_run(parent, tracking.end_status(exc))
        raise
    tracking.end_run(parent, "FINISHED")
    return {"mlflow_run_id": parent, "model_run_id": model_run_id, **result}
