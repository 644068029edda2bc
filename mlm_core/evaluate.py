"""Stage 5: held-out masked-LM metrics, a unigram baseline, fill-mask examples, a report.

The evaluation mask is fixed by ``EvalConfig`` (rate and seed) and does not depend on the
training mask settings, so runs trained with different masking are scored on exactly the
same positions. Every selected position is replaced by [MASK] (no random/kept tokens), so
top-k accuracy measures filling a blank, with no credit for tokens left visible.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from .config import EvalConfig
from .data import POS_CLASSES, EncodedCorpus, eval_sample, fixed_eval_batches, framed_pos
from .io import atomic_write_json, atomic_write_text
from .masking import IGNORE_INDEX, MaskSpec
from .model import BertForMaskedLM
from .pause import pause_point
from .pll import pseudo_log_likelihood
from .tokenizer import MecabWords, WordPieceTokenizer


# Metric names of the POS classes (MLflow keys stay ASCII), in POS_CLASSES order.
POS_NAMES = tuple(zip(POS_CLASSES, (
    "noun", "pronoun", "adjectival_noun", "adnominal", "adverb", "conjunction", "interjection", "verb",
    "adjective", "auxiliary_verb", "particle", "prefix", "suffix", "symbol", "punctuation", "whitespace", "other",
)))


def unigram_counts(corpus: EncodedCorpus, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """Token frequencies of the (encoded) training split, streamed in chunks."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, corpus.num_tokens, chunk):
        counts += np.bincount(np.asarray(corpus.ids[start : start + chunk], dtype=np.int64), minlength=vocab_size)
    return counts


