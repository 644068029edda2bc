"""The ``pretrain`` flow: download -> tokenize -> vocab -> train -> evaluate.

Wiring only; each stage is a task in ``tasks/`` and the work is in ``mlm_core``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from mlm_core.config import DownloadConfig, EvalConfig, RuntimeConfig, TokenizeConfig, TrainConfig, VocabConfig
from mlm_core.download import download_key
from mlm_core.shards import tokenize_key
from mlm_core.train import ResumeError
from mlm_core.vocab import vocab_key
from tasks import locks, tracking
from tasks.common import run_cached, stage_dir
from tasks.download import download_stage
from tasks.evaluate import evaluate_stage, initial_evaluate_stage
from tasks.publish import publish_stage
from tasks.tokenize import tokenize_stage
from tasks.train import train_run_dir, train_stage
from tasks.vocab import adopt_vocab_stage, adopted_key, vocab_stage


@flow(name="pretrain", description="Pre-train a Japanese BERT masked LM (from scratch, or continuing a checkpoint) and evaluate it.")
def pretrain(
    download: DownloadConfig = DownloadConfig(),
    tokenize: TokenizeConfig = TokenizeConfig(),
    vocab: VocabConfig = VocabConfig(),
    train: TrainConfig = TrainConfig(),
    evaluate: EvalConfig = EvalConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    workdir: str = "melos-work",
    experiment: str = "melos",
    resume: bool = False,
    register_as: str | None = None,
    on_busy: Literal["wait", "fail"] = "wait",
    init_from: str | None = None,
) -> dict:
    """Run the whole pipeline; returns the evaluation metrics and the MLflow run id.

    Args:
        download: corpus sources and how to read them.
        tokenize: sentence split, held-out share and Parquet sharding.
        vocab: WordPiece vocabulary size and minimum frequency.
        train: model size, optimisation and masking.
        evaluate: the fixed evaluation mask and fill-mask examples.
        runtime: device, precision and threads (speed only).
        workdir: directory for every stage's outputs (relative to the working directory).
        experiment: MLflow experiment name.
        resume: continue the last interrupted training run with the same settings.
        register_as: register the model under this MLflow Model Registry name; alias
            'champion' moves to it only if its held-out top-1 beats the current champion's.
        on_busy: when a live run with the same settings is training in the same work directory:
            'wait' for it to finish, or 'fail' at once naming its process and MLflow run id.
        init_from: continue this checkpoint instead of training from random weights: a Hugging
            Face model directory, a hub id in the local cache, a Melos model directory or
            run:<id>|latest. Its tokenizer splits the words and its vocabulary is adopted; the
            model's size is the checkpoint's. (`melos pretrain --init-from` also applies the
            continued pre-training defaults: see flows.init_from.FINETUNE_DEFAULTS.)
    """
    logger = get_run_logger()
    workdir = str(Path(workdir).resolve())
    init = None
    if init_from:
        from flows.init_from import init_tokenize_config, resolve_init, with_checkpoint_shape

        init = resolve_init(init_from, workdir)
        tokenize, train = init_tokenize_config(tokenize, init), with_checkpoint_shape(train, init)
        logger.info("continuing %s (%s, %s words, %s subwords)", init_from, init["dir"], init["tokenizer"]["splitter"],
                    init["tokenizer"]["subword"])
    profile = None
    if init is None and train.budget_minutes:  # what the user left unset comes from the budget's profile
        from mlm_core.profiles import apply_profile
        from mlm_core.train import device_compute

        train, vocab, profile = apply_profile(train, vocab, *device_compute(runtime))
        logger.info("%s; set from it: %s", profile.describe(),
                    ", ".join(f"{k}={v}" for k, v in profile.applied.items()) or "nothing")
    parent = tracking.start_parent(
        experiment,
        run_name=flow_run.name or "pretrain",
        tags={tracking.TAG_FLOW_RUN: str(flow_run.id), tracking.TAG_FLOW_RUN_NAME: flow_run.name or "",
              **({tracking.TAG_PROFILE: profile.profile.name, tracking.TAG_PROFILE_WHY: profile.describe()}
                 if profile else {})},
    )
    logger.info("MLflow run %s (tracking URI %s)", parent, tracking.tracking_uri())
    configs = {"download": download, "tokenize": tokenize, "vocab": vocab, "train": train, "evaluate": evaluate,
               "runtime": runtime}
    common = {"workdir": workdir, "parent_run_id": parent}
    try:
        tracking.StageRun(parent).log_params(
            {**{name: cfg.model_dump() for name, cfg in configs.items()}, "workdir": workdir, "resume": resume,
             **({"init_from": init_from, "init_from.dir": init["dir"], "init_from.license": init["license"]}
                if init else {})}
        )
        documents = data_stage(download_stage, "download", download_key(download), cfg=download, **common)
        shards = data_stage(
            tokenize_stage, "tokenize", tokenize_key(documents["fingerprint"], tokenize),
            documents=documents, cfg=tokenize, **common,
        )
        if init is None:
            vocabulary = data_stage(
                vocab_stage, "vocab", vocab_key(shards["fingerprint"], vocab), shards=shards, cfg=vocab, **common
            )
        else:  # the checkpoint's vocabulary: its ids are what the weights were trained on
            vocabulary = data_stage(adopt_vocab_stage, "vocab", adopted_key(shards, init), shards=shards, init=init,
                                    **common)
        run_dir = train_run_dir(shards, vocabulary, train, workdir, init)
        # held until the model is evaluated and published: a second run with these settings
        # would otherwise replace or move this run's checkpoints and model under it
        with locks.acquire_run_lock(run_dir.with_name(run_dir.name + ".lock"), parent, on_busy, logger.info) as lock:
            take_over(lock, parent, logger)
            try:
                initial = None
                if init is not None:  # the checkpoint untouched, on the same held-out masks
                    initial = initial_evaluate_stage(
                        shards=shards, vocab=vocabulary, init=init, cfg=evaluate, runtime=runtime, **common
                    )
                try:
                    trained = train_stage(
                        shards=shards, vocab=vocabulary, cfg=train, runtime=runtime, resume=resume, init=init, **common
                    )
                except ResumeError as exc:
                    if profile is None or not profile.applied:
                        raise
                    raise ResumeError(  # the settings that found no run to resume were partly the profile's
                        f"{exc}; the settings you did not give came from budget profile {profile.profile.name} "
                        f"({', '.join(profile.applied)}), which --budget-minutes and the compute (--threads, "
                        "--nproc-per-node, --nnodes, device) choose: resume with the interrupted run's budget and "
                        "compute, or give those settings as flags"
                    ) from exc
                # what the steps bought, on the run `melos runs` and the MLflow UI's run list show
                tracking.StageRun(parent).log_metrics(
                    {k: v for k, v in trained["metrics"].items()
                     if k in ("train/steps", "train/tokens_seen", "train/budget_used", "train/step_seconds")})
                report = evaluate_stage(
                    shards=shards, vocab=vocabulary, trained=trained, cfg=evaluate, runtime=runtime,
                    initial=initial, init=init, **common
                )
                published = publish_stage(
                    documents=documents, shards=shards, vocab=vocabulary, trained=trained, report=report,
                    cfg=evaluate, runtime=runtime, parent_run_id=parent, register_as=register_as,
                )
            except tracking.TrackingOutage:
                lock.leave_record = True  # our MLflow runs stay RUNNING until the next run marks them
                raise
    except tracking.TrackingOutage:
        raise  # the server is away: closing the parent would only wait on it
    except BaseException as exc:
        tracking.end_run(parent, tracking.end_status(exc))
        raise
    tracking.end_run(parent, "FINISHED")
    return {
        "mlflow_run_id": parent,
        "metrics": report["metrics"],
        "initial_metrics": report.get("initial_metrics"),
        "init_from": init_from,
        "fill_mask": report["fill_mask"],
        "report": report["report"],
        "model_dir": trained["model_dir"],
        "model_uri": published["model_uri"],
        "registered": published.get("registered"),
        "stages": {r["stage"]: r["mlflow_run_id"] for r in (documents, shards, vocabulary, trained, report)},
        "train": {**trained["metrics"], "budget_minutes": train.budget_minutes},
        "profile": {"name": profile.profile.name, "why": profile.describe(), "applied": profile.applied}
        if profile else None,
    }


def take_over(lock: locks.RunLock, parent: str, logger) -> None:
    """A run that died holding the run directory (killed, machine lost) left its MLflow runs
    RUNNING; mark them KILLED, pointing at this run, which carries on in its directory."""
    dead = lock.taken_over.get("mlflow_run_id")
    if dead and dead != parent:
        marked = tracking.mark_taken_over(dead, parent)
        if marked:
            logger.warning("marked the MLflow runs of the dead run as KILLED: %s", ", ".join(marked))
    tracking.StageRun(parent).set_tags({"melos.run_dir": str(lock.path.with_suffix(""))})


def data_stage(task, stage: str, key: str, *, workdir: str, parent_run_id: str, **inputs) -> dict:
    """Run a cached data stage; when Prefect served it from its cache, the stage did not
    run and made no MLflow run here, so record one, tagged cached, that points at the
    run which produced the output."""
    record = run_cached(task, stage_dir(workdir, stage, key), workdir=workdir, parent_run_id=parent_run_id, **inputs)
    if record.get("flow_run_id") == str(flow_run.id):
        return record
    with tracking.stage_run(
        parent_run_id,
        stage,
        {tracking.TAG_CACHED: "true", "melos.source_run_id": record["mlflow_run_id"], "melos.key": record["key"]},
    ) as run:
        run.log_params({"dir": record["dir"], "fingerprint": record["fingerprint"]}, stage)
        run.log_metrics({f"{stage}/{k}": v for k, v in record["counts"].items() if not isinstance(v, dict)})
    return {**record, "mlflow_run_id": run.run_id, "produced_by_run_id": record["mlflow_run_id"]}


if __name__ == "__main__":
    pretrain()
