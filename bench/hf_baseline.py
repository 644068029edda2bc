"""The Hugging Face ``BertForMaskedLM`` baseline the training benchmarks measure us against.

Two ways people feed it: every sentence padded to 128 (the seed notebook's way), or
run_mlm's ``group_texts`` (sentences concatenated and cut into 128-token blocks); masks and
labels from ``DataCollatorForLanguageModeling`` either way. ``data`` is anything with
``tokenizer``, ``train`` and ``heldout`` (encoded corpora), e.g. ``aozora_data.Prepared``.
Needs the ``bench`` extra (transformers).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from mlm_core.data import fixed_eval_batches
from mlm_core.masking import IGNORE_INDEX, MaskSpec
from mlm_core.schedule import lr_factor

SHAPE = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, max_length=128)
LR, WARMUP = 1e-3, 0.06


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def heldout_loss(forward, data, n_sentences: int, device: torch.device = torch.device("cpu"),
                 amp_dtype: torch.dtype | None = None) -> float:
    """Mean masked-token loss on the first ``n_sentences`` held-out sentences, fixed 15% masks."""
    spec = MaskSpec(rate=0.15, mask_token_prob=1.0, random_token_prob=0.0)
    total, count = 0.0, 0
    chosen = np.arange(min(n_sentences, len(data.heldout)))
    for b in fixed_eval_batches(data.heldout, data.tokenizer, spec, 1234, 64, 1, chosen):
        with autocast(device, amp_dtype):
            logits = forward(torch.from_numpy(b.input_ids).to(device), torch.from_numpy(b.attention_mask).to(device))
        labels = torch.from_numpy(b.labels).to(device)
        scored = labels != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[scored].float(), labels[scored], reduction="sum"))
        count += int(scored.sum())
    return total / count


def hf_setup(data, vocab_file: Path, shape: dict = SHAPE):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, DataCollatorForLanguageModeling

    hf_tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=False, tokenize_chinese_chars=False)
    config = BertConfig(vocab_size=len(data.tokenizer), hidden_size=shape["hidden_size"],
                        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                        intermediate_size=shape["intermediate_size"], max_position_embeddings=shape["max_length"],
                        pad_token_id=data.tokenizer.pad_id)
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    collator = DataCollatorForLanguageModeling(hf_tok, mlm=True, mlm_probability=0.15, return_tensors="pt")
    return model, collator


def sentence_order(data, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(len(data.train))


def with_specials(data, i: int) -> list[int]:
    return [data.tokenizer.cls_id, *data.train[int(i)].tolist(), data.tokenizer.sep_id]


def padded_examples(data, order: np.ndarray, rows: int, length: int = 128):
    """The notebook's batches: ``rows`` sentences, each padded to ``length``; yields (features, useful tokens)."""
    for start in range(0, len(order), rows):
        feats, useful = [], 0
        for i in order[start : start + rows]:
            ids = with_specials(data, i)
            useful += len(ids)
            feats.append({"input_ids": ids + [data.tokenizer.pad_id] * (length - len(ids)),
                          "attention_mask": [1] * len(ids) + [0] * (length - len(ids))})
        yield feats, useful


def grouped_examples(data, order: np.ndarray, rows: int, length: int = 128):
    """run_mlm's group_texts: sentences concatenated, cut into ``length``-token blocks, ``rows`` a batch."""
    buffer: list[int] = []
    feats: list[dict] = []
    for i in order:
        buffer += with_specials(data, i)
        while len(buffer) >= length:
            feats.append({"input_ids": buffer[:length], "attention_mask": [1] * length})
            buffer = buffer[length:]
            if len(feats) == rows:
                yield feats, rows * length
                feats = []


def hf_train(data, vocab_file: Path, batches, warmup: int, max_steps: int, train_tokens: int | None,
             total_steps: int, *, shape: dict = SHAPE, device: torch.device = torch.device("cpu"),
             amp_dtype: torch.dtype | None = None):
    """Train as a user of ``transformers`` would (AdamW, warm-up + linear decay, clipping),
    on ``device`` under bf16 autocast when ``amp_dtype`` is given. Returns (model, [(useful
    tokens, tokens/s) per step], useful tokens seen); collation counts in each step's time."""
    model, collator = hf_setup(data, vocab_file, shape)
    model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, eps=1e-6, fused=device.type == "cuda" or None)
    model.train()
    times: list[tuple[float, float]] = []
    seen = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step, (feats, useful) in enumerate(batches):
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in collator(feats).items()}
        for g in opt.param_groups:
            g["lr"] = LR * lr_factor(step, total_steps, max(1, math.ceil(WARMUP * total_steps)))
        with autocast(device, amp_dtype):
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()
        dt = time.perf_counter() - t0
        times.append((useful, useful / dt))
        seen += useful
        if (train_tokens is None and step + 1 >= max_steps) or (train_tokens is not None and seen >= train_tokens):
            break
    model.eval()
    return model, times, seen
