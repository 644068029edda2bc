"""Stage 5: held-out masked-LM metrics, a unigram baseline, fill-mask examples, a report.

The evaluation mask is fixed by ``EvalConfig`` (rate and seed) and does not depend on the
training mask settings, so runs trained with different masking are scored on exactly the
same positions. Every selected position is replaced by [MASK] (no random/kept tokens), so
top-k accuracy measures filling a blank, with no credit for tokens left visible.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .config import EvalConfig
from .data import EncodedCorpus, eval_sample, fixed_eval_batches
from .io import atomic_write_json, atomic_write_text
from .masking import IGNORE_INDEX, MaskSpec
from .model import BertForMaskedLM
from .tokenizer import MecabWords, WordPieceTokenizer


def unigram_counts(corpus: EncodedCorpus, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """Token frequencies of the (encoded) training split, streamed in chunks."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, corpus.num_tokens, chunk):
        counts += np.bincount(np.asarray(corpus.ids[start : start + chunk], dtype=np.int64), minlength=vocab_size)
    return counts


@torch.no_grad()
def evaluate_heldout(
    model: BertForMaskedLM,
    tokenizer: WordPieceTokenizer,
    heldout: EncodedCorpus,
    train_counts: np.ndarray,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Masked-token loss, perplexity, top-1/top-5 accuracy, and the unigram baseline."""
    if len(heldout) == 0:
        raise ValueError("the held-out split is empty: raise heldout_fraction or add text to evaluate")
    model.eval()
    spec = MaskSpec(rate=cfg.mask_rate, mask_token_prob=1.0, random_token_prob=0.0)
    counts = train_counts.copy()
    counts[: tokenizer.num_special] = -1  # the baseline never predicts special tokens
    baseline_top = torch.from_numpy(np.argsort(-counts, kind="stable")[:5].copy())
    loss_sum = 0.0
    n = top1 = top5 = base1 = base5 = 0
    sample = eval_sample(len(heldout), cfg.max_sentences, cfg.seed)
    for batch in fixed_eval_batches(heldout, tokenizer, spec, cfg.seed, cfg.batch_size, cfg.passes, sample):
        input_ids = torch.from_numpy(batch.input_ids).to(device)
        attention = torch.from_numpy(batch.attention_mask).to(device)
        labels = torch.from_numpy(batch.labels).to(device)
        scored = labels != IGNORE_INDEX
        if not scored.any():
            continue
        # the vocabulary projection only where it is scored: ~15% of positions, so the
        # head's (B, T, V) logits are never materialised
        hidden = model.encode(input_ids, attention_mask=attention)  # (B, T, H)
        picked = model.head(hidden[scored]).float()  # (N, V)
        target = labels[scored]  # (N,)
        loss_sum += float(torch.nn.functional.cross_entropy(picked, target, reduction="sum"))
        top = picked.topk(5, dim=-1).indices  # (N, 5)
        top1 += int((top[:, 0] == target).sum())
        top5 += int((top == target[:, None]).any(dim=-1).sum())
        target_cpu = target.cpu()
        base1 += int((target_cpu == baseline_top[0]).sum())
        base5 += int(torch.isin(target_cpu, baseline_top).sum())
        n += int(target.numel())
    if n == 0:
        raise ValueError("the evaluation mask selected no tokens: the held-out sentences are too short")
    loss = loss_sum / n
    return {
        "eval/masked_tokens": n,
        "eval/sentences": len(heldout) if sample is None else len(sample),
        "eval/loss": loss,
        "eval/perplexity": math.exp(min(loss, 50.0)),
        "eval/top1_accuracy": top1 / n,
        "eval/top5_accuracy": top5 / n,
        "eval/unigram_top1_accuracy": base1 / n,
        "eval/unigram_top5_accuracy": base5 / n,
    }


@torch.no_grad()
def fill_mask(
    model: BertForMaskedLM,
    tokenizer: WordPieceTokenizer,
    text: str,
    top_k: int = 5,
    mecab: MecabWords | None = None,
    device: torch.device | str = "cpu",
) -> list[list[tuple[str, float]]]:
    """Top-k (token, probability) for each [MASK] in ``text``, left to right."""
    ids = tokenizer.encode_text(text, mecab or MecabWords())
    if tokenizer.mask_id not in ids:
        raise ValueError(f"no [MASK] in {text!r}: write the token to predict as [MASK]")
    limit = model.config.max_position_embeddings - 2
    if len(ids) > limit:
        raise ValueError(f"{text!r} is {len(ids)} subwords long; this model reads at most {limit}")
    model.eval()
    input_ids = torch.tensor([[tokenizer.cls_id, *ids, tokenizer.sep_id]], device=device)
    logits, _ = model(input_ids)
    positions = (input_ids[0] == tokenizer.mask_id).nonzero().flatten()
    out = []
    for pos in positions:
        probs = logits[0, pos].float().softmax(-1)
        probs[: tokenizer.num_special] = 0.0  # a filled blank is never [PAD]/[CLS]/...
        values, indices = probs.topk(top_k)
        out.append([(tokenizer.vocab[int(i)], float(v)) for v, i in zip(values, indices)])
    return out


def metrics_table(metrics: dict) -> list[str]:
    """The held-out metrics against the unigram baseline, as Markdown table lines."""
    return [
        "| metric | model | unigram baseline |",
        "|---|---|---|",
        f"| top-1 accuracy | {metrics['eval/top1_accuracy']:.4f} | {metrics['eval/unigram_top1_accuracy']:.4f} |",
        f"| top-5 accuracy | {metrics['eval/top5_accuracy']:.4f} | {metrics['eval/unigram_top5_accuracy']:.4f} |",
        f"| masked-token loss | {metrics['eval/loss']:.4f} | |",
        f"| perplexity | {metrics['eval/perplexity']:.2f} | |",
        f"| masked tokens / sentences | {int(metrics['eval/masked_tokens'])} / {int(metrics['eval/sentences'])} | |",
    ]


def render_markdown(metrics: dict, examples: list[dict], context: dict) -> str:
    lines = ["# Melos evaluation report", ""]
    for key, value in context.items():
        if key != "eval mask":  # shown with the metrics below
            lines.append(f"- **{key}**: {value}")
    lines += [
        "",
        "## Held-out masked-token metrics",
        "",
        f"Fixed evaluation mask: {context.get('eval mask', '')}",
        "",
        *metrics_table(metrics),
        "",
        "## Fill-mask examples",
        "",
    ]
    for ex in examples:
        lines.append(f"**{ex['text']}**")
        lines.append("")
        for i, preds in enumerate(ex["predictions"], 1):
            shown = ", ".join(f"{tok} ({p:.3f})" for tok, p in preds)
            lines.append(f"- [MASK] #{i}: {shown}")
        lines.append("")
    return "\n".join(lines)


def write_report(out_dir: Path, metrics: dict, examples: list[dict], context: dict) -> tuple[Path, Path]:
    """``report.json`` and ``report.md``, written atomically."""
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    atomic_write_json(json_path, {"metrics": metrics, "fill_mask": examples, "context": context})
    atomic_write_text(md_path, render_markdown(metrics, examples, context))
    return json_path, md_path
