"""Stage 4: the training loop (packed token-budget batches, sparse MLM loss, AdamW, warm-up +
linear decay over steps or over a time budget, clipping, gradient accumulation, checkpoints, DDP).

The loop knows nothing about Prefect or MLflow: it reports through a ``TrainCallback``.
Everything random is a function of the seed — initialisation, batch order (``TokenBatchPlan``),
masks (``masking``), dropout (torch's RNG, saved in checkpoints) — so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have. With ``budget_minutes`` the
learning rate follows the elapsed wall-clock share of the budget (saved in checkpoints as
``elapsed_s``): data, masks and RNG still resume exactly, but the learning rate of each later
step and the step at which the budget runs out depend on measured time, so a resumed budget
run is not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
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
from . import distributed
from .config import RuntimeConfig, TrainConfig
from .data import EncodedCorpus
from .errors import UserError
from .io import atomic_write_json, fingerprint
from .loader import Prefetcher, StepSource, WorkerLoader, iter_steps
from .mask_schedule import parse_rate
from .masking import MaskSpec
from .model import BertForMaskedLM, ModelConfig
from .packing import TokenBatchPlan, block_diagonal_mask, step_model_flops
from .schedule import budget_lr_factor, lr_factor
from .tokenizer import WordPieceTokenizer

__all__ = [
    "TrainCallback", "TrainResult", "TrainingStopped", "configure_threads", "default_threads", "lr_factor",
    "model_config_for", "resolve_device", "train_model",
]


class TrainCallback:
    """Hooks the orchestration layer overrides (tracking, progress, interruption)."""

    def on_start(self, info: dict) -> None: ...

    def on_history(self, history: list[list[float]]) -> None:
        """Called on resume with the metric history recorded up to the checkpoint."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def stop_requested(self) -> bool:
        """Polled after every step: True ends training there, with a checkpoint of that step
        (so a resumed run loses nothing), by raising ``TrainingStopped``."""
        return False


class ResumeError(UserError, FileNotFoundError):
    """``resume`` asked for, but no checkpoint of this run to continue from."""


class ResumeSettingsError(UserError, ValueError):
    """``resume`` asked for, but the checkpoint found was trained with other data or settings."""


