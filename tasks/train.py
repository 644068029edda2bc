"""Prefect task of stage 4: encode the training split and train, logging to MLflow.

Not retried: a failed or interrupted run is continued with ``resume=True`` from its last
checkpoint (same settings -> same run directory), which a blind retry could not do better.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mlm_core.config import RuntimeConfig, TrainConfig
from mlm_core.data import EncodedCorpus, encode_key, encode_shards
from mlm_core.io import atomic_write_json, fingerprint, read_json
from mlm_core.shards import shard_paths
from mlm_core.tokenizer import WordPieceTokenizer
from mlm_core.train import ResumeError, TrainCallback, TrainingStopped, train_key, train_model
from mlm_core.vocab import VOCAB_FILE

from .children import stop_at_safe_points, stop_requested, tied
from .common import MANIFEST
from .tracking import StageRun, stage_run


def load_tokenizer(vocab: dict) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_file(Path(vocab["dir"]) / VOCAB_FILE, **tokenizer_spec(vocab))


def tokenizer_spec(vocab: dict) -> dict:
    """The vocab stage's tokenizer spec (stages written before it was recorded: Melos's own)."""
    manifest = read_json(Path(vocab["dir"]) / MANIFEST)
    return manifest.get("tokenizer") or {"max_input_chars_per_word": manifest["config"]["max_input_chars_per_word"]}


def data_fingerprint(shards: dict, vocab: dict, init: dict | None = None) -> str:
    """What a training run reads: the shards, the vocabulary and, continuing a checkpoint, its weights."""
    if init is None:
        return fingerprint(shards["fingerprint"], vocab["fingerprint"])
    return fingerprint(shards["fingerprint"], vocab["fingerprint"], "init", init["fingerprint"])


def encoded_split(shards: dict, vocab: dict, tokenizer: WordPieceTokenizer, split: str, max_length: int, workdir: str):
    """The split's subword ids on disk (encoded once per shards + vocabulary + length)."""
    key = encode_key(shards["fingerprint"], vocab["fingerprint"], split, max_length)
    paths = shard_paths(Path(shards["dir"]), split, read_json(Path(shards["dir"]) / MANIFEST))
    out = encode_shards(paths, tokenizer, Path(workdir).resolve() / "encoded" / key, max_length, key)
    return EncodedCorpus(out)


