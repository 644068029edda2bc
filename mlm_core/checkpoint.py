"""Checkpoints that carry everything needed to resume training or to use the model alone.

Layout of one checkpoint directory (written under a temporary name, then renamed)::

    config.json      model config, tokenizer spec, training config, fingerprint, step
    vocab.txt        the vocabulary (BERT format)
    model.pt         model state_dict
    optimizer.pt     optimizer state_dict            (training checkpoints only)
    trainer.pt       scheduler state, step, RNG states, metric history (idem)

An exported model (``model/`` of a training run) has the first three files only, and
``load_pretrained`` reads either kind. Everything is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .io import atomic_dir, read_json
from .model import BertForMaskedLM, ModelConfig
from .pause import pause_point
from .tokenizer import WordPieceTokenizer

CONFIG, VOCAB, MODEL, OPTIMIZER, TRAINER = "config.json", "vocab.txt", "model.pt", "optimizer.pt", "trainer.pt"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def save_model_dir(path: Path, model: BertForMaskedLM, tokenizer: WordPieceTokenizer, meta: dict) -> None:
    """Write config + vocab + weights atomically (a standalone, loadable model)."""
    with atomic_dir(path) as tmp:
        _write_model_files(tmp, model, tokenizer, meta)


def _write_model_files(tmp: Path, model: BertForMaskedLM, tokenizer: WordPieceTokenizer, meta: dict) -> None:
    (tmp / CONFIG).write_text(
        json.dumps({"model": model.config.model_dump(), "tokenizer": tokenizer.spec(), **meta}, ensure_ascii=False,
                   indent=2),
        encoding="utf-8",
    )
    tokenizer.save(tmp / VOCAB)
    torch.save(model.state_dict(), tmp / MODEL)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: BertForMaskedLM,
    tokenizer: WordPieceTokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    history: list[list[float]],
    meta: dict,
    keep: int,
    extra: dict | None = None,
) -> Path:
    """``extra`` (plain values) goes into trainer.pt, e.g. the elapsed time of a budget schedule."""
    path = checkpoints_dir / step_dir_name(step)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with atomic_dir(path) as tmp:
        _write_model_files(tmp, model, tokenizer, {**meta, "step": step})
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        state = {"step": step, "scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": rng,
                 "history": history, **(extra or {})}
        torch.save(state, tmp / TRAINER)
        pause_point("checkpoint")
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_partial(checkpoints_dir: Path) -> list[Path]:
    """Delete temporary directories left by a checkpoint write that was killed midway."""
    partial = [p for p in checkpoints_dir.glob(".step-*.tmp") if p.is_dir()] if checkpoints_dir.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def load_training_state(path: Path, model, optimizer, scheduler, device: torch.device) -> dict:
    """Restore model/optimizer/scheduler/RNG in place; returns the trainer state dict."""
    model.load_state_dict(torch.load(path / MODEL, map_location=device, weights_only=True))
    optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location=device, weights_only=True))
    state = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def read_meta(path: Path) -> dict:
    return read_json(path / CONFIG)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[BertForMaskedLM, WordPieceTokenizer]:
    """Load a model directory or a training checkpoint for inference (eval mode)."""
    path = Path(path)
    missing = [f for f in (CONFIG, VOCAB, MODEL) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a Melos model or checkpoint directory (missing {', '.join(missing)}); "
            "pass a training run's model/ directory or one of its checkpoints/step-* directories"
        )
    meta = read_meta(path)
    model = BertForMaskedLM(ModelConfig(**meta["model"]))
    model.load_state_dict(torch.load(path / MODEL, map_location=device, weights_only=True))
    model.to(device).eval()
    return model, load_tokenizer(path, meta)


def load_tokenizer(path: Path, meta: dict | None = None) -> WordPieceTokenizer:
    """The tokenizer of a model directory: its vocab.txt with the recorded spec (word splitter,
    subwords); models saved before the spec was recorded use Melos's own (MeCab + unidic-lite)."""
    meta = read_meta(path) if meta is None else meta
    return WordPieceTokenizer.from_file(path / VOCAB, **meta.get("tokenizer", {}))