def class_unigram_counts(corpus: EncodedCorpus, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray | None:
    """(classes, vocab) token frequencies per part of speech of the training split (None if
    the corpus carries no parts of speech)."""
    if corpus.pos is None:
        return None
    counts = np.zeros(len(POS_CLASSES) * vocab_size, dtype=np.int64)
    for start in range(0, corpus.num_tokens, chunk):
        ids = np.asarray(corpus.ids[start : start + chunk], dtype=np.int64)
        tags = np.asarray(corpus.pos[start : start + chunk], dtype=np.int64)
        counts += np.bincount(tags * vocab_size + ids, minlength=counts.size)
    return counts.reshape(len(POS_CLASSES), vocab_size)


def _top_ids(counts: np.ndarray, num_special: int, k: int = 5) -> np.ndarray:
    """The k most frequent ids of each row of counts, special tokens never."""
    counts = np.atleast_2d(counts).copy()
    counts[:, :num_special] = -1  # the baseline never predicts special tokens
    return np.argsort(-counts, axis=1, kind="stable")[:, :k]


@torch.no_grad()
def _score(model, tokenizer, heldout, spec, cfg, sample, baseline_top, device, class_top=None) -> dict:
    """Sums over the fixed evaluation masks: loss, top-1/5 hits of the model and the baseline,
    and (with ``class_top``) top-1 hits per part of speech of the model and of the class's
    own most frequent token."""
    sums = {"loss": 0.0, "n": 0, "top1": 0, "top5": 0, "base1": 0, "base5": 0}
    n_classes = len(POS_CLASSES)
    per_class = np.zeros((3, n_classes), dtype=np.int64)  # scored, model top-1, class-baseline top-1
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
        sums["loss"] += float(torch.nn.functional.cross_entropy(picked, target, reduction="sum"))
        top = picked.topk(5, dim=-1).indices  # (N, 5)
        hit1 = (top[:, 0] == target).cpu().numpy()
        sums["top1"] += int(hit1.sum())
        sums["top5"] += int((top == target[:, None]).any(dim=-1).sum())
        target_np = target.cpu().numpy()
        sums["base1"] += int((target_np == baseline_top[0]).sum())
        sums["base5"] += int(np.isin(target_np, baseline_top).sum())
        sums["n"] += int(target.numel())
        if class_top is not None:
            tags = framed_pos(heldout, batch.indices, batch.labels.shape[1])[batch.labels != IGNORE_INDEX]
            per_class[0] += np.bincount(tags, minlength=n_classes)
            per_class[1] += np.bincount(tags[hit1], minlength=n_classes)
            per_class[2] += np.bincount(tags[class_top[tags, 0] == target_np], minlength=n_classes)
    sums["per_class"] = per_class
    return sums


@torch.no_grad()
def evaluate_heldout(
    model: BertForMaskedLM,
    tokenizer: WordPieceTokenizer,
    heldout: EncodedCorpus,
    train_counts: np.ndarray,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
    train_class_counts: np.ndarray | None = None,
) -> dict[str, float]:
    """Masked-token loss, perplexity, top-1/top-5 accuracy, and the unigram baseline at the
    fixed token mask; when the held-out encoding carries words and parts of speech, also
    top-1/top-5 accuracy at a fixed whole-word mask of the same rate, top-1 accuracy per
    part of speech against the most frequent training token of that class (given
    ``train_class_counts``), and the word-l2r pseudo-perplexity of ``cfg.pll_sentences``."""
    if len(heldout) == 0:
        raise ValueError("the held-out split is empty: raise heldout_fraction or add text to evaluate")
    pause_point("evaluate")
    model.eval()
    spec = MaskSpec(rate=cfg.mask_rate, mask_token_prob=1.0, random_token_prob=0.0)
    baseline_top = _top_ids(train_counts, tokenizer.num_special)[0]
    with_pos = train_class_counts is not None and heldout.pos is not None
    class_top = _top_ids(train_class_counts, tokenizer.num_special, 1) if with_pos else None
    sample = eval_sample(len(heldout), cfg.max_sentences, cfg.seed)
    s = _score(model, tokenizer, heldout, spec, cfg, sample, baseline_top, device, class_top)
    n = s["n"]
    if n == 0:
        raise ValueError("the evaluation mask selected no tokens: the held-out sentences are too short")
    loss = s["loss"] / n
    metrics = {
        "eval/masked_tokens": n,
        "eval/sentences": len(heldout) if sample is None else len(sample),
        "eval/loss": loss,
        "eval/perplexity": math.exp(min(loss, 50.0)),
        "eval/top1_accuracy": s["top1"] / n,
        "eval/top5_accuracy": s["top5"] / n,
        "eval/unigram_top1_accuracy": s["base1"] / n,
        "eval/unigram_top5_accuracy": s["base5"] / n,
    }
    if with_pos:
        scored, hits, base = s["per_class"]
        for c, (_, name) in enumerate(POS_NAMES):
            if scored[c]:
                metrics[f"eval/pos/{name}/masked_tokens"] = int(scored[c])
                metrics[f"eval/pos/{name}/top1_accuracy"] = hits[c] / scored[c]
                metrics[f"eval/pos/{name}/unigram_top1_accuracy"] = base[c] / scored[c]
    if heldout.starts is not None:
        ww = _score(model, tokenizer, heldout, dataclasses.replace(spec, whole_word=True), cfg, sample,
                    baseline_top, device)
        if ww["n"]:
            metrics["eval/wwm_masked_tokens"] = ww["n"]
            metrics["eval/wwm_top1_accuracy"] = ww["top1"] / ww["n"]
            metrics["eval/wwm_top5_accuracy"] = ww["top5"] / ww["n"]
            metrics["eval/wwm_unigram_top1_accuracy"] = ww["base1"] / ww["n"]
        if cfg.pll_sentences:
            chosen = eval_sample(len(heldout), cfg.pll_sentences, cfg.seed + 1)
            chosen = np.arange(len(heldout)) if chosen is None else chosen
            metrics.update(pseudo_log_likelihood(model, tokenizer, heldout, chosen, device))
    return metrics


@torch.no_grad()
def fill_mask(
    model: BertForMaskedLM,
    tokenizer: WordPieceTokenizer,
    text: str,
    top_k: int = 5,
    mecab: MecabWords | None = None,
    device: torch.device | str = "cpu",
) -> list[list[tuple[str, float]]]:
    """Top-k (token, probability) for each [MASK] in ``text``, left to right.

    A typed [MASK] stands for a whole word (the text is cut into MeCab words around it), so
    it is never filled with a ``##`` continuation piece: those are left out of the top k
    (the probabilities shown are the model's, not renormalised)."""
    ids = tokenizer.encode_text(text, mecab)  # None: the tokenizer's own word splitter
    if tokenizer.mask_id not in ids:
        raise ValueError(f"no [MASK] in {text!r}: write the token to predict as [MASK]")
    limit = model.config.max_position_embeddings - 2
    if len(ids) > limit:
        raise ValueError(f"{text!r} is {len(ids)} subwords long; this model reads at most {limit}")
    model.eval()
    input_ids = torch.tensor([[tokenizer.cls_id, *ids, tokenizer.sep_id]], device=device)
    logits, _ = model(input_ids)
    positions = (input_ids[0] == tokenizer.mask_id).nonzero().flatten()
    barred = torch.zeros(len(tokenizer), dtype=torch.bool, device=device)
    barred[: tokenizer.num_special] = True  # a filled blank is never [PAD]/[CLS]/...
    barred[continuation_ids(tokenizer).to(device)] = True  # nor the middle of a word
    k = min(top_k, int((~barred).sum()))
    out = []
    for pos in positions:
        probs = logits[0, pos].float().softmax(-1).masked_fill(barred, -1.0)
        values, indices = probs.topk(k)
        out.append([(tokenizer.vocab[int(i)], float(v)) for v, i in zip(values, indices)])
    return out


def continuation_ids(tokenizer: WordPieceTokenizer) -> torch.Tensor:
    """Ids of the ``##`` pieces (continuations of a word) in the vocabulary."""
    return torch.tensor([i for i, t in enumerate(tokenizer.vocab) if t.startswith("##")], dtype=torch.long)


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
        *(
            [f"| whole-word mask: top-1 / top-5 accuracy | {metrics['eval/wwm_top1_accuracy']:.4f} / "
             f"{metrics['eval/wwm_top5_accuracy']:.4f} | {metrics['eval/wwm_unigram_top1_accuracy']:.4f} (top-1) |"]
            if "eval/wwm_top1_accuracy" in metrics else []
        ),
        *(
            [f"| pseudo-perplexity (word-l2r; {int(metrics['eval/pll_sentences'])} sentences, "
             f"{int(metrics['eval/pll_tokens'])} tokens) | {metrics['eval/pseudo_perplexity']:.2f} | |"]
            if "eval/pseudo_perplexity" in metrics else []
        ),
    ]


def pos_table(metrics: dict) -> list[str]:
    """Top-1 accuracy per part of speech against the class's most frequent training token."""
    rows = [
        f"| {ja} ({name}) | {int(metrics[f'eval/pos/{name}/masked_tokens'])} | "
        f"{metrics[f'eval/pos/{name}/top1_accuracy']:.4f} | {metrics[f'eval/pos/{name}/unigram_top1_accuracy']:.4f} |"
        for ja, name in POS_NAMES
        if f"eval/pos/{name}/masked_tokens" in metrics
    ]
    if not rows:
        return []
    return ["| part of speech | masked tokens | top-1 accuracy | class unigram baseline |", "|---|---|---|---|", *rows]


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
    ]
    if by_pos := pos_table(metrics):
        lines += [
            "## Top-1 accuracy per part of speech",
            "",
            "At the fixed token mask; the baseline always guesses the most frequent training token of the class.",
            "",
            *by_pos,
            "",
        ]
    lines += [
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
