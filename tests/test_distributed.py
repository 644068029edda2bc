"""Data-parallel training under torchrun: 2 CPU processes with gloo, against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prefect import flow

from conftest import REPO
from mlm_core.checkpoint import load_pretrained
from mlm_core.config import RuntimeConfig, TrainConfig
from mlm_core.train import train_model
from tasks import tracking
from tasks.train import torchrun_command, train_stage

# dropout off: each process draws its own dropout masks, so only a dropout-free run can match
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=64, dropout=0.0,
             tokens_per_batch=300, grad_accum=2, max_steps=6, checkpoint_every=3, keep_checkpoints=2,
             learning_rate=3e-3)
TWO = RuntimeConfig(device="cpu", nproc_per_node=2, num_threads=1)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_pretrained(model_dir)
    return model.state_dict()


def _launch(merosu, run_dir: Path, cfg: TrainConfig, resume: bool = False) -> dict:
    spec = {
        "corpus_dir": str(merosu.train.path), "vocab_file": str(merosu.vocab_dir / "vocab.txt"),
        "max_input_chars_per_word": 100, "train": cfg.model_dump(), "runtime": TWO.model_dump(),
        "run_dir": str(run_dir), "data_fingerprint": merosu.data_fingerprint, "resume": resume,
        "mlflow_run_id": None, "result": str(run_dir.parent / f"{run_dir.name}-result.json"),
    }
    spec_path = run_dir.parent / f"{run_dir.name}-launch.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(torchrun_command(TWO, spec_path), cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "weights identical on all 2 ranks" in proc.stdout
    return json.loads(Path(spec["result"]).read_text())


def test_two_processes_match_one_process_with_the_same_global_batch_and_resume_exactly(merosu, tmp_path):
    cfg = TrainConfig(**SMALL)
    single = train_model(merosu.train, merosu.tokenizer, cfg, RuntimeConfig(device="cpu"), tmp_path / "one",
                         data_fingerprint=merosu.data_fingerprint)
    ddp = _launch(merosu, tmp_path / "two", cfg)
    assert ddp["processes"] == 2 and ddp["steps"] == single.steps == 6
    assert ddp["tokens_seen"] == single.tokens_seen
    torch.testing.assert_close([h[1] for h in ddp["history"]], [h[1] for h in single.history], rtol=1e-5, atol=1e-6)
    a, b = _weights(single.model_dir), _weights(tmp_path / "two" / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

    # resume under DDP from the step-3 checkpoint: the same weights as the uninterrupted DDP run
    shutil.copytree(tmp_path / "two", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step-0000006")
    shutil.rmtree(tmp_path / "again" / "model")
    resumed = _launch(merosu, tmp_path / "again", cfg, resume=True)
    assert resumed["resumed_from_step"] == 3
    assert [h[1] for h in resumed["history"]] == [h[1] for h in ddp["history"]]
    c = _weights(tmp_path / "again" / "model")
    b = _weights(tmp_path / "two" / "model")
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.fixture
def records(merosu):
    shards = {"dir": str(merosu.tokenize_dir), "fingerprint": merosu.tokenize_manifest["fingerprint"]}
    vocab = {"dir": str(merosu.vocab_dir), "fingerprint": merosu.vocab_manifest["fingerprint"]}
    return shards, vocab


def test_train_task_runs_torchrun_streams_its_output_and_fails_with_it(
    prefect_harness, records, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.start_parent("melos-ddp", "test", {})
    shards, vocab = records

    @flow
    def only_train(cfg: TrainConfig):
        return train_stage(shards=shards, vocab=vocab, cfg=cfg, runtime=TWO, workdir=str(tmp_path / "w"),
                           parent_run_id=parent)

    cfg = TrainConfig(**{**SMALL, "max_steps": 2, "checkpoint_every": 2})
    with caplog.at_level("INFO"):
        out = only_train(cfg)
    assert out["counts"]["steps"] == 2 and Path(out["model_dir"], "model.pt").is_file()
    logged = caplog.text
    assert "torch.distributed.run" in logged and "weights identical on all 2 ranks" in logged
    assert "step 2/2 loss" in logged  # rank 0's progress, streamed from the subprocess
    metrics = tracking.client().get_run(out["mlflow_run_id"]).data.metrics
    for name in ("train/loss", "train/padding_share", "train/mfu", "train/tokens_per_s"):
        assert name in metrics, name  # rank 0 logged into the task's MLflow run
    assert metrics["train/steps"] == 2

    bad = cfg.model_copy(update={"grad_accum": 3})  # not a multiple of 2 processes: every rank fails
    with pytest.raises(RuntimeError, match="distributed training failed") as err:
        only_train(bad)
    assert "grad_accum (3) must be a multiple" in str(err.value)
    tracking.end_run(parent)
