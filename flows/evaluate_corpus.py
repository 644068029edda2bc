"""The ``evaluate`` flow: score a trained model on any corpus (``melos evaluate``).

The corpus goes through the same cached download and tokenize stages as in ``pretrain``;
its sentences (all of them, both splits) are encoded with the model's own vocabulary and
scored with the fixed evaluation masks. The unigram baselines are fitted on the evaluated
corpus itself (the model's training corpus may not be at hand), which flatters them. The
metrics go to an MLflow run of their own, tagged with the model's run, under the same
``eval/...`` names the pretrain flow logs.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from mlm_core.config import DownloadConfig, EvalConfig, RuntimeConfig, TokenizeConfig
from mlm_core.download import download_key
from mlm_core.shards import tokenize_key
from tasks import tracking
from tasks.download import download_stage
from tasks.evaluate import score_corpus
from tasks.tokenize import tokenize_stage

from .pretrain import data_stage

TAG_MODEL_RUN = "melos.model_run_id"
STAGE = "evaluate-corpus"  # as the run's stage tag, it keeps these runs out of `melos runs` and `latest`


@flow(name="evaluate", description="Score a trained Melos model on any corpus.")
def evaluate_corpus(
    model_dir: str,
    model_run_id: str | None = None,
    download: DownloadConfig = DownloadConfig(),
    tokenize: TokenizeConfig = TokenizeConfig(),
    evaluate: EvalConfig = EvalConfig(max_sentences=None),
    runtime: RuntimeConfig = RuntimeConfig(),
    workdir: str = "melos-work",
    experiment: str = "melos",
) -> dict:
    """Download and tokenize the corpus (cached), then score the model on all its sentences.

    Args:
        model_dir: a Melos model directory (``melos evaluate`` downloads it from the run).
        model_run_id: the MLflow run the model came from, tagged on this run (None: a directory).
        download: the corpus to score on.
        tokenize: sentence split and sharding (the held-out share does not matter: both splits are scored).
        evaluate: the fixed evaluation masks and sample sizes.
        runtime: device and threads (speed only).
        workdir: directory for the stage outputs.
        experiment: MLflow experiment name.
    """
    logger = get_run_logger()
    workdir = str(Path(workdir).resolve())
    from mlm_core.checkpoint import load_tokenizer

    # the corpus is split into words as the model's own tokenizer splits them (IPAdic for a model
    # continued from an IPAdic checkpoint)
    tokenize = tokenize.model_copy(update={"word_splitter": load_tokenizer(Path(model_dir)).splitter})
    tags = {tracking.TAG_FLOW_RUN: str(flow_run.id), tracking.TAG_FLOW_RUN_NAME: flow_run.name or "",
            tracking.TAG_STAGE: STAGE, TAG_MODEL_RUN: model_run_id or "", "melos.model_dir": model_dir}
    parent = tracking.start_parent(experiment, run_name=f"evaluate {', '.join(download.sources)}", tags=tags)
    logger.info("MLflow run %s scores %s on %s", parent, model_run_id or model_dir, download.sources)
    common = {"workdir": workdir, "parent_run_id": parent}
    try:
        tracking.StageRun(parent).log_params(
            {"download": download.model_dump(), "tokenize": tokenize.model_dump(), "evaluate": evaluate.model_dump(),
             "model_dir": model_dir, "model_run_id": model_run_id or ""}
        )
        documents = data_stage(download_stage, "download", download_key(download), cfg=download, **common)
        shards = data_stage(
            tokenize_stage, "tokenize", tokenize_key(documents["fingerprint"], tokenize),
            documents=documents, cfg=tokenize, **common,
        )
        result = score_corpus(shards=shards, model_dir=model_dir, cfg=evaluate, runtime=runtime, **common)
    except BaseException as exc:  # KILLED when stopped (Ctrl-C, SIGTERM), else FAILED
        tracking.end_run(parent, tracking.end_status(exc))
        raise
    tracking.end_run(parent, "FINISHED")
    return {"mlflow_run_id": parent, "model_run_id": model_run_id, **result}