class TrainingStopped(KeyboardInterrupt):
    """Training stopped at ``step`` because the callback asked; its checkpoint is on disk."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"training stopped at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


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
    step_seconds: float = 0.0  # inside optimiser steps (batch in hand -> weights updated), resumes included
    budget_used: float | None = None  # share of --budget-minutes spent, when there is one


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


def initial_model(init: dict, cfg: TrainConfig, tokenizer: WordPieceTokenizer) -> tuple[ModelConfig, BertForMaskedLM]:
    """The checkpoint ``init`` names, as the model to continue (CPU): its weights, with the
    dropout of ``cfg`` (the checkpoint's attention dropout kept when cfg's equals its own)."""
    from .hf_import import load_init

    loaded, own = load_init(init["dir"], "cpu")
    if own.vocab != tokenizer.vocab:
        raise ValueError(f"the vocabulary does not match the checkpoint's ({init['source']}); the vocab stage must adopt it")
    base = loaded.config
    if cfg.max_length > base.max_position_embeddings:
        raise ValueError(f"--max-length {cfg.max_length} exceeds the {base.max_position_embeddings} positions of "
                         f"{init['source']}")
    same = cfg.dropout == base.dropout
    model_cfg = base.model_copy(update={"dropout": cfg.dropout,
                                        "attention_dropout": base.attention_dropout if same else cfg.dropout})
    model = BertForMaskedLM(model_cfg)
    model.load_state_dict(loaded.state_dict())
    return model_cfg, model


def resolve_device(runtime: RuntimeConfig) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None). CUDA gets bf16 autocast unless fp32 is asked for."""
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='auto' or 'cpu'")
    use_cuda = runtime.device == "cuda" or (runtime.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if runtime.precision == "bf16" or (runtime.precision == "auto" and use_cuda):
        return device, torch.bfloat16
    return device, None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_threads() -> int:
    """torch threads when none are asked for: every usable CPU (split between the processes of
    one machine under ``torchrun``).

    Not fewer on a busy machine: with OpenMP's PASSIVE wait policy (see ``configure_threads``)
    a thread that waits sleeps, and the scheduler shares CPU time per thread, so on a shared
    machine two threads measured faster than one (``bench/threads_busy.py``, README). What
    made torch's default 24x slower than ``--threads 1`` there was OpenMP's threads spinning
    on cores other jobs held, not their number."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, usable_cpus() // local)


def configure_threads(num_threads: int | None) -> int:
    """Set torch's CPU threads: ``num_threads``, else ``default_threads()``; an
    ``OMP_NUM_THREADS`` in the environment is respected as torch read it. Returns the count.

    OpenMP's wait policy is set to PASSIVE, unless the environment says otherwise, when
    ``mlm_core`` is imported, before torch loads OpenMP: idle threads sleep instead of
    spinning on cores other jobs need."""
    if num_threads:
        torch.set_num_threads(num_threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()


def loader_workers(runtime: RuntimeConfig, device: torch.device, local_world: int = 1) -> int:
    """Collating processes: the setting, else none on CPU (the cores train) and on CUDA up to 4,
    leaving one CPU per training process to drive its GPU."""
    if runtime.loader_workers is not None:
        return runtime.loader_workers
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(1, local_world) - 1))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, LayerNorm
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-6, fused=fused or None)


def train_key(cfg: TrainConfig, data_fingerprint: str) -> str:
    """What the run computes: data + vocabulary + every non-speed training setting."""
    return fingerprint("train", data_fingerprint, cfg.fingerprint_fields())


def peak_flops(device: torch.device, runtime: RuntimeConfig, threads: int | None = None) -> float:
    """Peak FLOP/s of one device: the runtime setting, a table of known GPUs (dense bf16),
    or on CPU 80 GFLOP/s per torch thread (2.5 GHz x 32 fp32 FLOPs per cycle: AVX2, two FMA
    units) of ``threads`` (default: this process's torch threads)."""
    if runtime.peak_tflops:
        return runtime.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40", 181), ("L4", 121),
                            ("A10", 125), ("4090", 165), ("3090", 71), ("V100", 125), ("T4", 65)):
            if key in name:
                return tflops * 1e12
        return 100e12
    return (threads or torch.get_num_threads()) * 80e9


def device_compute(runtime: RuntimeConfig) -> tuple[float, str]:
    """(peak FLOP/s of every process a run will use, "cpu" or "gpu"), known before training
    starts: what a budget profile is chosen by (``mlm_core.profiles``)."""
    device, _ = resolve_device(runtime)
    processes = runtime.nproc_per_node * runtime.nnodes
    kind = "gpu" if device.type == "cuda" else "cpu"
    if kind == "gpu" or runtime.peak_tflops:
        return peak_flops(device, runtime) * processes, kind
    threads = runtime.num_threads * processes if runtime.num_threads else usable_cpus() * runtime.nnodes
    return peak_flops(device, runtime, threads), kind


def tokens_per_batch_for(cfg: TrainConfig, corpus: EncodedCorpus) -> int:
    """The micro-batch token budget: the setting, or batch_size x the mean sequence length."""
    if cfg.tokens_per_batch is not None:
        return cfg.tokens_per_batch
    mean = corpus.num_tokens / max(len(corpus), 1) + 2
    return max(cfg.max_length, round(cfg.batch_size * mean))


def _to_device(batch, device: torch.device) -> dict[str, torch.Tensor]:
    t = {k: torch.from_numpy(getattr(batch, k)).to(device, non_blocking=True)
         for k in ("input_ids", "position_ids", "segment_ids", "masked_positions", "masked_labels")}
    return {
        "input_ids": t["input_ids"],
        "attention_mask": block_diagonal_mask(t["segment_ids"]),
        "position_ids": t["position_ids"],
        "masked_positions": t["masked_positions"],
        "labels": t["masked_labels"],
    }


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
    init: dict | None = None,
) -> TrainResult:
    """Train (or resume training) into ``run_dir``: ``checkpoints/step-*/`` and ``model/``.

    ``init`` (``hf_import.describe_init``'s record) continues a published or earlier checkpoint:
    its architecture and weights (nothing re-initialised), dropout from ``cfg.dropout``; the
    tokenizer must be the checkpoint's own (the vocab stage adopts it). ``data_fingerprint``
    should then name the checkpoint too, so the run's key does.

    Under ``torchrun`` every rank calls this; the model is wrapped in DDP, each rank reads its
    share of every step's micro-batches, and only rank 0 reports, checkpoints and exports.
    """
    key = train_key(cfg, data_fingerprint)
    configure_threads(runtime.num_threads)
    device, amp_dtype = resolve_device(runtime)
    dist_info = distributed.init_from_env(device.type)
    if device.type == "cuda":
        if dist_info.enabled:
            device = torch.device("cuda", dist_info.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
    main = dist_info.is_main
    callback = (callback or TrainCallback()) if main else TrainCallback()

    torch.manual_seed(cfg.seed)
    if init is None:
        model_cfg = model_config_for(cfg, len(tokenizer), tokenizer.pad_id)
        model = BertForMaskedLM(model_cfg).to(device)
    else:
        model_cfg, model = initial_model(init, cfg, tokenizer)
        model = model.to(device)
    optimizer = _optimizer(model, cfg, fused=device.type == "cuda")
    tpb = tokens_per_batch_for(cfg, corpus)
    plan = TokenBatchPlan(corpus.lengths, tpb, cfg.seed)
    budget_s = cfg.budget_minutes * 60.0 if cfg.budget_minutes else None
    if budget_s is None:
        total_steps: int | None = cfg.max_steps or max(1, math.ceil(plan.total_micro_batches(cfg.epochs) / cfg.grad_accum))
        warmup_steps = max(1, math.ceil(cfg.warmup_ratio * total_steps)) if cfg.warmup_ratio > 0 else 0
    else:
        total_steps, warmup_steps = cfg.max_steps, 0  # the budget ends the run (max_steps caps it)
    meta = {"train": cfg.model_dump(), "fingerprint": key, "total_steps": total_steps, "tokens_per_batch": tpb}
    if init is not None:
        meta["init_from"] = {k: init.get(k) for k in ("source", "name", "format", "license", "fingerprint")}

    checkpoints_dir = run_dir / "checkpoints"
    start_step, history, resumed_from, elapsed0, tokens0, step_s0 = 0, [], None, 0.0, 0, 0.0
    if resume:
        if main:
            remove_partial(checkpoints_dir)
        distributed.barrier(dist_info)
        ckpt = latest_checkpoint(checkpoints_dir)
        if ckpt is None:
            raise ResumeError(f"--resume: no checkpoint of a run with these settings in {str(checkpoints_dir)!r}; "
                              "give the interrupted run's settings, or run without --resume")
        found = read_meta(ckpt).get("fingerprint")
        if found != key:
            raise ResumeSettingsError(
                f"--resume: checkpoint {ckpt} was trained with other data or settings (fingerprint {found}, "
                f"these settings give {key}); resume with the settings of that run or start a fresh one"
            )
        state = load_training_state(ckpt, model, optimizer, None, device)
        start_step, history, resumed_from = int(state["step"]), [list(h) for h in state["history"]], int(state["step"])
        elapsed0 = float(state.get("elapsed_s", 0.0))
        tokens0, step_s0 = int(state.get("tokens_seen", 0)), float(state.get("step_s", 0.0))
        callback.on_history([list(h) for h in history])
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_json(run_dir / "run.json", {**meta, "status": "running", "start_step": start_step})

    schedule = parse_rate(cfg.mask_rate)
    spec = MaskSpec(schedule.at(0.0), cfg.mask_token_prob, cfg.random_token_prob, whole_word=cfg.whole_word)
    encoder_params = sum(p.numel() for p in model.layers.parameters())
    peak = peak_flops(device, runtime) * dist_info.world
    callback.on_start(
        {
            "parameters": model.num_parameters(),
            "parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
            "train_sequences": len(corpus),
            "train_tokens": corpus.num_tokens,
            "micro_batches_per_epoch": plan.batches_in_epoch(0),
            "total_steps": total_steps if total_steps is not None else "budget",
            "budget_minutes": cfg.budget_minutes,
            "warmup_steps": warmup_steps,
            "start_step": start_step,
            "device": str(device),
            "autocast": str(amp_dtype) if amp_dtype else "none",
            "processes": dist_info.world,
            "tokens_per_batch": tpb,
            "tokens_per_step": tpb * cfg.grad_accum,
            "compile": runtime.compile,
            "peak_flops": peak,
        }
    )

    train_module: torch.nn.Module = model
    if dist_info.enabled:
        train_module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(train_module, dynamic=True) if runtime.compile else train_module
    autocast = (
        (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    )
    source = StepSource(plan, corpus, tokenizer, spec, cfg.max_length, cfg.grad_accum, total_steps,
                        cfg.masking == "static", dist_info.rank, dist_info.world, schedule)
    workers = loader_workers(runtime, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    loader = (WorkerLoader(source, start_step, total_steps, workers, runtime.prefetch) if workers
              else Prefetcher(iter_steps(source, start_step, total_steps), runtime.prefetch))

    model.train()
    started = time.perf_counter()
    tokens_seen, done, step_s = tokens0, start_step, step_s0
    elapsed_now = elapsed0
    loss_value = float("nan")
    last_ckpt = latest_checkpoint(checkpoints_dir) if resume else None
    t_prev = started
    try:
        for sb in loader:
            t_step = time.perf_counter()
            flops = sum(step_model_flops(b, encoder_params, model_cfg.num_layers, model_cfg.hidden_size, len(tokenizer))
                        for b in sb.micro)
            # one all-reduce per step: counts for the loss normaliser and the metrics, and rank 0's
            # clock, so that every rank follows the same budget schedule and stops at the same step
            local = [sum(len(b.masked_positions) for b in sb.micro), sum(b.n_tokens for b in sb.micro),
                     sum(b.n_slots for b in sb.micro), flops,
                     elapsed0 + time.perf_counter() - started if main else 0.0]
            n_masked, n_tokens, n_slots, flops, elapsed = distributed.all_sum(local, device, dist_info)
            if budget_s is not None:
                factor = budget_lr_factor(elapsed / budget_s, cfg.warmup_ratio)
            else:
                factor = lr_factor(sb.step, total_steps, warmup_steps)
            lr = cfg.learning_rate * factor
            for group in optimizer.param_groups:
                group["lr"] = lr

            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for j, batch in enumerate(sb.micro):
                inputs = _to_device(batch, device)
                n = len(batch.masked_positions)
                sync = not dist_info.enabled or j == len(sb.micro) - 1
                with (contextlib.nullcontext() if sync else train_module.no_sync()), autocast():
                    _, loss = forward(**inputs)
                    # mean over the step's masked tokens on all ranks; DDP averages gradients over ranks
                    weight = n / max(n_masked, 1.0) * dist_info.world
                    (loss * weight).backward()
                loss_sum += loss.detach().float() * n
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_value = distributed.all_sum([float(loss_sum)], device, dist_info)[0] / max(n_masked, 1.0)
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            step_s += now - t_step
            tokens_seen += int(n_tokens)
            done = sb.step + 1
            history.append([done, loss_value, lr])
            elapsed_now = elapsed0 + now - started
            out_of_budget = budget_s is not None and distributed.all_sum(
                [float(elapsed_now >= budget_s) if main else 0.0], device, dist_info)[0] > 0
            finished = out_of_budget or done == total_steps
            if done % cfg.log_every == 0 or finished:
                callback.on_log(
                    done,
                    {
                        "train/loss": loss_value,
                        "train/lr": lr,
                        "train/grad_norm": float(grad_norm),
                        "train/tokens": n_tokens,
                        "train/tokens_per_s": n_tokens / dt if dt > 0 else 0.0,
                        "train/padding_share": 1.0 - n_tokens / n_slots if n_slots else 0.0,
                        "train/mfu": flops / dt / peak if dt > 0 else 0.0,
                        "train/masked_tokens": int(n_masked),
                        "train/epoch": sb.epoch,
                        "train/tokens_seen": tokens_seen,
                        **({"train/budget_used": min(1.0, elapsed_now / budget_s)} if budget_s else {}),
                    },
                )
            saved = main and (done % cfg.checkpoint_every == 0 or finished)
            stop = main and not finished and callback.stop_requested()
            if saved or stop:
                last_ckpt = save_checkpoint(
                    checkpoints_dir, done, model, tokenizer, optimizer, None, history, meta, cfg.keep_checkpoints,
                    extra={"elapsed_s": elapsed_now, "tokens_seen": tokens_seen, "step_s": step_s},
                )
                callback.on_checkpoint(done, last_ckpt)
            if stop:
                raise TrainingStopped(done, last_ckpt)
            if out_of_budget:
                break
    finally:
        loader.close()

    total_steps = done
    distributed.check_replicas_equal(model, dist_info)
    model_dir = run_dir / "model"
    if main:
        if last_ckpt is None:  # nothing left to train (resumed at the final step)
            raise ValueError(f"no checkpoint in {checkpoints_dir} after training")
        save_model_dir(model_dir, model, tokenizer, {**meta, "step": total_steps})
        atomic_write_json(
            run_dir / "run.json", {**meta, "status": "completed", "start_step": start_step, "steps": total_steps}
        )
    distributed.barrier(dist_info)
    seconds = time.perf_counter() - started
    final_loss = history[-1][1] if history else loss_value
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        last_checkpoint=last_ckpt or latest_checkpoint(checkpoints_dir),
        steps=total_steps,
        resumed_from_step=resumed_from,
        final_loss=final_loss,
        tokens_seen=tokens_seen,
        seconds=seconds,
        history=history,
        step_seconds=step_s,
        budget_used=min(1.0, elapsed_now / budget_s) if budget_s else None,
    )