class MlflowProgress(TrainCallback):
    """Streams the loop's metrics into the stage's MLflow run (if any) and a log."""

    def __init__(self, run: StageRun | None, logger) -> None:
        self.run, self.logger = run, logger
        self.total = 1
        self.every = 1

    def on_start(self, info: dict) -> None:
        self.total = info["total_steps"]
        self.every = max(1, self.total // 10) if isinstance(self.total, int) else 50
        if self.run:
            self.run.log_params(info, "run")
        self.logger.info(
            "training %s parameters (%s without embeddings) on %s sequences / %s tokens, "
            "%s steps from step %s, %d tokens per step, device %s x %d process(es), autocast %s, "
            "peak %.3g TFLOP/s in all",
            f"{info['parameters']:,}", f"{info['parameters_without_embeddings']:,}", info["train_sequences"],
            info["train_tokens"], info["total_steps"], info["start_step"], info["tokens_per_step"],
            info["device"], info["processes"], info["autocast"], info["peak_flops"] / 1e12,
        )

    def on_history(self, history: list[list[float]]) -> None:
        # a resumed run shows the whole loss curve, not only the part after the restart
        if not self.run:
            return
        for step, loss, lr in history:
            self.run.log_metrics({"train/loss": loss, "train/lr": lr}, step=int(step), flush=False)
        self.run.flush()

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.run:
            self.run.log_metrics(metrics, step=step, flush=False)
        if step % self.every == 0 or step == self.total:
            self.logger.info(
                "step %d/%s loss %.4f lr %.2e %.0f tokens/s padding %.1f%% MFU %.1f%%", step, self.total,
                metrics["train/loss"], metrics["train/lr"], metrics["train/tokens_per_s"],
                100 * metrics["train/padding_share"], 100 * metrics["train/mfu"],
            )

    def on_checkpoint(self, step: int, path: Path) -> None:
        if not self.run:
            return
        # queued behind the metrics (no flush): training does not wait for the tracking server
        self.run.set_tags({"melos.last_checkpoint": str(path), "melos.last_checkpoint_step": step})

    def stop_requested(self) -> bool:
        # SIGTERM (see tasks.children): stop after this step, with a checkpoint of it
        return stop_requested() is not None


def train_run_dir(shards: dict, vocab: dict, cfg: TrainConfig, workdir: str, init: dict | None = None) -> Path:
    """``<workdir>/train/<key>``: one directory per (data, settings); a run owns it while it lives."""
    return Path(workdir).resolve() / "train" / train_key(cfg, data_fingerprint(shards, vocab, init))


def prepare_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """Make way for a run in ``run_dir``; returns where an unfinished earlier run was moved.

    A completed earlier run with the same settings is replaced: its model and report are
    already in MLflow, and keeping every nightly rerun would fill the disk. An unfinished
    one still holds the only copy of its checkpoints, so it is moved aside, never deleted.
    """
    if resume:
        if not (run_dir / "checkpoints").is_dir():
            raise ResumeError(
                f"resume requested, but no earlier run with these settings exists ({run_dir}); "
                "drop --resume to start one"
            )
        return None
    if not run_dir.exists():
        return None
    status = read_json(run_dir / "run.json").get("status") if (run_dir / "run.json").is_file() else None
    if status == "completed":
        shutil.rmtree(run_dir)
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(run_dir.stat().st_mtime))
    aside = run_dir.with_name(f"{run_dir.name}.{stamp}")
    n = 1
    while aside.exists():
        aside, n = run_dir.with_name(f"{run_dir.name}.{stamp}-{n}"), n + 1
    shutil.move(str(run_dir), str(aside))
    return aside


_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]: )?((?:[\w.]+\.)?\w*(?:Error|Exception)\b.*)$")


def tokenizer_setting(vocab: dict) -> int:
    return tokenizer_spec(vocab).get("max_input_chars_per_word", 100)


