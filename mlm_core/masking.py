"""Masked-LM masking: a pure, seeded function applied at batch time.

Every row's mask is drawn from its own random stream, keyed by integers the caller
chooses: ``(seed, sentence_id, epoch)`` gives dynamic masking (a fresh mask each time a
sentence is seen), ``(seed, sentence_id)`` gives static masking (one fixed mask per
sentence, as in the original notebook). Because the mask does not depend on which other
sentences share the batch, resuming from a checkpoint reproduces the same masks, and the
evaluation mask is the same for every run.

Selection draws exactly ``rate * n`` of a row's ``n`` maskable tokens, rounding up or down
at random so the expected count is exact (a Bernoulli draw per token would often mask
nothing in a short sentence). Of the selected tokens, ``mask_token_prob`` become [MASK],
``random_token_prob`` a random regular token, and the rest stay as they are. Labels are
the original id at selected positions and -100 everywhere else, so the loss counts masked
tokens only — never padding, never special tokens.

Whole-word masking (``whole_word=True`` with a ``word_starts`` array) selects MeCab words
instead of tokens: words are taken in a random order, each with all its subwords, while the
running token count stays nearest the same ``rate * n`` target, so the rate is still counted in
tokens. A word of one token is selected exactly when token masking would select that token,
so on text without multi-piece words both modes give the same mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskSpec:
    rate: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    whole_word: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"mask rate must be in (0, 1), got {self.rate}")
        if min(self.mask_token_prob, self.random_token_prob) < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(
                f"mask_token_prob ({self.mask_token_prob}) and random_token_prob ({self.random_token_prob}) "
                "must be >= 0 and sum to at most 1"
            )


def mask_batch(
    input_ids: np.ndarray,
    maskable: np.ndarray,
    row_keys: Sequence[Sequence[int]],
    spec: MaskSpec,
    *,
    mask_id: int,
    vocab_size: int,
    first_regular_id: int,
    word_starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask a (B, T) batch; returns (masked input ids, labels), both int64 (B, T).

    ``maskable`` is False for padding and special tokens. ``row_keys[b]`` seeds row b.
    Random replacements are drawn from the regular tokens ``[first_regular_id, vocab_size)``.
    ``word_starts`` (B, T) bool, True at the first subword of each word, is read when
    ``spec.whole_word`` is set (required then).
    """
    B, T = input_ids.shape
    maskable = np.asarray(maskable, dtype=bool)  # an int 0/1 array would index, not select
    if maskable.shape != input_ids.shape:
        raise ValueError(f"maskable has shape {maskable.shape}, input_ids {input_ids.shape}")
    if len(row_keys) != B:
        raise ValueError(f"need one key per row: {len(row_keys)} keys for {B} rows")
    # Per-row streams: first the rounding draw, then three uniforms per position
    # (selection score, [MASK]/random/keep decision, random replacement id), laid out
    # position-major so position t always gets the same numbers however far the row is
    # padded: a sentence's mask must not depend on the batch it lands in.
    rounding = np.empty(B)
    per_position = np.empty((B, T, 3))
    for b, key in enumerate(row_keys):
        rng = np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])
        rounding[b] = rng.random()
        per_position[b] = rng.random((T, 3))
    scores, decide, replace = per_position[..., 0], per_position[..., 1], per_position[..., 2]

    n_maskable = maskable.sum(axis=1)  # (B,)
    # floor(x + u) with u ~ U(0, 1) rounds x up with probability frac(x): unbiased count
    k = np.floor(spec.rate * n_maskable + rounding).astype(np.int64)  # (B,)
    if spec.whole_word:
        if word_starts is None or np.shape(word_starts) != input_ids.shape:
            raise ValueError("whole-word masking needs a word_starts array shaped like input_ids")
        selected = _select_words(scores, maskable, np.asarray(word_starts, dtype=bool), k)
    else:
        scores = np.where(maskable, scores, np.inf)  # non-maskable positions sort last
        selected = (_ranks(scores) < k[:, None]) & maskable  # (B, T)

    labels = np.where(selected, input_ids, IGNORE_INDEX).astype(np.int64)
    masked = input_ids.astype(np.int64, copy=True)
    to_mask = selected & (decide < spec.mask_token_prob)
    to_random = selected & (decide >= spec.mask_token_prob) & (decide < spec.mask_token_prob + spec.random_token_prob)
    random_ids = first_regular_id + np.floor(replace * (vocab_size - first_regular_id)).astype(np.int64)
    masked[to_mask] = mask_id
    masked[to_random] = random_ids[to_random]
    return masked, labels


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Each position's rank (0 = lowest score) within its row; ties keep position order."""
    B, T = scores.shape
    order = np.argsort(scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(T)[None, :].repeat(B, axis=0), axis=1)
    return ranks


def _select_words(scores: np.ndarray, maskable: np.ndarray, word_starts: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Whole words in the order of their first subword's score; a word is taken while the
    tokens before it plus half its own length stay under ``k + 1/2`` (nearest count to k)."""
    B, T = scores.shape
    positions = np.arange(T)[None, :].repeat(B, axis=0)
    starts = word_starts | ~maskable  # specials and padding are words of their own...
    starts[:, 0] = True
    starts[:, 1:] |= ~maskable[:, :-1]  # ...and never the start of a word that follows them
    start_pos = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)  # each token's word start
    word_score = np.take_along_axis(scores, start_pos, axis=1)
    word_score = np.where(maskable, word_score, np.inf)
    # a word's subwords tie on score, and the stable sort keeps them together in order
    ranks = _ranks(word_score)
    word_id = np.cumsum(starts, axis=1) - 1 + (np.arange(B) * T)[:, None]
    word_len = np.bincount(word_id.ravel(), minlength=B * T)[word_id]
    rank_before_word = ranks - (positions - start_pos)
    return maskable & (rank_before_word + word_len / 2.0 < k[:, None] + 0.5)
