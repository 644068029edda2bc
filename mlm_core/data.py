"""Training data: shards -> subword ids on disk -> padded batches.

The shards' MeCab words are encoded once per (shards, vocabulary, max length) into a flat
``ids.bin`` (uint16 or int32) plus ``offsets.npy``, read back through ``np.memmap``:
training memory stays flat however large the corpus, and any sentence is one slice away,
which makes the batch order a pure function of ``(seed, epoch)`` and resuming exact.

A sentence longer than ``max_length - 2`` subwords is cut into consecutive windows rather
than truncated, so no text is silently dropped.

Next to the ids, ``starts.bin`` holds one uint8 per token: 1 at the first subword of each
MeCab word (and at the start of every window), 0 on ``##`` continuations of the same word
(whole-word masking reads it); ``pos.bin`` holds the coarse UniDic part of speech of the
token's word as an index into ``POS_CLASSES`` (per-class evaluation reads it).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import atomic_dir, atomic_write_json, fingerprint, read_json
from .masking import MaskSpec, mask_batch
from .shards import iter_rows
from .tokenizer import WordPieceTokenizer

ENCODE_VERSION = 2  # 2: word-start flags and part of speech next to the ids

# UniDic's first POS level, fixed so that class ids mean the same in every encoded corpus.
POS_CLASSES = (
    "名詞", "代名詞", "形状詞", "連体詞", "副詞", "接続詞", "感動詞", "動詞", "形容詞", "助動詞",
    "助詞", "接頭辞", "接尾辞", "記号", "補助記号", "空白", "その他",
)
_POS_INDEX = {p: i for i, p in enumerate(POS_CLASSES)}
# IPAdic's tags (checkpoints whose tokenizer uses mecab_dic "ipadic") in UniDic's classes; no
# UniDic tag has these names, so UniDic corpora are read as before.
_POS_INDEX.update({tag: _POS_INDEX[cls] for tag, cls in {
    "接頭詞": "接頭辞", "名詞-代名詞": "代名詞", "名詞-形容動詞語幹": "形状詞", "名詞-接尾": "接尾辞",
    "記号-句点": "補助記号", "記号-読点": "補助記号", "記号-括弧開": "補助記号", "記号-括弧閉": "補助記号",
    "記号-空白": "空白",
}.items()})


def pos_class(pos: str) -> int:
    """Index in ``POS_CLASSES`` of a shard POS tag such as ``名詞-普通名詞`` (unknown: その他)."""
    found = _POS_INDEX.get(pos)
    return found if found is not None else _POS_INDEX.get(pos.split("-", 1)[0], len(POS_CLASSES) - 1)


def encode_key(shards_fingerprint: str, vocab_fingerprint: str, split: str, max_length: int) -> str:
    return fingerprint("encode", ENCODE_VERSION, shards_fingerprint, vocab_fingerprint, split, max_length)


def encode_shards(paths: list[Path], tokenizer: WordPieceTokenizer, out_dir: Path, max_length: int, key: str) -> Path:
    """Encode the ``words`` of the shards into ``out_dir`` (skipped when already there)."""
    if (out_dir / "meta.json").exists() and read_json(out_dir / "meta.json").get("key") == key:
        return out_dir
    window = max_length - 2  # room for [CLS] and [SEP]
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    n_tokens = 0
    offsets = array("q", [0])  # 8 bytes a sequence, not a Python int object each
    with atomic_dir(out_dir, keep_existing="meta.json") as tmp:
        with open(tmp / "ids.bin", "wb") as fh, open(tmp / "starts.bin", "wb") as fs, open(tmp / "pos.bin", "wb") as fp:
            for batch in iter_rows(paths, ["words", "pos"]):
                encoded = tokenizer.encode_words_with_word_ids(batch.column(0).to_pylist())
                for (ids, word_ids), tags in zip(encoded, batch.column(1).to_pylist()):
                    word_ids = np.asarray(word_ids, dtype=np.int64)
                    starts = np.ones(len(ids), dtype=np.uint8)
                    starts[1:] = word_ids[1:] != word_ids[:-1]
                    classes = np.asarray([pos_class(t) for t in tags], dtype=np.uint8)[word_ids]
                    for start in range(0, max(len(ids), 1), window):
                        piece = ids[start : start + window]
                        if not piece:
                            continue
                        flags = starts[start : start + window].copy()
                        flags[0] = 1  # a window opens a word even mid-word
                        fh.write(np.asarray(piece, dtype=dtype).tobytes())
                        fs.write(flags.tobytes())
                        fp.write(classes[start : start + window].tobytes())
                        n_tokens += len(piece)
                        offsets.append(n_tokens)
        np.save(tmp / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
        atomic_write_json(
            tmp / "meta.json",
            {"key": key, "dtype": np.dtype(dtype).name, "sequences": len(offsets) - 1, "tokens": n_tokens,
             "max_length": max_length, "vocab_size": len(tokenizer)},
        )
    return out_dir


class EncodedCorpus:
    """Random access to encoded sequences (without [CLS]/[SEP])."""

    def __init__(self, path: Path) -> None:
        meta = read_json(path / "meta.json")
        self.path, self.meta = Path(path), meta
        self.offsets = np.load(path / "offsets.npy", mmap_mode="r")
        self.ids = (
            np.memmap(path / "ids.bin", dtype=np.dtype(meta["dtype"]), mode="r")
            if meta["tokens"]
            else np.zeros(0, dtype=np.dtype(meta["dtype"]))
        )
        self.starts, self.pos = (
            np.memmap(path / name, dtype=np.uint8, mode="r") if meta["tokens"] and (path / name).exists() else None
            for name in ("starts.bin", "pos.bin")
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def word_starts(self, i: int) -> np.ndarray:
        """bool per token of sequence ``i``: True at a word's first subword."""
        if self.starts is None:
            raise ValueError(
                f"{self.path} was encoded without word boundaries (an older Melos); delete it and run again to re-encode"
            )
        return self.starts[self.offsets[i] : self.offsets[i + 1]].astype(bool)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    @property
    def num_tokens(self) -> int:
        return int(self.meta["tokens"])


