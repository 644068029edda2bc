"""The ``compare`` flow: one prepared dataset, a grid of training settings x seeds, one
child MLflow run per setting and seed under a comparison run, and a table and plots.

The data stages run once (cached as in ``pretrain``). Every setting trains for the same
steps on the same tokens with the same seeds (base seed, base seed + 1, ...), and is scored
with the same fixed evaluation masks, so differences can be read against the seed-to-seed
spread. Settings run one after another here, or, with ``deployment``, as flow runs of a
deployment of ``compare_setting`` (``run_deployment``) that a work pool runs in parallel;
the work directory must then be on storage every worker sees.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from mlm_core.config import DownloadConfig, EvalConfig, RuntimeConfig, TokenizeConfig, TrainConfig, VocabConfig
from mlm_core.download import download_key
from mlm_core.grid import as_params, csv_table, describe, markdown_table, setting_configs, summarise
from mlm_core.shards import tokenize_key
from mlm_core.vocab import vocab_key
from tasks import tracking
from tasks.download import download_stage
from tasks.evaluate import evaluate_stage
from tasks.finetune import downstream_task
from tasks.tokenize import tokenize_stage
from tasks.train import train_stage
from tasks.vocab import vocab_stage

from .pretrain import data_stage

TAG_COMPARISON = "melos.comparison"
TAG_SETTING = "melos.setting"
TAG_MODEL_DIR = "melos.model_dir"
CONTROL_LABEL = "random init (control)"
TABLE_METRICS = (
    "eval/top1_accuracy", "eval/top5_accuracy", "eval/wwm_top1_accuracy", "eval/pseudo_perplexity", "eval/loss",
    "eval/unigram_top1_accuracy",
)


@flow(name="compare-setting", description="Train and evaluate one setting of a comparison.")
def compare_setting(
    shards: dict, vocab: dict, train: TrainConfig, evaluate: EvalConfig, runtime: RuntimeConfig, workdir: str,
    comparison_run_id: str, label: str, downstream: list[str] | None = None, downstream_cfg: dict | None = None,
) -> dict:
    """Train ``train`` on the prepared data and evaluate it, in an MLflow run nested under
    ``comparison_run_id`` (tagged with the setting, for the MLflow UI's compare view); then
    fine-tune the model on each ``downstream`` task (``finetune/<task>/f1`` on the same run)."""
    client = tracking.client()
    parent = client.get_run(comparison_run_id)
    tags = {
        "mlflow.parentRunId": comparison_run_id, tracking.TAG_STAGE: "setting", TAG_COMPARISON: comparison_run_id,
        TAG_SETTING: label, "melos.seed": str(train.seed), tracking.TAG_FLOW_RUN: str(flow_run.id),
        tracking.TAG_FLOW_RUN_NAME: flow_run.name or "",
    }
    run_id = client.create_run(parent.info.experiment_id, run_name=f"{label} seed={train.seed}", tags=tags).info.run_id
    common = {"workdir": workdir, "parent_run_id": run_id}
    try:
        tracking.StageRun(run_id).log_params({"train": train.model_dump(), "evaluate": evaluate.model_dump()})
        trained = train_stage(shards=shards, vocab=vocab, cfg=train, runtime=runtime, resume=False, **common)
        report = evaluate_stage(shards=shards, vocab=vocab, trained=trained, cfg=evaluate, runtime=runtime, **common)
        tracking.StageRun(run_id).set_tags({TAG_MODEL_DIR: trained["model_dir"]})
        for task_ref in downstream or []:
            downstream_task(model_dir=trained["model_dir"], task_ref=task_ref, corpus=shards["dir"],
                            cfg={**(downstream_cfg or {}), "seeds": 1, "seed": train.seed, "baseline": "none"},
                            runtime=runtime, run_id=run_id)
    except BaseException as exc:  # KILLED when stopped (Ctrl-C, SIGTERM), else FAILED
        tracking.end_run(run_id, tracking.end_status(exc))
        raise
    tracking.end_run(run_id, "FINISHED")
    return {"label": label, "seed": train.seed, "mlflow_run_id": run_id, "metrics": report["metrics"],
            "model_dir": trained["model_dir"]}


def _fan_out(deployment: str, jobs: list[dict[str, Any]], poll_s: float = 2.0) -> None:
    """Start every job as a flow run of ``deployment`` at once, then wait until all end."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    started = [run_deployment(name=deployment, parameters=p, timeout=0) for p in jobs]
    logger.info("started %d flow runs of %s", len(started), deployment)
    pending = {fr.id: p["label"] for fr, p in zip(started, jobs)}
    failed = []
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(poll_s)
            for fr_id in list(pending):
                state = client.read_flow_run(fr_id).state
                if state is not None and state.is_final():
                    label = pending.pop(fr_id)
                    if not state.is_completed():
                        failed.append(f"{label} ({state.name}, flow run {fr_id})")
    if failed:
        raise RuntimeError(f"settings failed on the work pool: {'; '.join(failed)}; see their logs in the Prefect UI")


def collect_results(comparison_run_id: str) -> list[dict]:
    """Each finished setting run of the comparison, read back from MLflow (wherever it ran):
    label, seed, held-out metrics, and the training loss curve of its train stage."""
    client = tracking.client()
    parent = client.get_run(comparison_run_id)
    exp = [parent.info.experiment_id]
    runs = client.search_runs(exp, filter_string=f"tags.`{TAG_COMPARISON}` = '{comparison_run_id}'", max_results=5000,
                              order_by=["attributes.start_time ASC"])
    out = []
    for r in runs:
        if r.info.status != "FINISHED":
            continue
        [train_run] = client.search_runs(
            exp, filter_string=f"tags.mlflow.parentRunId = '{r.info.run_id}' and tags.`{tracking.TAG_STAGE}` = 'train'")
        history = client.get_metric_history(train_run.info.run_id, "train/loss")
        out.append({
            "label": r.data.tags[TAG_SETTING], "seed": int(r.data.tags["melos.seed"]), "mlflow_run_id": r.info.run_id,
            "metrics": {k: v for k, v in r.data.metrics.items() if k.startswith(("eval/", "finetune/"))},
            "model_dir": r.data.tags.get(TAG_MODEL_DIR),
            "loss_history": sorted([m.step, m.value] for m in history),
        })
    return out


@flow(name="compare", description="Compare training settings on one prepared dataset, over several seeds.")
def compare(
    grid: dict[str, list] | list[dict[str, Any]],
    seeds: int = 1,
    download: DownloadConfig = DownloadConfig(),
    tokenize: TokenizeConfig = TokenizeConfig(),
    vocab: VocabConfig = VocabConfig(),
    train: TrainConfig = TrainConfig(),
    evaluate: EvalConfig = EvalConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    workdir: str = "melos-work",
    experiment: str = "melos-compare",
    deployment: str | None = None,
    downstream: list[str] | None = None,
    downstream_cfg: dict | None = None,
) -> dict:
    """Prepare the data once, train and evaluate every setting x seed, and report.

    Args:
        grid: training setting name -> values to try (every combination is a setting), or a list
            of settings, each a mapping of the fields it changes ({} = the shared settings alone).
        seeds: runs per setting, with seeds train.seed, train.seed + 1, ...
        download: corpus sources. tokenize: sentence split and held-out share. vocab: WordPiece vocabulary.
        train: the settings every run shares (the grid overrides its fields).
        evaluate: the fixed evaluation masks. runtime: device and threads (speed only).
        workdir: stage outputs (shared storage when fanning out).
        experiment: MLflow experiment of the comparison run and its children.
        deployment: 'FLOW/DEPLOYMENT' of compare_setting to fan the settings out to (None: one after another here).
        downstream: tasks to fine-tune every trained model on (a file, aozora-authors, aozora-pos); the
            same architecture from random weights is fine-tuned with each seed as the control row.
        downstream_cfg: fine-tuning settings (epochs, max_steps, learning_rate, batch_size, ...).
    """
    logger = get_run_logger()
    jobs_cfg = setting_configs(train, grid, seeds)  # bad grids fail before any work
    workdir = str(Path(workdir).resolve())
    parent = tracking.start_parent(
        experiment, run_name=flow_run.name or "compare",
        tags={tracking.TAG_FLOW_RUN: str(flow_run.id), tracking.TAG_FLOW_RUN_NAME: flow_run.name or "",
              tracking.TAG_STAGE: "compare", TAG_COMPARISON: "parent"},
    )
    logger.info("comparison run %s: %d settings x %d seeds", parent, len(jobs_cfg) // seeds, seeds)
    common = {"workdir": workdir, "parent_run_id": parent}
    try:
        tracking.StageRun(parent).log_params(
            {"grid": as_params(grid), "seeds": seeds, "train": train.model_dump(),
             "evaluate": evaluate.model_dump(), "download": download.model_dump(), "workdir": workdir,
             "downstream": downstream or [], "downstream_cfg": downstream_cfg or {}}
        )
        documents = data_stage(download_stage, "download", download_key(download), cfg=download, **common)
        shards = data_stage(tokenize_stage, "tokenize", tokenize_key(documents["fingerprint"], tokenize),
                            documents=documents, cfg=tokenize, **common)
        vocabulary = data_stage(vocab_stage, "vocab", vocab_key(shards["fingerprint"], vocab), shards=shards,
                                cfg=vocab, **common)
        jobs = [
            {"shards": shards, "vocab": vocabulary, "train": cfg, "evaluate": evaluate, "runtime": runtime,
             "workdir": workdir, "comparison_run_id": parent, "label": label, "downstream": downstream or [],
             "downstream_cfg": downstream_cfg or {}}
            for label, _, cfg in jobs_cfg
        ]
        if deployment:
            _fan_out(deployment, [{**j, "train": j["train"].model_dump(), "evaluate": j["evaluate"].model_dump(),
                                   "runtime": j["runtime"].model_dump()} for j in jobs])
        else:
            for j in jobs:
                compare_setting(**j)
        results = collect_results(parent)
        order = {label: i for i, (label, _, _) in enumerate(jobs_cfg)}
        results.sort(key=lambda r: (order.get(r["label"], len(order)), r["seed"]))
        controls = _controls(parent, results, downstream or [], downstream_cfg or {}, shards, train, seeds, runtime)
        report = _report(parent, results, grid, seeds, train, controls)
    except BaseException as exc:  # KILLED when stopped (Ctrl-C, SIGTERM), else FAILED
        tracking.end_run(parent, tracking.end_status(exc))
        raise
    tracking.end_run(parent, "FINISHED")
    return {"mlflow_run_id": parent, "runs": results, "controls": controls, **report}


def _controls(parent: str, results: list[dict], downstream: list[str], cfg: dict, shards: dict, train: TrainConfig,
              seeds: int, runtime: RuntimeConfig) -> list[dict]:
    """The random-init control of every downstream task: the first setting's architecture from
    random weights, fine-tuned with each seed; as result rows labelled ``CONTROL_LABEL``."""
    model_dir = next((r["model_dir"] for r in results if r.get("model_dir")), None)
    if not downstream or model_dir is None:
        return []
    per_seed: list[dict] = [{} for _ in range(seeds)]
    for task_ref in downstream:
        out = downstream_task(model_dir=model_dir, task_ref=task_ref, corpus=shards["dir"],
                              cfg={**cfg, "seeds": seeds, "seed": train.seed, "baseline": "random"},
                              runtime=runtime, run_id=parent, control=True)
        for i, m in enumerate(out["per_seed"]):
            per_seed[i].update(m)
    return [{"label": CONTROL_LABEL, "seed": train.seed + i, "metrics": m} for i, m in enumerate(per_seed)]


def _report(parent: str, results: list[dict], grid: dict | list, seeds: int, train: TrainConfig,
            controls: list[dict] | None = None) -> dict:
    from tasks.compare_plots import accuracy_bars, downstream_bars, loss_curves, pos_bars

    metrics = [m for m in TABLE_METRICS if any(m in r["metrics"] for r in results)]
    metrics += sorted({k for r in results for k in r["metrics"] if k.startswith("finetune/")})
    pos = sorted({k for r in results for k in r["metrics"] if k.startswith("eval/pos/")})
    rows = summarise(results, metrics + pos)
    setting_rows = list(rows)
    if controls:
        rows += summarise(controls, metrics + pos)
    table = markdown_table(rows, metrics)
    steps = train.max_steps if train.max_steps else f"{train.epochs:g} epochs"
    md = "\n".join([
        "# Melos comparison", "",
        f"- **grid**: {describe(grid)}",
        f"- **seeds per setting**: {seeds} (from {train.seed}); **budget per run**: {steps} steps, same data and masks for evaluation",
        "- values are mean ± sample standard deviation over seeds; a difference smaller than the spreads is noise",
        *([f"- **downstream**: `finetune/<task>/f1` is the test F1 after fine-tuning each model (macro F1; entity F1 "
           f"for NER); the row '{CONTROL_LABEL}' fine-tunes the same architecture from random weights"]
          if controls else []),
        "", table, "",
    ])
    run = tracking.StageRun(parent)
    with tempfile.TemporaryDirectory(prefix="melos-compare-") as tmp:
        out = Path(tmp)
        (out / "comparison.md").write_text(md, encoding="utf-8")
        (out / "comparison.csv").write_text(csv_table(rows, metrics + pos), encoding="utf-8")
        loss_curves(results, out / "loss_curves.png")
        accuracy_bars(setting_rows, out / "accuracy.png")
        pos_bars(setting_rows, out / "pos_accuracy.png")
        if any(m.startswith("finetune/") for m in metrics):
            downstream_bars(rows, [m for m in metrics if m.startswith("finetune/") and m.endswith("/f1")],
                            out / "downstream.png")
        for f in sorted(out.iterdir()):
            run.log_artifact(f, "comparison")
    url = tracking.run_url(parent)
    create_markdown_artifact(
        markdown=(f"**MLflow comparison run:** `{parent}`" + (f" ([open in MLflow]({url}))" if url else "")
                  + "\n\n" + md + "\nPlots (loss curves, accuracy, per-POS accuracy) are in the MLflow run's "
                  "`comparison/` artifacts."),
        key="melos-comparison", description="Comparison of training settings",
    )
    return {"table": table, "markdown": md, "rows": rows}
