"""Pseudo-log-likelihood of held-out sentences (Salazar et al. 2020), word-l2r variant.

Each token is scored with the rest of the sentence visible, except that the later pieces of
the same MeCab word are masked too (Kauf & Ivanova 2023): otherwise ``メ ##ロス`` would let
the model read half the word it is asked for, and split words would look easy. The
pseudo-perplexity is ``exp(-PLL / tokens)`` over the scored tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .data import EncodedCorpus
from .model import BertForMaskedLM
from .tokenizer import WordPieceTokenizer


def word_l2r_queries(ids: np.ndarray, starts: np.ndarray, cls_id: int, sep_id: int, mask_id: int) -> np.ndarray:
    """(n, n + 2) rows: row t is ``[CLS] ids [SEP]`` with token t and the rest of its word masked."""
    n = len(ids)
    rows = np.empty((n, n + 2), dtype=np.int64)
    rows[:, 0], rows[:, 1 : n + 1], rows[:, n + 1] = cls_id, ids, sep_id
    word = np.cumsum(np.asarray(starts, dtype=bool)) - 1  # word index of each token
    t = np.arange(n)
    hide = (t[None, :] >= t[:, None]) & (word[None, :] == word[:, None])  # (query, position)
    rows[:, 1 : n + 1][hide] = mask_id
    return rows


def pll_cost(lengths: np.ndarray) -> int:
    """Tokens the queries of sentences of these lengths read: n rows of n + 2 each."""
    n = np.asarray(lengths, dtype=np.int64)
    return int((n * (n + 2)).sum())


@torch.no_grad()
def pseudo_log_likelihood(
    model: BertForMaskedLM,
    tokenizer: WordPieceTokenizer,
    corpus: EncodedCorpus,
    sentences: np.ndarray,
    device: torch.device | str = "cpu",
    tick: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """PLL per token and pseudo-perplexity over ``sentences`` of ``corpus`` (word-l2r);
    ``tick(tokens)`` after each sentence (``pll_cost`` of all of them in total)."""
    model.eval()
    total, n_tokens = 0.0, 0
    for i in np.asarray(sentences):
        ids = np.asarray(corpus[int(i)], dtype=np.int64)
        if len(ids) == 0:
            continue
        rows = torch.from_numpy(
            word_l2r_queries(ids, corpus.word_starts(int(i)), tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id)
        ).to(device)
        n = len(ids)
        query = torch.arange(n, device=rows.device)
        hidden = model.encode(rows)  # (n, n + 2, H)
        logits = model.head(hidden[query, query + 1]).float()  # (n, V): each row's own masked token
        logp = logits.log_softmax(-1)[query, torch.from_numpy(ids).to(rows.device)]
        total += float(logp.sum())
        n_tokens += n
        if tick is not None:
            tick(n * (n + 2))
    if n_tokens == 0:
        raise ValueError("no tokens to score for the pseudo-log-likelihood: the sample of sentences is empty")
    mean = total / n_tokens
    return {
        "eval/pll_per_token": mean,
        "eval/pseudo_perplexity": math.exp(min(-mean, 50.0)),
        "eval/pll_sentences": len(sentences),
        "eval/pll_tokens": n_tokens,
    }


@torch.no_grad()
def pll_per_character(
    model: BertForMaskedLM, tokenizer: WordPieceTokenizer, texts: list[str], device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Pseudo-log-likelihood (word-l2r) of ``texts`` per character of their words: a score that
    does not depend on the tokenizer, so models with different vocabularies or word splitters
    compare on the same sentences. A text longer than the model reads is scored in chunks of
    whole words that fit, so every character counts for every model."""
    model.eval()
    limit = model.config.max_position_embeddings - 2
    total, chars, n_tokens = 0.0, 0, 0
    for text in texts:
        words = tokenizer.split_words(text)
        pieces = tokenizer.encode_words_batch([[w] for w in words])
        chunk: list[int] = []
        starts: list[int] = []
        for word, ids in zip(words, pieces):
            ids = ids[:limit]  # a single word longer than the model reads: its first pieces
            if len(chunk) + len(ids) > limit:
                total += _score_chunk(model, tokenizer, chunk, starts, device)
                n_tokens, chunk, starts = n_tokens + len(chunk), [], []
            chunk += ids
            starts += [1] + [0] * (len(ids) - 1)
            chars += len(word)
        if chunk:
            total += _score_chunk(model, tokenizer, chunk, starts, device)
            n_tokens += len(chunk)
    if chars == 0:
        raise ValueError("no characters to score for the per-character pseudo-log-likelihood")
    return {"eval/pll_per_char": total / chars, "eval/pll_char_tokens": n_tokens, "eval/pll_chars": chars}


def _score_chunk(model: BertForMaskedLM, tokenizer: WordPieceTokenizer, ids: list[int], starts: list[int],
                 device: torch.device | str) -> float:
    """Summed word-l2r log-probability of ``ids`` (one sequence)."""
    if not ids:
        return 0.0
    target = np.asarray(ids, dtype=np.int64)
    rows = torch.from_numpy(word_l2r_queries(target, np.asarray(starts, dtype=np.uint8), tokenizer.cls_id,
                                             tokenizer.sep_id, tokenizer.mask_id)).to(device)
    query = torch.arange(len(ids), device=rows.device)
    logits = model.head(model.encode(rows)[query, query + 1]).float()
    return float(logits.log_softmax(-1)[query, torch.from_numpy(target).to(rows.device)].sum())
