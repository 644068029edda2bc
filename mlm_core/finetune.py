"""Fine-tuning a pre-trained encoder on labelled data, against the same model from random weights.

Heads sit on the encoder of a ``BertForMaskedLM`` (whose MLM head is dropped):

- sequence classification: [CLS] -> pooler (dense + tanh) -> dropout -> linear, as Hugging
  Face's ``BertForSequenceClassification``; pairs are ``[CLS] a [SEP] b [SEP]`` with token
  type 1 on ``b [SEP]``;
- token classification: every position -> dropout -> linear, as ``BertForTokenClassification``;
  the label sits on the first subword of each of the file's tokens, -100 elsewhere (as
  ``run_ner.py``), and a token is predicted from its first subword.

Training packs sequences into rows (``packing.pack_rows``) with block-diagonal attention and
per-sequence positions, so no compute goes to padding, and reads only the positions that are
scored ([CLS], or the first subwords). Batches are token budgets in a seeded order
(``packing.TokenBatchPlan``); AdamW with warm-up and linear decay (``schedule.lr_factor``); bf16
autocast and optional ``torch.compile`` on CUDA. Each seed trains the pre-trained model and (the
control) the same architecture from random weights with the same settings and budget.
Nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CONFIG, MODEL, VOCAB
from .finetune_data import UNSEEN, Example, TaskData
from .finetune_metrics import accuracy, entity_scores, macro_f1
from .io import atomic_dir, atomic_path, atomic_write_json, fingerprint, read_json
from .model import IGNORE_INDEX, BertForMaskedLM, ModelConfig
from .packing import TokenBatchPlan, block_diagonal_mask, pack_rows
from .schedule import lr_factor
from .tokenizer import WordPieceTokenizer


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 3.0
    max_steps: int | None = None
    minutes: float | None = None  # per training run; stops it early (the schedule shortens to fit)
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    batch_size: int = 32  # sequences per batch, as a token budget: batch_size x mean length
    seeds: int = 3
    seed: int = 0
    baseline: str = "random"  # "random" | "none"
    classifier_dropout: float | None = None  # None: the encoder's dropout
    compile: bool = False


# ----------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    ids: list[np.ndarray]  # per example: [CLS] ... [SEP] (b [SEP]) ids
    types: list[np.ndarray]
    labels: list[np.ndarray]  # classification: (1,) label id; tokens: per position, -100 where unscored
    token_pos: list[np.ndarray]  # tokens: per file token, position of its first subword (-1: none/truncated)
    truncated: int = 0

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)


def encode_examples(
    examples: list[Example], tokenizer: WordPieceTokenizer, kind: str, label_to_id: dict[str, int], max_length: int,
    resplit: bool = True,
) -> Encoded:
    """Subword ids, token types and labels of ``examples``, cut to ``max_length`` positions.

    Token tasks: each file token is split into the model's words (the tokenizer's own splitter, ``split_words``; skipped with
    ``resplit=False`` when the tokens are the model's words already), then into subwords.
    """
    out = Encoded([], [], [], [])
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    if kind == "classification":
        a = tokenizer.encode_words_batch([tokenizer.split_words(ex.text) for ex in examples])
        has_b = [ex.text_b is not None for ex in examples]
        b_words = [tokenizer.split_words(ex.text_b) for ex in examples if ex.text_b is not None]
        b_iter = iter(tokenizer.encode_words_batch(b_words))
        for ex, ids_a, pair in zip(examples, a, has_b):
            ids_b = next(b_iter) if pair else None
            budget = max_length - (3 if pair else 2)
            if len(ids_a) + len(ids_b or []) > budget:
                out.truncated += 1
                if pair:  # longest first, one subword at a time (as HF's "longest_first")
                    ids_a, ids_b = list(ids_a), list(ids_b)
                    while len(ids_a) + len(ids_b) > budget:
                        (ids_a if len(ids_a) > len(ids_b) else ids_b).pop()
                else:
                    ids_a = ids_a[:budget]
            seq = [cls, *ids_a, sep] + ([*ids_b, sep] if pair else [])
            types = [0] * (len(ids_a) + 2) + ([1] * (len(ids_b) + 1) if pair else [])
            out.ids.append(np.array(seq, dtype=np.int64))
            out.types.append(np.array(types, dtype=np.int64))
            out.labels.append(np.array([label_to_id.get(ex.label, IGNORE_INDEX)], dtype=np.int64))
            out.token_pos.append(np.zeros(0, dtype=np.int64))
        return out
    flat: list[list[str]] = []
    owners: list[list[int]] = []
    for ex in examples:
        words, owner = [], []
        for t, token in enumerate(ex.tokens):
            parts = tokenizer.split_words(token) if resplit else [token]
            words += parts
            owner += [t] * len(parts)
        flat.append(words)
        owners.append(owner)
    encoded = tokenizer.encode_words_with_word_ids(flat) if flat else []
    for ex, owner, (ids, word_ids) in zip(examples, owners, encoded):
        budget = max_length - 2
        if len(ids) > budget:
            out.truncated += 1
            ids, word_ids = ids[:budget], word_ids[:budget]
        labels = np.full(len(ids) + 2, IGNORE_INDEX, dtype=np.int64)
        pos = np.full(len(ex.tokens), -1, dtype=np.int64)
        for p, w in enumerate(word_ids):
            if w is None:
                continue
            t = owner[w]
            if pos[t] < 0:
                pos[t] = p + 1
                labels[p + 1] = label_to_id.get(ex.tags[t], IGNORE_INDEX)
        out.ids.append(np.array([cls, *ids, sep], dtype=np.int64))
        out.types.append(np.zeros(len(ids) + 2, dtype=np.int64))
        out.labels.append(labels)
        out.token_pos.append(pos)
    return out


# ----------------------------------------------------------------------------- batches


@dataclass
class PackedRows:
    input_ids: np.ndarray  # (R, T)
    token_type_ids: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray  # 1.. per sequence, 0 = padding
    positions: np.ndarray  # (N,) flat indices of the scored positions
    labels: np.ndarray  # (N,)
    owners: list[tuple[int, int]]  # per scored position: (example index, position within it)
    n_tokens: int
    n_slots: int


def pack(enc: Encoded, indices, max_length: int, pad_id: int, kind: str, scored_only: bool = True) -> PackedRows:
    """Sequences ``indices`` of ``enc`` packed into rows; the scored positions gathered:
    [CLS] for classification, labelled first subwords for tokens (all first subwords when
    ``scored_only`` is False, for prediction)."""
    indices = [int(i) for i in indices]
    costs = [len(enc.ids[i]) for i in indices]
    rows = pack_rows(costs, max_length)
    width = max(sum(costs[k] for k in row) for row in rows)
    R = len(rows)
    ids = np.full((R, width), pad_id, dtype=np.int64)
    typ = np.zeros((R, width), dtype=np.int64)
    pos = np.zeros((R, width), dtype=np.int64)
    seg = np.zeros((R, width), dtype=np.int64)
    where, labels, owners = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for s, k in enumerate(row, start=1):
            i, n = indices[k], costs[k]
            ids[r, at : at + n] = enc.ids[i]
            typ[r, at : at + n] = enc.types[i]
            pos[r, at : at + n] = np.arange(n)
            seg[r, at : at + n] = s
            base = r * width + at
            if kind == "classification":
                where.append(base)
                labels.append(int(enc.labels[i][0]))
                owners.append((i, 0))
            else:
                lab = enc.labels[i]
                firsts = enc.token_pos[i]
                chosen = np.flatnonzero(lab != IGNORE_INDEX) if scored_only else np.unique(firsts[firsts >= 0])
                where += (base + chosen).tolist()
                labels += lab[chosen].tolist()
                owners += [(i, int(p)) for p in chosen]
            at += n
    return PackedRows(ids, typ, pos, seg, np.array(where, dtype=np.int64), np.array(labels, dtype=np.int64), owners,
                      int(sum(costs)), int(ids.size))


# ----------------------------------------------------------------------------- model


class FinetuneModel(nn.Module):
    """An encoder with a classification head. ``kind``: classification | ner | tagging."""

    def __init__(self, encoder: BertForMaskedLM, num_labels: int, kind: str, dropout: float | None = None) -> None:
        super().__init__()
        config = encoder.config
        H = config.hidden_size
        encoder.head = None  # the MLM head is not used (its decoder weight is the word table, kept)
        self.bert = encoder
        self.kind = kind
        self.num_labels = num_labels
        self.sequence = kind == "classification"
        self.pooler = nn.Linear(H, H) if self.sequence else None
        self.drop = nn.Dropout(config.dropout if dropout is None else dropout)
        self.classifier = nn.Linear(H, num_labels)
        for m in (self.pooler, self.classifier):
            if m is not None:
                nn.init.normal_(m.weight, std=config.initializer_range)
                nn.init.zeros_(m.bias)

    @property
    def config(self) -> ModelConfig:
        return self.bert.config

    def forward(self, input_ids, token_type_ids, position_ids, attention_mask, positions) -> torch.Tensor:
        """Logits (N, L) at ``positions`` (flat indices into the (R*T) positions)."""
        hidden = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids)  # (R, T, H)
        h = hidden.flatten(0, 1).index_select(0, positions)  # (N, H)
        if self.pooler is not None:
            h = torch.tanh(self.pooler(h))
        return self.classifier(self.drop(h))


def _tensors(batch: PackedRows, device: torch.device) -> dict[str, torch.Tensor]:
    t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    return {
        "input_ids": t(batch.input_ids), "token_type_ids": t(batch.token_type_ids),
        "position_ids": t(batch.position_ids), "attention_mask": block_diagonal_mask(t(batch.segment_ids)),
        "positions": t(batch.positions),
    }


def _optimizer(model: nn.Module, cfg: FinetuneConfig, fused: bool) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def tokens_per_batch(enc: Encoded, batch_size: int, max_length: int) -> int:
    return max(max_length, int(enc.lengths.max()), round(batch_size * float(enc.lengths.mean())))


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0  # real tokens seen ([CLS]/[SEP] included)
    slots: int = 0  # positions computed (real + padding)
    seconds: float = 0.0
    final_loss: float = float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train_head(
    model: FinetuneModel, enc: Encoded, cfg: FinetuneConfig, seed: int, device: torch.device,
    amp_dtype: torch.dtype | None = None, on_step: Callable[[int, float], None] | None = None,
) -> TrainStats:
    """Fine-tune ``model`` in place on ``enc`` within the budget of ``cfg``."""
    L = model.config.max_position_embeddings
    pad = model.config.pad_token_id
    keep = [i for i in range(len(enc.ids)) if (enc.labels[i] != IGNORE_INDEX).any()]
    if not keep:
        raise ValueError("no scored training examples")
    lengths = enc.lengths[keep] - 2
    plan = TokenBatchPlan(lengths, tokens_per_batch(enc, cfg.batch_size, L), seed)
    total = cfg.max_steps or plan.total_micro_batches(cfg.epochs)
    warmup = max(1, math.ceil(cfg.warmup_ratio * total)) if cfg.warmup_ratio > 0 else 0
    model.to(device).train()
    optimizer = _optimizer(model, cfg, fused=device.type == "cuda")
    forward = torch.compile(model, dynamic=True) if cfg.compile else model
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    stats = TrainStats()
    budget = cfg.minutes * 60.0 if cfg.minutes else None
    started = time.perf_counter()
    keep_arr = np.array(keep)
    for step in range(total):
        _, idx = plan.indices(step)
        batch = pack(enc, keep_arr[idx], L, pad, model.kind)
        lr = cfg.learning_rate * lr_factor(step, total, warmup)
        if budget is not None:  # the time budget's share, when it runs out faster than the steps
            elapsed = time.perf_counter() - started
            lr = min(lr, cfg.learning_rate * max(0.0, 1.0 - elapsed / budget))
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs = _tensors(batch, device)
        labels = torch.from_numpy(batch.labels).to(device)
        with autocast():
            logits = forward(**inputs)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        stats.steps += 1
        stats.tokens += batch.n_tokens
        stats.slots += batch.n_slots
        if on_step is not None or step == total - 1:
            stats.final_loss = float(loss.detach())
            if on_step is not None:
                on_step(step, stats.final_loss)
        if budget is not None and time.perf_counter() - started >= budget:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - started
    stats.final_loss = float(loss.detach())
    model.eval()
    return stats


@torch.no_grad()
def predict_ids(model: FinetuneModel, enc: Encoded, device: torch.device, tokens_budget: int | None = None,
                amp_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Per example: [label id] (classification) or a label id per file token (-1: no subword,
    e.g. cut off by truncation)."""
    model.eval().to(device)
    L = model.config.max_position_embeddings
    order = np.argsort(enc.lengths, kind="stable")
    budget = tokens_budget or max(L, 64 * L // 4)
    out: list[list[int]] = [[] for _ in enc.ids]
    scores: dict[tuple[int, int], int] = {}
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    start = 0
    while start < len(order):
        used, end = 0, start
        while end < len(order) and (end == start or used + enc.lengths[order[end]] <= budget):
            used += int(enc.lengths[order[end]])
            end += 1
        batch = pack(enc, order[start:end], L, model.config.pad_token_id, model.kind, scored_only=False)
        start = end
        if not len(batch.positions):
            continue
        with autocast():
            logits = model(**_tensors(batch, device))
        best = logits.float().argmax(-1).cpu().tolist()
        for owner, b in zip(batch.owners, best):
            scores[owner] = b
    for i in range(len(enc.ids)):
        if model.kind == "classification":
            out[i] = [scores[(i, 0)]]
        else:
            out[i] = [scores.get((i, int(p)), -1) if p >= 0 else -1 for p in enc.token_pos[i]]
    return out


def score(kind: str, examples: list[Example], predicted: list[list[int]], labels: list[str]) -> dict[str, float]:
    """Metrics of predictions (label ids) against the examples' own labels (file tokens)."""
    if kind == "classification":
        gold = [ex.label for ex in examples]
        pred = [labels[p[0]] for p in predicted]
        f1 = macro_f1(gold, pred)
        return {"accuracy": accuracy(gold, pred), "macro_f1": f1, "f1": f1, "n": len(gold)}
    none = "O" if kind == "ner" else None  # a token with no subword: outside any entity / wrong
    gold_seqs = [list(ex.tags) for ex in examples]
    pred_seqs = [[labels[p] if p >= 0 else none for p in ps] for ps in predicted]
    if kind == "ner":
        ent = entity_scores(gold_seqs, [[t or "O" for t in s] for s in pred_seqs])
        flat_g = [t for s in gold_seqs for t in s]
        flat_p = [t for s in pred_seqs for t in s]
        return {"accuracy": accuracy(flat_g, flat_p), "precision": ent["precision"], "recall": ent["recall"],
                "f1": ent["f1"], "n": len(flat_g), "entities": ent["entities"]}
    pairs = [(g, p) for gs, ps in zip(gold_seqs, pred_seqs) for g, p in zip(gs, ps) if g != UNSEEN]
    flat_g = [g for g, _ in pairs]
    flat_p = [p if p is not None else "<none>" for _, p in pairs]
    f1 = macro_f1(flat_g, flat_p)
    return {"accuracy": accuracy(flat_g, flat_p), "macro_f1": f1, "f1": f1, "n": len(flat_g)}


# ----------------------------------------------------------------------------- the experiment


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class FinetuneResult:
    task: str
    kind: str
    labels: list[str]
    split: dict
    truncated: int
    runs: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    model: FinetuneModel | None = None  # the pre-trained model fine-tuned with the first seed

    def as_dict(self) -> dict:
        return {"task": self.task, "kind": self.kind, "labels": self.labels, "split": self.split,
                "truncated": self.truncated, "runs": self.runs, "summary": self.summary}


def finetune(
    encoder: BertForMaskedLM, tokenizer: WordPieceTokenizer, data: TaskData, cfg: FinetuneConfig,
    device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None, *, resplit: bool = True,
    log: Callable[[str], None] | None = None, on_step: Callable[[str, int, int, float], None] | None = None,
    inits: list[str] | None = None, arms_dir: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune ``encoder`` (copied, never changed) on ``data`` with ``cfg.seeds`` seeds, and the
    random-init control when ``cfg.baseline == "random"``; score on the test split (or the
    pooled held-out folds of k-fold cross-validation) and the dev split when there is one.
    ``inits`` picks the arms explicitly (e.g. ``["random"]``: the control alone).

    ``arms_dir``: each finished arm (one init and seed: a training run, or all folds of one) is
    recorded there as it ends, and an arm recorded for the same encoder weights, data and
    settings is read back instead of trained again, so an interrupted fine-tuning resumes at
    the first unfinished arm (that arm starts over)."""
    device = torch.device(device)
    log = log or (lambda msg: None)
    labels = data.labels
    label_to_id = {label: i for i, label in enumerate(labels)}
    L = encoder.config.max_position_embeddings
    resplit = resplit and data.kind != "tagging"
    enc_all = {name: encode_examples(getattr(data, name), tokenizer, data.kind, label_to_id, L, resplit)
               for name in ("train", "dev", "test")}
    truncated = sum(e.truncated for e in enc_all.values())
    if truncated:
        cut = {"classification": "the text past the cut is not read", "ner": "tokens past the cut are predicted O",
               "tagging": "tokens past the cut count as wrong"}[data.kind]
        log(f"{truncated} example(s) longer than the model's {L} positions were truncated ({cut})")
    result = FinetuneResult(data.name, data.kind, labels, data.split, truncated)
    inits = inits or ["pretrained"] + (["random"] if cfg.baseline == "random" else [])
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    arms = ArmRecords(arms_dir, arm_basis(state, data, cfg, resplit)) if arms_dir is not None else None

    def fresh(init: str, seed: int) -> FinetuneModel:
        torch.manual_seed(seed)
        body = BertForMaskedLM(encoder.config)
        if init == "pretrained":
            body.load_state_dict(state)
        torch.manual_seed(seed + 1_000_003)  # the head starts the same in both arms of a seed
        return FinetuneModel(body, len(labels), data.kind, cfg.classifier_dropout)

    def train_arm(init: str, seed: int, keep_model: bool, step_cb) -> tuple[dict, str]:
        """Train and score one arm; sets ``result.model`` when ``keep_model``."""
        run = {"init": init, "seed": seed}
        if data.folds is None:
            model = fresh(init, seed)
            stats = train_head(model, enc_all["train"], cfg, seed, device, amp_dtype, step_cb)
            run["test"] = score(data.kind, data.test, predict_ids(model, enc_all["test"], device, amp_dtype=amp_dtype), labels)
            if data.dev:
                run["dev"] = score(data.kind, data.dev, predict_ids(model, enc_all["dev"], device, amp_dtype=amp_dtype), labels)
            if keep_model:
                result.model = model.cpu()
        else:  # k-fold: pool the held-out predictions of every fold
            pooled: dict[int, list[int]] = {}
            stats = TrainStats()
            for k, held in enumerate(data.folds):
                held_set = set(held)
                rest = [i for i in range(len(data.train)) if i not in held_set]
                sub = _subset(enc_all["train"], rest)
                model = fresh(init, seed)
                st = train_head(model, sub, cfg, seed * 100 + k, device, amp_dtype, step_cb)
                for key in ("steps", "tokens", "slots", "seconds"):
                    setattr(stats, key, getattr(stats, key) + getattr(st, key))
                stats.final_loss = st.final_loss
                for i, p in zip(held, predict_ids(model, _subset(enc_all["train"], held), device, amp_dtype=amp_dtype)):
                    pooled[i] = p
                if keep_model and k == len(data.folds) - 1:
                    result.model = model.cpu()
            order = sorted(pooled)
            run["test"] = score(data.kind, [data.train[i] for i in order], [pooled[i] for i in order], labels)
        run.update(steps=stats.steps, tokens=stats.tokens, padding_share=1 - stats.tokens / max(stats.slots, 1),
                   seconds=round(stats.seconds, 3), tokens_per_s=round(stats.tokens_per_s, 1),
                   final_loss=stats.final_loss)
        return run, f"{stats.steps} steps, {stats.seconds:.1f}s"

    for s in range(cfg.seeds):
        seed = cfg.seed + s
        for init in inits:
            tag = f"{init}/seed {seed}"
            step_cb = (lambda step, loss, _t=tag: on_step(_t, seed, step, loss)) if on_step else None
            keep_model = init == "pretrained" and result.model is None  # the arm whose model is returned
            done = arms.load(init, seed, keep_model) if arms is not None else None
            if done is not None:
                run, model_state = done
                if keep_model:
                    result.model = fresh(init, seed)
                    result.model.load_state_dict(model_state)
                    result.model.eval()
                how = "resumed: recorded by an earlier, interrupted fine-tuning"
            else:
                run, how = train_arm(init, seed, keep_model, step_cb)
                if arms is not None:
                    arms.save(init, seed, run, result.model if keep_model else None)
            log(f"{tag}: test f1 {run['test']['f1']:.4f} accuracy {run['test']['accuracy']:.4f} ({how})")
            result.runs.append(run)
    result.summary = summarize(result.runs)
    return result


def arm_basis(state: dict[str, torch.Tensor], data: TaskData, cfg: FinetuneConfig, resplit: bool) -> str:
    """What an arm's result depends on: the encoder's weights (their bytes), the task's data and
    split, and the settings (not ``compile``, which changes speed only)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("compile", "seeds", "baseline")}
    return fingerprint(h.hexdigest(), data.name, data.kind, data.labels, data.split, resplit, settings,
                       [[(ex.text, ex.text_b, ex.label, ex.tokens, ex.tags) for ex in getattr(data, part)]
                        for part in ("train", "dev", "test")], data.folds)


class ArmRecords:
    """Finished arms on disk: ``<init>-seed<seed>.json`` (the arm's scores and the basis they were
    measured on) and, for the arm whose model is returned, ``<init>-seed<seed>.pt``; both written
    atomically, the model first, so a record never names a model that is not there."""

    def __init__(self, directory: str | Path, basis: str):
        self.dir, self.basis = Path(directory), basis

    def _path(self, init: str, seed: int, suffix: str) -> Path:
        return self.dir / f"{init}-seed{seed}{suffix}"

    def load(self, init: str, seed: int, with_model: bool) -> tuple[dict, dict | None] | None:
        path = self._path(init, seed, ".json")
        try:
            record = read_json(path)
        except (OSError, ValueError):
            return None
        if record.get("basis") != self.basis:  # other weights, data or settings: train it again
            return None
        model_state = None
        if with_model:
            try:
                model_state = torch.load(self._path(init, seed, ".pt"), map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, ValueError):
                return None
        return record["run"], model_state

    def save(self, init: str, seed: int, run: dict, model: FinetuneModel | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if model is not None:
            with atomic_path(self._path(init, seed, ".pt")) as tmp:
                torch.save(model.state_dict(), tmp)
        atomic_write_json(self._path(init, seed, ".json"), {"basis": self.basis, "run": run})


def _subset(enc: Encoded, idx: list[int]) -> Encoded:
    return Encoded([enc.ids[i] for i in idx], [enc.types[i] for i in idx], [enc.labels[i] for i in idx],
                   [enc.token_pos[i] for i in idx])


def summarize(runs: list[dict]) -> dict:
    """Mean and spread (sample std over seeds) of the test scores per arm, the gain of
    pre-training, and whether it is beyond the spread (the arms' mean +- std do not overlap)."""
    out: dict = {}
    for init, prefix in (("pretrained", ""), ("random", "random_")):
        mine = [r for r in runs if r["init"] == init]
        if not mine:
            continue
        for metric in ("f1", "accuracy"):
            mean, std = _mean_std([r["test"][metric] for r in mine])
            out[f"{prefix}{metric}"], out[f"{prefix}{metric}_std"] = mean, std
        out[f"{prefix}seeds"] = len(mine)
    if "random_f1" in out and "f1" in out:
        out["gain"] = out["f1"] - out["random_f1"]
        out["accuracy_gain"] = out["accuracy"] - out["random_accuracy"]
        out["separated"] = bool(abs(out["gain"]) > out["f1_std"] + out["random_f1_std"])
    return out


# ----------------------------------------------------------------------------- saving


def save_finetuned(path: str | Path, model: FinetuneModel, tokenizer: WordPieceTokenizer, labels: list[str],
                   meta: dict | None = None) -> Path:
    """A fine-tuned model directory: config.json (model + ``finetune`` record), vocab.txt, model.pt."""
    import json

    path = Path(path)
    with atomic_dir(path) as tmp:
        record = {"model": model.config.model_dump(),
                  "finetune": {"kind": model.kind, "labels": labels, **(meta or {})}}
        (tmp / CONFIG).write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
        tokenizer.save(tmp / VOCAB)
        torch.save(model.state_dict(), tmp / MODEL)
    return path


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> tuple[FinetuneModel, WordPieceTokenizer, list[str]]:
    path = Path(path)
    meta = read_json(path / CONFIG)
    if "finetune" not in meta:
        raise ValueError(f"{path} is not a fine-tuned Melos model (no 'finetune' in its config.json)")
    labels = meta["finetune"]["labels"]
    model = FinetuneModel(BertForMaskedLM(ModelConfig(**meta["model"])), len(labels), meta["finetune"]["kind"])
    model.load_state_dict(torch.load(path / MODEL, map_location=device, weights_only=True))
    return model.to(device).eval(), WordPieceTokenizer.from_file(path / VOCAB), labels


def copy_encoder(model: BertForMaskedLM) -> BertForMaskedLM:
    return copy.deepcopy(model)
