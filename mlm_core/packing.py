"""Token-budget batches packed into rows, so no compute goes to padding.

A training *micro-batch* is a run of sentences from the epoch's shuffled order whose
``len + 2`` ([CLS] and [SEP]) adds up to at most ``tokens_per_batch``. Its sentences are
packed first-fit-decreasing into rows of at most ``max_length`` tokens. Each row carries
``segment_ids`` (1, 2, ... per sentence, 0 on the few padding slots at a row's end) and
``position_ids`` that restart at 0 for each sentence; attention is block-diagonal (a token
sees only tokens of its own sentence), so a sentence's outputs are the same as if it had
been alone in its row.

Masking is applied per sentence with ``masking.mask_batch`` and the same keys as before,
so a sentence's mask does not depend on what it is packed with, and the micro-batch a
step reads is a pure function of ``(seed, micro_index)``: resuming is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .data import EncodedCorpus, frame_rows, mask_rows
from .masking import IGNORE_INDEX, MaskSpec
from .tokenizer import WordPieceTokenizer


class TokenBatchPlan:
    """Which sentences form micro-batch ``m``: a pure function of (seed, m).

    Epoch ``e`` shuffles all sentences with ``(seed, e)`` and cuts the order greedily into
    micro-batches of at most ``tokens_per_batch`` tokens (special tokens counted). Micro-batch
    indices run on across epochs, so a step never straddles a gap at an epoch's end.
    """

    def __init__(self, lengths: np.ndarray, tokens_per_batch: int, seed: int) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.n = len(self.lengths)
        if self.n == 0:
            raise ValueError("no training sequences to batch")
        longest = int(self.lengths.max()) + 2
        if tokens_per_batch < longest:
            raise ValueError(
                f"tokens_per_batch ({tokens_per_batch}) is smaller than the longest sequence ({longest} tokens); "
                f"raise --tokens-per-batch to at least the max length"
            )
        self.tokens_per_batch, self.seed = tokens_per_batch, seed
        self._starts: dict[int, np.ndarray] = {}  # epoch -> cumulative micro-batch count (cached)
        self._epoch, self._batches = -1, []

    def _cut(self, epoch: int) -> list[np.ndarray]:
        perm = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(self.n)
        cost = self.lengths[perm] + 2
        batches, start, used = [], 0, 0
        for i, c in enumerate(cost.tolist()):
            if used + c > self.tokens_per_batch:
                batches.append(perm[start:i])
                start, used = i, 0
            used += c
        batches.append(perm[start:])
        return batches

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._epoch:
            self._batches, self._epoch = self._cut(epoch), epoch
        return self._batches

    def batches_in_epoch(self, epoch: int) -> int:
        if epoch not in self._starts:
            self._starts[epoch] = len(self.epoch_batches(epoch))
        return self._starts[epoch]

    def locate(self, micro: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of micro-batch ``micro``."""
        epoch = 0
        while micro >= (k := self.batches_in_epoch(epoch)):
            micro -= k
            epoch += 1
        return epoch, micro

    def indices(self, micro: int) -> tuple[int, np.ndarray]:
        epoch, b = self.locate(micro)
        return epoch, self.epoch_batches(epoch)[b]

    def total_micro_batches(self, epochs: float) -> int:
        """Micro-batches in ``epochs`` passes (a fractional last epoch rounds up)."""
        full, frac = int(epochs), round(epochs - int(epochs), 6)
        total = sum(self.batches_in_epoch(e) for e in range(full))
        if frac > 0:
            total += math.ceil(frac * self.batches_in_epoch(full))
        return max(1, total)


def pack_rows(costs: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: item indices per row, each row's cost summing to <= capacity."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if costs[i] <= room:
                rows[r].append(i)
                free[r] -= costs[i]
                break
        else:
            rows.append([i])
            free.append(capacity - costs[i])
    return rows


@dataclass
class PackedBatch:
    input_ids: np.ndarray  # (R, T) int64, masked
    position_ids: np.ndarray  # (R, T) int64, restarting at 0 for each sentence
    segment_ids: np.ndarray  # (R, T) int64, 1.. per sentence in the row, 0 = padding
    masked_positions: np.ndarray  # (N,) int64 flat indices into (R*T) of the scored positions
    masked_labels: np.ndarray  # (N,) int64 original ids at those positions
    n_tokens: int  # real tokens, [CLS]/[SEP] included

    @property
    def n_slots(self) -> int:
        return int(self.input_ids.size)

    @property
    def padding_share(self) -> float:
        return 1.0 - self.n_tokens / self.n_slots if self.n_slots else 0.0


def collate_packed(
    corpus: EncodedCorpus,
    indices: np.ndarray,
    tokenizer: WordPieceTokenizer,
    spec: MaskSpec,
    row_keys: list[tuple[int, ...]],
    max_length: int,
) -> PackedBatch:
    """Mask each sentence on its own (exactly as ``data.collate`` would), then pack."""
    ids, starts = frame_rows(corpus, indices, tokenizer, spec.whole_word)
    masked, labels = mask_rows(ids, starts, tokenizer, spec, row_keys)
    costs = [len(corpus[int(i)]) + 2 for i in indices]
    rows = pack_rows(costs, max_length)
    width = max(sum(costs[i] for i in row) for row in rows)
    R = len(rows)
    out_ids = np.full((R, width), tokenizer.pad_id, dtype=np.int64)
    out_lab = np.full((R, width), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((R, width), dtype=np.int64)
    seg = np.zeros((R, width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, start=1):
            n = costs[i]
            out_ids[r, at : at + n] = masked[i, :n]
            out_lab[r, at : at + n] = labels[i, :n]
            pos[r, at : at + n] = np.arange(n)
            seg[r, at : at + n] = k
            at += n
    flat = out_lab.reshape(-1)
    where = np.flatnonzero(flat != IGNORE_INDEX)
    return PackedBatch(out_ids, pos, seg, where, flat[where], int(sum(costs)))


def block_diagonal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(R, T) segment ids -> (R, 1, T, T) bool, True where query and key share a sentence.

    Padding (segment 0) attends to padding, so no softmax row is ever empty (no NaN); its
    outputs are never read.
    """
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def step_model_flops(
    batch: PackedBatch, encoder_params: int, num_layers: int, hidden: int, vocab_size: int
) -> float:
    """Useful training FLOPs of one micro-batch (forward + backward = 3 x forward).

    Encoder layers: 6 * their parameters * real tokens. Attention: 12 * layers * hidden * sum(len^2) over
    sentences (QK^T and AV, each 2 FLOPs per multiply-add, x3 for backward), counted per
    sentence, not per row: work across sentence boundaries is not useful. MLM head: dense and
    vocabulary projection at the masked positions only.
    """
    seg = batch.segment_ids
    m = int(seg.max()) + 1
    flat = (seg + np.arange(seg.shape[0])[:, None] * m).ravel()
    lengths = np.bincount(flat, minlength=seg.shape[0] * m).reshape(seg.shape[0], m)[:, 1:]
    attn = 12.0 * num_layers * hidden * float((lengths.astype(np.float64) ** 2).sum())
    head = 6.0 * (hidden * hidden + hidden * vocab_size) * len(batch.masked_positions)
    return 6.0 * encoder_params * batch.n_tokens + attn + head