@dataclass
class Batch:
    input_ids: np.ndarray  # (B, T) int64, masked
    attention_mask: np.ndarray  # (B, T) bool
    labels: np.ndarray  # (B, T) int64, -100 where not scored
    n_tokens: int  # real (non-padding) tokens
    indices: np.ndarray | None = None  # the corpus sentences of the rows


def frame_rows(
    corpus: EncodedCorpus, indices: np.ndarray, tokenizer: WordPieceTokenizer, with_starts: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """(B, T) ``[CLS] ids [SEP]`` rows padded to the longest, and (when asked) the word-start
    flags laid out the same way ([CLS], [SEP] and padding count as starts)."""
    rows = [corpus[int(i)] for i in indices]
    T = max(len(r) for r in rows) + 2
    ids = np.full((len(rows), T), tokenizer.pad_id, dtype=np.int64)
    starts = np.ones((len(rows), T), dtype=bool) if with_starts else None
    for b, (i, r) in enumerate(zip(indices, rows)):
        ids[b, 0] = tokenizer.cls_id
        ids[b, 1 : len(r) + 1] = r
        ids[b, len(r) + 1] = tokenizer.sep_id
        if starts is not None:
            starts[b, 1 : len(r) + 1] = corpus.word_starts(int(i))
    return ids, starts


def framed_pos(corpus: EncodedCorpus, indices: np.ndarray, width: int) -> np.ndarray:
    """(B, width) ``POS_CLASSES`` index of each framed token (-1 on [CLS], [SEP], padding)."""
    if corpus.pos is None:
        raise ValueError(f"{corpus.path} was encoded without parts of speech (an older Melos); delete it to re-encode")
    out = np.full((len(indices), width), -1, dtype=np.int64)
    for b, i in enumerate(indices):
        tags = corpus.pos[corpus.offsets[int(i)] : corpus.offsets[int(i) + 1]]
        out[b, 1 : len(tags) + 1] = tags
    return out


def mask_rows(
    ids: np.ndarray, starts: np.ndarray | None, tokenizer: WordPieceTokenizer, spec: MaskSpec,
    row_keys: list[tuple[int, ...]],
) -> tuple[np.ndarray, np.ndarray]:
    """``mask_batch`` over framed rows: specials and padding are never masked."""
    return mask_batch(
        ids, ids >= tokenizer.num_special, row_keys, spec,
        mask_id=tokenizer.mask_id, vocab_size=len(tokenizer), first_regular_id=tokenizer.num_special,
        word_starts=starts,
    )


def collate(
    corpus: EncodedCorpus,
    indices: np.ndarray,
    tokenizer: WordPieceTokenizer,
    spec: MaskSpec,
    row_keys: list[tuple[int, ...]],
) -> Batch:
    """[CLS] ids [SEP] per row, padded to the longest row, then masked."""
    ids, starts = frame_rows(corpus, indices, tokenizer, spec.whole_word)
    attention = ids != tokenizer.pad_id
    masked, labels = mask_rows(ids, starts, tokenizer, spec, row_keys)
    return Batch(masked, attention, labels, int(attention.sum()), np.asarray(indices))


class BatchPlan:
    """Which sentences form global step ``s``: a pure function of (seed, step).

    Epoch ``e`` visits every sentence once, in an order drawn from ``(seed, e)``. With
    ``group_size > 1``, the shuffled sentences are cut into groups of ``group_size`` batches,
    each group is sorted by length and cut into batches, and the batches are shuffled
    again: batches hold sentences of similar length, so far less compute goes to padding,
    while every batch still comes from a random part of the corpus. The last batch of an
    epoch may be smaller.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, group_size: int = 1) -> None:
        self.n = len(lengths)
        if self.n == 0:
            raise ValueError("no training sequences to batch")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.group_size = batch_size, seed, max(1, group_size)
        self.steps_per_epoch = math.ceil(self.n / batch_size)
        self._epoch = -1
        self._batches: list[np.ndarray] = []

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        # Rounded first: 1.1 * 100 is 110.00000000000001 in floating point, and must be 110 steps, not 111.
        return max(1, math.ceil(round(epochs * self.steps_per_epoch, 6)))

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch])
        perm = rng.permutation(self.n)
        span = self.batch_size * self.group_size
        batches: list[np.ndarray] = []
        for start in range(0, self.n, span):
            group = perm[start : start + span]
            if self.group_size > 1:
                group = group[np.argsort(self.lengths[group], kind="stable")]
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        if self.group_size > 1:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def indices(self, step: int) -> tuple[int, np.ndarray]:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._epoch_batches(epoch), epoch
        return epoch, self._batches[b]

    def iter_batches(
        self,
        corpus: EncodedCorpus,
        tokenizer: WordPieceTokenizer,
        spec: MaskSpec,
        start_step: int,
        total_steps: int,
        static_masking: bool,
    ) -> Iterator[tuple[int, int, Batch]]:
        for step in range(start_step, total_steps):
            epoch, idx = self.indices(step)
            keys = [(self.seed, int(i)) if static_masking else (self.seed, int(i), epoch) for i in idx]
            yield step, epoch, collate(corpus, idx, tokenizer, spec, keys)


def fixed_eval_batches(
    corpus: EncodedCorpus,
    tokenizer: WordPieceTokenizer,
    spec: MaskSpec,
    seed: int,
    batch_size: int,
    passes: int = 1,
    sentences: np.ndarray | None = None,
) -> Iterator[Batch]:
    """Held-out batches in corpus order, ``passes`` times, each pass with its own mask
    fixed by (seed, pass, sentence). ``sentences`` (sorted indices) restricts to a subset;
    each sentence keeps the mask it has in the full set."""
    chosen = np.arange(len(corpus)) if sentences is None else np.asarray(sentences)
    for p in range(passes):
        for start in range(0, len(chosen), batch_size):
            idx = chosen[start : start + batch_size]
            yield collate(corpus, idx, tokenizer, spec, [(seed, p, int(i)) for i in idx])


def eval_sample(n: int, max_sentences: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a fixed, seeded sample of ``max_sentences`` of ``n`` (None: all)."""
    if max_sentences is None or n <= max_sentences:
        return None
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x5A4D])
    return np.sort(rng.choice(n, size=max_sentences, replace=False))
