"""The training process ``torchrun`` starts on every rank: ``python -m tasks.train_worker launch.json``.

The train task writes ``launch.json`` (corpus, vocabulary, configs, run directory, MLflow run)
and reads back ``result.json``, which rank 0 writes when training is done. Rank 0 alone logs
to MLflow (straight into the train stage's run) and writes checkpoints; progress lines go to
stdout, which the task streams into the Prefect log.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch.distributed as dist

from mlm_core import distributed
from mlm_core.config import RuntimeConfig, TrainConfig
from mlm_core.data import EncodedCorpus
from mlm_core.io import atomic_write_json, read_json
from mlm_core.tokenizer import WordPieceTokenizer
from mlm_core.train import train_model


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: torchrun ... -m tasks.train_worker LAUNCH_JSON")
    spec = read_json(Path(argv[0]))
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s rank0 %(message)s")
    logger = logging.getLogger("melos.train")
    tokenizer = WordPieceTokenizer.from_file(
        Path(spec["vocab_file"]), **(spec.get("tokenizer") or {"max_input_chars_per_word": spec["max_input_chars_per_word"]})
    )
    corpus = EncodedCorpus(Path(spec["corpus_dir"]))
    cfg, runtime = TrainConfig(**spec["train"]), RuntimeConfig(**spec["runtime"])
    run = None
    if spec.get("mlflow_run_id"):
        from tasks.tracking import StageRun

        run = StageRun(spec["mlflow_run_id"], grace_s=runtime.tracking_grace_s)
    from tasks.train import MlflowProgress  # after the tokenizer: keeps a broken spec's error short

    try:
        result = train_model(
            corpus, tokenizer, cfg, runtime, Path(spec["run_dir"]), data_fingerprint=spec["data_fingerprint"],
            resume=spec["resume"], callback=MlflowProgress(run, logger), init=spec.get("init"),
        )
        info = distributed.current()
        if info.is_main:
            logger.info("weights identical on all %d ranks", info.world)
            atomic_write_json(
                Path(spec["result"]),
                {"model_dir": str(result.model_dir), "last_checkpoint": str(result.last_checkpoint),
                 "steps": result.steps, "resumed_from_step": result.resumed_from_step,
                 "final_loss": result.final_loss, "tokens_seen": result.tokens_seen, "seconds": result.seconds,
                 "step_seconds": result.step_seconds, "budget_used": result.budget_used,
                 "history": result.history, "processes": info.world},
            )
        if run is not None:
            run.flush()  # what is queued, before the task closes the run
    finally:
        if run is not None:
            run.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
