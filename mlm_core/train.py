"""Stage 4: the training loop (AdamW, warm-up + linear decay, clipping, checkpoints).

The loop knows nothing about Prefect or MLflow: it reports through a ``TrainCallback``.
Everything random is a function of the seed — initialisation, batch order (``BatchPlan``),
masks (``masking``), dropout (torch's RNG, saved in checkpoints) — so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    latest_checkpoint,
    load_training_state,
    read_meta,
    remove_partial,
    save_checkpoint,
    save_model_dir,
)
from .config import RuntimeConfig, TrainConfig
from .data import BatchPlan, EncodedCorpus
from .io import atomic_write_json, fingerprint
from .masking import MaskSpec
from .model import BertForMaskedLM, ModelConfig
from .tokenizer import WordPieceTokenizer


class TrainCallback:
    """Hooks the orchestration layer overrides (tracking, progress, interruption)."""

    def on_start(self, info: dict) -> None: ...

    def on_history(self, history: list[list[float]]) -> None:
        """Called on resume with the metric history recorded up to the checkpoint."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    last_checkpoint: Path
    steps: int
    resumed_from_step: int | None
    final_loss: float
    tokens_seen: int
    seconds: float
    history: list[list[float]] = field(repr=False, default_factory=list)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = total_steps - warmup_steps
    return max(0.0, (total_steps - step) / remaining) if remaining > 0 else 1.0


def model_config_for(cfg: TrainConfig, vocab_size: int, pad_token_id: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_length,
        dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        pad_token_id=pad_token_id,
    )


def resolve_device(runtime: RuntimeConfig) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None). CUDA gets bf16 autocast unless fp32 is asked for."""
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='auto' or 'cpu'")
    use_cuda = runtime.device == "cuda" or (runtime.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if runtime.precision == "bf16" or (runtime.precision == "auto" and use_cuda):
        return device, torch.bfloat16
    return device, None


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, LayerNorm
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-6, fused=fused or None)


def train_key(cfg: TrainConfig, data_fingerprint: str) -> str:
    """What the run computes: data + vocabulary + every non-speed training setting."""
    return fingerprint("train", data_fingerprint, cfg.fingerprint_fields())


def train_model(
    corpus: EncodedCorpus,
    tokenizer: WordPieceTokenizer,
    cfg: TrainConfig,
    runtime: RuntimeConfig,
    run_dir: Path,
    *,
    data_fingerprint: str,
    resume: bool = False,
    callback: TrainCallback | None = None,
) -> TrainResult:
    """Train (or resume training) into ``run_dir``: ``checkpoints/step-*/`` and ``model/``."""
    callback = callback or TrainCallback()
    key = train_key(cfg, data_fingerprint)
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    device, amp_dtype = resolve_device(runtime)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    torch.manual_seed(cfg.seed)
    model_cfg = model_config_for(cfg, len(tokenizer), tokenizer.pad_id)
    model = BertForMaskedLM(model_cfg).to(device)
    optimizer = _optimizer(model, cfg, fused=device.type == "cuda")
    plan = BatchPlan(corpus.lengths, cfg.batch_size, cfg.seed, cfg.length_group_size)
    total_steps = plan.total_steps(cfg.epochs, cfg.max_steps)
    warmup_steps = max(1, math.ceil(cfg.warmup_ratio * total_steps)) if cfg.warmup_ratio > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    meta = {"train": cfg.model_dump(), "fingerprint": key, "total_steps": total_steps}

    checkpoints_dir = run_dir / "checkpoints"
    start_step, history, resumed_from = 0, [], None
    if resume:
        remove_partial(checkpoints_dir)
        ckpt = latest_checkpoint(checkpoints_dir)
        if ckpt is None:
            raise FileNotFoundError(f"resume requested but {checkpoints_dir} holds no checkpoint")
        found = read_meta(ckpt).get("fingerprint")
        if found != key:
            raise ValueError(
                f"checkpoint {ckpt} was trained with other data or settings (fingerprint {found}, "
                f"these settings give {key}); resume with the settings of that run or start a fresh one"
            )
        state = load_training_state(ckpt, model, optimizer, scheduler, device)
        start_step, history, resumed_from = int(state["step"]), [list(h) for h in state["history"]], int(state["step"])
        callback.on_history([list(h) for h in history])
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "run.json", {**meta, "status": "running", "start_step": start_step})

    spec = MaskSpec(cfg.mask_rate, cfg.mask_token_prob, cfg.random_token_prob)
    callback.on_start(
        {
            "parameters": model.num_parameters(),
            "parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
            "train_sequences": len(corpus),
            "train_tokens": corpus.num_tokens,
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "start_step": start_step,
            "device": str(device),
            "autocast": str(amp_dtype) if amp_dtype else "none",
            "tokens_per_step": corpus.num_tokens / max(len(corpus), 1) * cfg.batch_size,
        }
    )

    model.train()
    started = time.perf_counter()
    tokens_seen = 0
    loss_value = float("nan")
    last_ckpt = latest_checkpoint(checkpoints_dir) if resume else None
    autocast = (
        (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    )
    for step, epoch, batch in plan.iter_batches(
        corpus, tokenizer, spec, start_step, total_steps, static_masking=cfg.masking == "static"
    ):
        t0 = time.perf_counter()
        input_ids = torch.from_numpy(batch.input_ids).to(device, non_blocking=True)
        attention = torch.from_numpy(batch.attention_mask).to(device, non_blocking=True)
        labels = torch.from_numpy(batch.labels).to(device, non_blocking=True)
        with autocast():
            _, loss = model(input_ids, attention_mask=attention, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        dt = time.perf_counter() - t0
        tokens_seen += batch.n_tokens
        done = step + 1
        history.append([done, loss_value, lr])
        if done % cfg.log_every == 0 or done == total_steps:
            callback.on_log(
                done,
                {
                    "train/loss": loss_value,
                    "train/lr": lr,
                    "train/grad_norm": float(grad_norm),
                    "train/tokens_per_s": batch.n_tokens / dt if dt > 0 else 0.0,
                    "train/masked_tokens": int((batch.labels != -100).sum()),
                    "train/epoch": epoch + (step % plan.steps_per_epoch + 1) / plan.steps_per_epoch,
                },
            )
        if done % cfg.checkpoint_every == 0 or done == total_steps:
            last_ckpt = save_checkpoint(
                checkpoints_dir, done, model, tokenizer, optimizer, scheduler, history, meta, cfg.keep_checkpoints
            )
            callback.on_checkpoint(done, last_ckpt)

    if last_ckpt is None:  # nothing left to train (resumed at the final step)
        raise ValueError(f"no checkpoint in {checkpoints_dir} after training")
    model_dir = run_dir / "model"
    save_model_dir(model_dir, model, tokenizer, {**meta, "step": total_steps})
    seconds = time.perf_counter() - started
    atomic_write_json(run_dir / "run.json", {**meta, "status": "completed", "start_step": start_step, "steps": total_steps})
    final_loss = history[-1][1] if history else loss_value
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        last_checkpoint=last_ckpt,
        steps=total_steps,
        resumed_from_step=resumed_from,
        final_loss=final_loss,
        tokens_seen=tokens_seen,
        seconds=seconds,
        history=history,
    )