def torchrun_command(runtime: RuntimeConfig, spec_path: Path) -> list[str]:
    """``torchrun`` (as ``python -m torch.distributed.run``) running the training worker."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(runtime.nproc_per_node),
           "--nnodes", str(runtime.nnodes)]
    if runtime.nnodes > 1:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", runtime.rdzv_endpoint, "--rdzv-id", runtime.rdzv_id]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "tasks.train_worker", str(spec_path)]


def run_torchrun(spec: dict, runtime: RuntimeConfig, run_dir: Path, logger) -> SimpleNamespace:
    """Train under ``torchrun``, streaming its output into ``logger``; a failure raises.

    The worker spec is written next to the run (``launch.json``): on a multi-node run the other
    machines start the same worker on it (see README, "Several GPUs and machines").
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = run_dir / "launch.json", run_dir / "result.json"
    result_path.unlink(missing_ok=True)
    atomic_write_json(spec_path, {**spec, "result": str(result_path)})
    cmd = torchrun_command(runtime, spec_path)
    logger.info("starting %s", " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # tied: torchrun dies with this process, even when it is SIGKILLed
    # own session: a terminal's Ctrl-C reaches only melos, which stops torchrun (SIGTERM) itself
    with subprocess.Popen(tied(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], start_new_session=True) as proc:
        errors: list[str] = []  # the workers' exception lines, once each, for the task's error
        try:
            for line in proc.stdout:
                line = line.rstrip()
                logger.info("%s", line)
                found = _EXCEPTION_LINE.search(line)
                if found and found.group(1) not in errors and not found.group(1).startswith("torch.distributed.elastic"):
                    errors.append(found.group(1))
        except BaseException:  # stopped (Ctrl-C, SIGTERM): torchrun stops its workers on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        rc = proc.wait()
    if rc != 0 or not result_path.is_file():
        raise RuntimeError(
            f"distributed training failed (torchrun exit code {rc}): " + ("; ".join(errors[-3:]) or "see the log above")
        )
    out = read_json(result_path)
    return SimpleNamespace(**{**out, "model_dir": Path(out["model_dir"]), "last_checkpoint": Path(out["last_checkpoint"])})


@task(name="train", cache_policy=NO_CACHE, persist_result=False)
def train_stage(
    shards: dict, vocab: dict, cfg: TrainConfig, runtime: RuntimeConfig, workdir: str, parent_run_id: str,
    resume: bool = False, init: dict | None = None,
) -> dict:
    logger = get_run_logger()
    tokenizer = load_tokenizer(vocab)
    corpus = encoded_split(shards, vocab, tokenizer, "train", cfg.max_length, workdir)
    data_fp = data_fingerprint(shards, vocab, init)
    run_dir = train_run_dir(shards, vocab, cfg, workdir, init)
    key = run_dir.name
    aside = prepare_run_dir(run_dir, resume)
    if aside is not None:
        logger.warning(
            "an unfinished run with these settings was moved to %s; pass --resume (resume=True) "
            "next time to continue such a run instead", aside,
        )
    tags = {"melos.key": key, "melos.resume": str(resume).lower()}
    if init is not None:
        tags["melos.init_from"] = init["source"]
    with stage_run(parent_run_id, "train", tags, grace_s=runtime.tracking_grace_s) as run:
        run.log_params(cfg.model_dump(), "train")
        run.log_params(runtime.model_dump(), "runtime")
        if runtime.distributed:
            result = run_torchrun(
                {"corpus_dir": str(corpus.path), "vocab_file": str(Path(vocab["dir"]) / VOCAB_FILE),
                 "max_input_chars_per_word": tokenizer_setting(vocab), "tokenizer": tokenizer.spec(),
                 "init": init, "train": cfg.model_dump(),
                 "runtime": runtime.model_dump(), "run_dir": str(run_dir), "data_fingerprint": data_fp,
                 "resume": resume, "mlflow_run_id": run.run_id},
                runtime, run_dir, logger,
            )
        else:
            with stop_at_safe_points():
                try:
                    result = train_model(
                        corpus, tokenizer, cfg, runtime, run_dir, data_fingerprint=data_fp, resume=resume,
                        callback=MlflowProgress(run, logger), init=init,
                    )
                except TrainingStopped as exc:  # SIGTERM: the block hands it on as it ends
                    logger.warning("%s", exc)
                    raise
        summary = {
            "train/final_loss": result.final_loss,
            "train/steps": result.steps,
            "train/seconds": result.seconds,
            "train/tokens_seen": result.tokens_seen,
            "train/mean_tokens_per_s": result.tokens_seen / result.seconds if result.seconds else 0.0,
            "train/step_seconds": result.step_seconds,
            **({"train/budget_used": result.budget_used} if result.budget_used is not None else {}),
        }
        run.log_metrics(summary, step=result.steps)
        if result.resumed_from_step is not None:
            run.set_tags({"melos.resumed_from_step": result.resumed_from_step})
        run.log_artifact(result.model_dir, "model")
        run.log_artifact(run_dir / "run.json")
    return {
        "stage": "train",
        "dir": str(run_dir),
        "key": key,
        "model_dir": str(result.model_dir),
        "last_checkpoint": str(result.last_checkpoint),
        "counts": {"steps": result.steps, "train_sequences": len(corpus), "train_tokens": corpus.num_tokens},
        "metrics": summary,
        "resumed_from_step": result.resumed_from_step,
        "mlflow_run_id": run.run_id,
    }
