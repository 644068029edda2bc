"""Stage 5: held-out masked-LM metrics, a unigram baseline, fill-mask examples, a report.

The evaluation mask is fixed by ``EvalConfig`` (rate and seed) and does not depend on the
training mask settings, so runs trained with different masking are scored on exactly the
same positions. Every selected position is replaced by [MASK] (no random/kept tokens), so
top-k accuracy measures filling a blank, with no credit for tokens left visible.

Held-out sentences are read the way training reads them: packed into rows of the model's
length with block-diagonal attention and positions restarting per sentence (``packing``),
the vocabulary head only at masked positions. A sentence's outputs are the same alone or
packed, and its mask is fixed by (seed, pass, sentence), so the scores equal those of the
padded one-sentence-per-row layout (kept as ``layout="padded"``, the reference the tests
and ``bench/eval_throughput.py`` compare against) up to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import EvalConfig
from .data import POS_CLASSES, EncodedCorpus, eval_sample, fixed_eval_batches, frame_rows, framed_pos, mask_rows
from .io import atomic_write_json, atomic_write_text
from .masking import IGNORE_INDEX, MaskSpec
from .model import BertForMaskedLM
from .packing import block_diagonal_mask, pack_rows
from .pause import pause_point
from .pll import pll_cost, pseudo_log_likelihood
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


class _Sums:
    """Running sums of one evaluation mask: loss, top-1/5 hits of the model and the unigram
    baseline, and per part of speech (scored, model top-1, class-baseline top-1)."""

    def __init__(self) -> None:
        self.loss, self.n, self.top1, self.top5, self.base1, self.base5 = 0.0, 0, 0, 0, 0, 0
        self.per_class = np.zeros((3, len(POS_CLASSES)), dtype=np.int64)

    def add(self, picked: torch.Tensor, target: torch.Tensor, baseline_top: np.ndarray,
            tags: np.ndarray | None = None, class_top: np.ndarray | None = None) -> None:
        """``picked`` (N, V) logits at the scored positions, ``target`` (N,) their tokens,
        ``tags`` (N,) their ``POS_CLASSES`` index (per-class sums need ``class_top`` too)."""
        self.loss += float(torch.nn.functional.cross_entropy(picked, target, reduction="sum"))
        top = picked.topk(5, dim=-1).indices  # (N, 5)
        hit1 = (top[:, 0] == target).cpu().numpy()
        self.top1 += int(hit1.sum())
        self.top5 += int((top == target[:, None]).any(dim=-1).sum())
        target_np = target.cpu().numpy()
        self.base1 += int((target_np == baseline_top[0]).sum())
        self.base5 += int(np.isin(target_np, baseline_top).sum())
        self.n += int(target.numel())
        if tags is not None and class_top is not None:
            k = self.per_class.shape[1]
            self.per_class[0] += np.bincount(tags, minlength=k)
            self.per_class[1] += np.bincount(tags[hit1], minlength=k)
            self.per_class[2] += np.bincount(tags[class_top[tags, 0] == target_np], minlength=k)


def _score_padded(model, tokenizer, heldout, spec, cfg, sample, baseline_top, device, class_top=None,
                  tick=None) -> _Sums:
    """The reference layout: one sentence per row, rows padded to the longest of
    ``cfg.batch_size`` sentences in corpus order (the head still only at scored positions)."""
    sums = _Sums()
    for batch in fixed_eval_batches(heldout, tokenizer, spec, cfg.seed, cfg.batch_size, cfg.passes, sample):
        input_ids = torch.from_numpy(batch.input_ids).to(device)
        attention = torch.from_numpy(batch.attention_mask).to(device)
        labels = torch.from_numpy(batch.labels).to(device)
        scored = labels != IGNORE_INDEX
        if scored.any():
            hidden = model.encode(input_ids, attention_mask=attention)  # (B, T, H)
            picked = model.head(hidden[scored]).float()  # (N, V)
            tags = None
            if class_top is not None:
                tags = framed_pos(heldout, batch.indices, batch.labels.shape[1])[batch.labels != IGNORE_INDEX]
            sums.add(picked, labels[scored], baseline_top, tags, class_top)
        if tick is not None:
            tick(batch.n_tokens)
    return sums


@dataclass
class _Group:
    """Sentences packed once into rows, reused for every pass and mask: the framed
    ``[CLS] ids [SEP]`` rows (B, T), and for each packed slot the flat index of its framed
    token (``src``, -1 on the padding at a row's end)."""

    indices: np.ndarray  # (B,) corpus sentences
    ids: np.ndarray  # (B, T) framed ids
    starts: np.ndarray | None  # (B, T) word-start flags (whole-word masks)
    tags: np.ndarray | None  # (B * T,) POS class of each framed token
    src: np.ndarray  # (R * W,) flat index into (B * T), -1 = padding
    position_ids: torch.Tensor  # (R, W)
    attention: torch.Tensor  # (R, 1, W, W) block-diagonal
    n_tokens: int


def _token_groups(lengths: np.ndarray, chosen: np.ndarray, budget: int) -> Iterator[np.ndarray]:
    """``chosen`` in order, cut greedily into groups of at most ``budget`` tokens ([CLS]/[SEP] counted)."""
    start, used = 0, 0
    for i, c in enumerate((lengths[chosen] + 2).tolist()):
        if used + c > budget and i > start:
            yield chosen[start:i]
            start, used = i, 0
        used += c
    if start < len(chosen):
        yield chosen[start:]


def _pack_group(corpus: EncodedCorpus, indices: np.ndarray, tokenizer: WordPieceTokenizer, max_length: int,
                with_starts: bool, with_tags: bool, device) -> _Group:
    ids, starts = frame_rows(corpus, indices, tokenizer, with_starts)
    B, T = ids.shape
    costs = [len(corpus[int(i)]) + 2 for i in indices]
    rows = pack_rows(costs, max_length)
    W = max(sum(costs[i] for i in row) for row in rows)
    src = np.full((len(rows), W), -1, dtype=np.int64)
    pos = np.zeros((len(rows), W), dtype=np.int64)
    seg = np.zeros((len(rows), W), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for k, b in enumerate(row, start=1):
            n = costs[b]
            src[r, at : at + n] = b * T + np.arange(n)
            pos[r, at : at + n] = np.arange(n)
            seg[r, at : at + n] = k
            at += n
    tags = framed_pos(corpus, indices, T).reshape(-1) if with_tags else None
    return _Group(indices, ids, starts, tags, src.reshape(-1), torch.from_numpy(pos).to(device),
                  block_diagonal_mask(torch.from_numpy(seg).to(device)), int(sum(costs)))


def _score_group(model, tokenizer, group: _Group, spec: MaskSpec, keys, baseline_top, device, sums: _Sums,
                 class_top=None) -> None:
    """One mask of one packed group: the encoder over the packed rows, the head at the masked slots."""
    masked, labels = mask_rows(group.ids, group.starts, tokenizer, spec, keys)
    real = group.src >= 0
    flat_labels = np.where(real, labels.reshape(-1)[group.src], IGNORE_INDEX)
    where = np.flatnonzero(flat_labels != IGNORE_INDEX)
    if len(where) == 0:
        return
    packed = np.where(real, masked.reshape(-1)[group.src], tokenizer.pad_id).reshape(group.position_ids.shape)
    hidden = model.encode(torch.from_numpy(packed).to(device), attention_mask=group.attention,
                          position_ids=group.position_ids)  # (R, W, H)
    at = torch.from_numpy(where).to(device)
    picked = model.head(hidden.flatten(0, 1).index_select(0, at)).float()  # (N, V)
    target = torch.from_numpy(flat_labels[where]).to(device)
    tags = group.tags[group.src[where]] if group.tags is not None else None
    sums.add(picked, target, baseline_top, tags, class_top)


def _score_packed(model, tokenizer, heldout, specs, cfg, sample, baseline_top, device, class_top=None,
                  tick=None) -> list[_Sums]:
    """Every mask of ``specs`` over the held-out sentences (or ``sample``), ``cfg.passes``
    times, packed. A group of sentences is framed and packed once and read for every pass
    and mask; the first mask of ``specs`` also gets per-class sums (with ``class_top``)."""
    max_length = model.config.max_position_embeddings
    budget = cfg.batch_size * max_length  # the padded layout's worst case: as much memory, no more
    chosen = np.arange(len(heldout)) if sample is None else np.asarray(sample)
    sums = [_Sums() for _ in specs]
    with_starts = any(s.whole_word for s in specs)
    for indices in _token_groups(heldout.lengths, chosen, budget):
        group = _pack_group(heldout, indices, tokenizer, max_length, with_starts, class_top is not None, device)
        for p in range(cfg.passes):
            keys = [(cfg.seed, p, int(i)) for i in indices]
            for k, spec in enumerate(specs):
                _score_group(model, tokenizer, group, spec, keys, baseline_top, device, sums[k],
                             class_top if k == 0 else None)
                if tick is not None:
                    tick(group.n_tokens)
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
    *,
    progress: Callable[[int, int], None] | None = None,
    layout: str = "packed",
) -> dict[str, float]:
    """Masked-token loss, perplexity, top-1/top-5 accuracy, and the unigram baseline at the
    fixed token mask; when the held-out encoding carries words and parts of speech, also
    top-1/top-5 accuracy at a fixed whole-word mask of the same rate, top-1 accuracy per
    part of speech against the most frequent training token of that class (given
    ``train_class_counts``), and the word-l2r pseudo-perplexity of ``cfg.pll_sentences``.

    ``progress(done, total)`` is called as tokens are read (every mask and pass counted, and
    the pseudo-perplexity's queries). ``layout``: "packed" (as training reads sentences) or
    "padded" (one sentence per row; the reference, slower)."""
    if len(heldout) == 0:
        raise ValueError("the held-out split is empty: raise heldout_fraction or add text to evaluate")
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout must be 'packed' or 'padded', not {layout!r}")
    pause_point("evaluate")
    model.eval()
    device = torch.device(device)
    spec = MaskSpec(rate=cfg.mask_rate, mask_token_prob=1.0, random_token_prob=0.0)
    baseline_top = _top_ids(train_counts, tokenizer.num_special)[0]
    with_pos = train_class_counts is not None and heldout.pos is not None
    class_top = _top_ids(train_class_counts, tokenizer.num_special, 1) if with_pos else None
    sample = eval_sample(len(heldout), cfg.max_sentences, cfg.seed)
    chosen = np.arange(len(heldout)) if sample is None else sample
    specs = [spec] + ([dataclasses.replace(spec, whole_word=True)] if heldout.starts is not None else [])
    pll_chosen = None
    if heldout.starts is not None and cfg.pll_sentences:
        pll_chosen = eval_sample(len(heldout), cfg.pll_sentences, cfg.seed + 1)
        pll_chosen = np.arange(len(heldout)) if pll_chosen is None else pll_chosen

    tick = None
    if progress is not None:
        total = int((heldout.lengths[chosen] + 2).sum()) * cfg.passes * len(specs)
        if pll_chosen is not None:
            total += pll_cost(heldout.lengths[pll_chosen])
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)

    if layout == "packed":
        scored = _score_packed(model, tokenizer, heldout, specs, cfg, sample, baseline_top, device, class_top, tick)
    else:
        scored = [_score_padded(model, tokenizer, heldout, sp, cfg, sample, baseline_top, device,
                                class_top if k == 0 else None, tick) for k, sp in enumerate(specs)]
    s = scored[0]
    n = s.n
    if n == 0:
        raise ValueError("the evaluation mask selected no tokens: the held-out sentences are too short")
    loss = s.loss / n
    metrics = {
        "eval/masked_tokens": n,
        "eval/sentences": len(chosen),
        "eval/loss": loss,
        "eval/perplexity": math.exp(min(loss, 50.0)),
        "eval/top1_accuracy": s.top1 / n,
        "eval/top5_accuracy": s.top5 / n,
        "eval/unigram_top1_accuracy": s.base1 / n,
        "eval/unigram_top5_accuracy": s.base5 / n,
    }
    if with_pos:
        counted, hits, base = s.per_class
        for c, (_, name) in enumerate(POS_NAMES):
            if counted[c]:
                metrics[f"eval/pos/{name}/masked_tokens"] = int(counted[c])
                metrics[f"eval/pos/{name}/top1_accuracy"] = hits[c] / counted[c]
                metrics[f"eval/pos/{name}/unigram_top1_accuracy"] = base[c] / counted[c]
    if len(scored) > 1 and (ww := scored[1]).n:
        metrics["eval/wwm_masked_tokens"] = ww.n
        metrics["eval/wwm_top1_accuracy"] = ww.top1 / ww.n
        metrics["eval/wwm_top5_accuracy"] = ww.top5 / ww.n
        metrics["eval/wwm_unigram_top1_accuracy"] = ww.base1 / ww.n
    if pll_chosen is not None:
        metrics.update(pseudo_log_likelihood(model, tokenizer, heldout, pll_chosen, device, tick=tick))
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
