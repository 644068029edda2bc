"""Stage 3: a WordPiece vocabulary over MeCab words, saved as BERT's ``vocab.txt``.

As in Tohoku's Japanese BERT, the WordPiece model is trained on words MeCab already split
(no whitespace pre-tokenisation of raw text), continuations carry ``##``. Training uses Hugging
Face ``tokenizers``, fed the word counts that tokenization wrote per split (each distinct
word repeated its count times, in chunks), so this stage never re-reads the corpus and its
memory is bounded by the number of distinct words. Coverage is computed once per distinct
word, weighted by its count. The vocabulary is built from the training split only, so
held-out coverage is an honest out-of-sample figure.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from .config import VocabConfig
from .io import atomic_dir, atomic_write_json, fingerprint
from .shards import iter_rows, read_word_counts, shard_paths
from .tokenizer import CONTINUATION, DEFAULT_SPLITTER, SPECIAL_TOKENS, UNK, WordPieceTokenizer

VOCAB_FILE = "vocab.txt"


def vocab_key(upstream_fingerprint: str, cfg: VocabConfig) -> str:
    return fingerprint("vocab", upstream_fingerprint, cfg.fingerprint_fields(), version("tokenizers"))


def count_words(paths: list[Path]) -> Counter[str]:
    """Word counts of the shards, streamed batch by batch (memory: the distinct words)."""
    counts: Counter[str] = Counter()
    for batch in iter_rows(paths, ["words"]):
        words = pc.list_flatten(batch.column(0))
        table = pa.table({"w": words}).group_by("w").aggregate([("w", "count")])
        counts.update(dict(zip(table.column("w").to_pylist(), table.column("w_count").to_pylist())))
    return counts


# What ``pre_tokenizers.WhitespaceSplit`` splits on: Rust's ``char::is_whitespace`` (the
# Unicode White_Space property; Python's str.split() also splits on U+001C..U+001F).
_WHITESPACE = re.compile("[\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_REPEAT_CHUNK = 4096


def _initial_tokens(counts: Mapping[str, int], limit_alphabet: int | None) -> list[str]:
    """The trainer's initial vocabulary in a fixed order: the alphabet, then ``##`` + every
    alphabet character that occurs inside a word, each sorted by code point.

    ``tokenizers``' trainer creates the ``##`` tokens in hash-map order, and their ids break
    ties between equally frequent merges, so the same corpus gave a different vocabulary
    on each run (huggingface/tokenizers#1794). Passing these tokens in ourselves fixes
    every id before the merges start. With ``limit_alphabet``, the most frequent characters
    are kept, ties going to the lower code point.
    """
    words: Counter[str] = Counter()  # as the trainer sees them, after WhitespaceSplit
    for word, n in counts.items():
        for piece in _WHITESPACE.split(word):
            if piece:
                words[piece] += n
    chars: Counter[str] = Counter()
    for word, n in words.items():
        for c in word:
            chars[c] += n
    alphabet = set(chars)
    if limit_alphabet is not None and len(alphabet) > limit_alphabet:
        alphabet = {c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:limit_alphabet]}
    inside = {c for word in words for c in word[1:] if c in alphabet}
    return sorted(alphabet) + [CONTINUATION + c for c in sorted(inside)]


def _repeated_words(counts: Mapping[str, int]) -> Iterator[str]:
    """Lines that give the trainer exactly these word counts: each word repeated, in chunks,
    so the trainer never re-reads the corpus (its counts depend only on the multiset)."""
    for word, n in sorted(counts.items()):
        token = word + " "
        while n > 0:
            take = min(n, _REPEAT_CHUNK)
            yield token * take
            n -= take


def train_wordpiece_from_counts(counts: Mapping[str, int], cfg: VocabConfig) -> list[str]:
    """Train WordPiece on word counts; returns tokens in id order. Deterministic."""
    tok = Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=cfg.max_input_chars_per_word))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    initial = _initial_tokens(counts, cfg.limit_alphabet)
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        # The fixed initial tokens enter the vocabulary right after the special ones;
        # limit_alphabet=0 stops the trainer adding characters of its own.
        special_tokens=list(SPECIAL_TOKENS) + initial,
        limit_alphabet=0,
        continuing_subword_prefix=CONTINUATION,
        show_progress=False,
    )
    tok.train_from_iterator(_repeated_words(counts), trainer)
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id]
    assert tokens[: len(SPECIAL_TOKENS) + len(initial)] == SPECIAL_TOKENS + initial, tokens[:8]
    return tokens


def train_wordpiece(paths: list[Path], cfg: VocabConfig) -> list[str]:
    """Train WordPiece on the ``words`` column of the shards; returns tokens in id order."""
    return train_wordpiece_from_counts(count_words(paths), cfg)


def coverage_from_counts(counts: Mapping[str, int], tokenizer: WordPieceTokenizer) -> dict:
    """Word-level [UNK] rate and subwords per word, each distinct word encoded once.

    Words are encoded one by one (pre-tokenised input), so a word's pieces do not depend
    on its neighbours and weighting by the counts gives the corpus figures exactly.
    """
    vocab = list(counts)
    words = sum(counts.values())
    unknown = subwords = 0
    for i in range(0, len(vocab), 8192):
        chunk = vocab[i : i + 8192]
        for word, ids in zip(chunk, tokenizer.encode_words_batch([[w] for w in chunk])):
            n = counts[word]
            subwords += n * len(ids)
            unknown += n * (tokenizer.unk_id in ids)
    return {
        "words": words,
        "unknown_words": unknown,
        "unk_word_rate": unknown / words if words else 0.0,
        "subwords_per_word": subwords / words if words else 0.0,
    }


def _split_counts(tokenize_dir: Path, manifest: dict, split: str) -> Counter[str] | dict[str, int]:
    counts = read_word_counts(tokenize_dir, manifest, split)
    return counts if counts is not None else count_words(shard_paths(tokenize_dir, split, manifest))


def build_vocab(tokenize_dir: Path, tokenize_manifest: dict, out_dir: Path, cfg: VocabConfig) -> dict:
    """Run stage 3 into ``out_dir`` (``vocab.txt`` + ``manifest.json``); returns the manifest."""
    train_counts = _split_counts(tokenize_dir, tokenize_manifest, "train")
    tokens = train_wordpiece_from_counts(train_counts, cfg)
    splitter = tokenize_manifest.get("config", {}).get("word_splitter", DEFAULT_SPLITTER)
    tokenizer = WordPieceTokenizer(tokens, max_input_chars_per_word=cfg.max_input_chars_per_word, splitter=splitter)
    with atomic_dir(out_dir, keep_existing="manifest.json") as tmp:
        tokenizer.save(tmp / VOCAB_FILE)
        manifest = {
            "stage": "vocab",
            "tokenizer": tokenizer.spec(),
            "config": cfg.fingerprint_fields(),
            "upstream_fingerprint": tokenize_manifest["fingerprint"],
            "fingerprint": vocab_key(tokenize_manifest["fingerprint"], cfg),
            "counts": {
                "vocab_size": len(tokens),
                "continuation_tokens": sum(t.startswith(CONTINUATION) for t in tokens),
                "special_tokens": len(SPECIAL_TOKENS),
            },
            "coverage": {
                "train": coverage_from_counts(train_counts, tokenizer),
                "heldout": coverage_from_counts(_split_counts(tokenize_dir, tokenize_manifest, "heldout"), tokenizer),
            },
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def adopt_vocab_key(upstream_fingerprint: str, tokenizer_fingerprint: str) -> str:
    """The vocab stage of a run continued from a checkpoint: its vocabulary, not one built here."""
    return fingerprint("vocab-adopted", upstream_fingerprint, tokenizer_fingerprint)


def tokenizer_fingerprint(tokenizer: WordPieceTokenizer) -> str:
    """The identity of a tokenizer: its tokens in id order and its spec (splitter, subwords)."""
    return fingerprint("tokenizer", tokenizer.vocab, tokenizer.spec())


def adopt_vocab(tokenize_dir: Path, tokenize_manifest: dict, out_dir: Path, tokenizer: WordPieceTokenizer,
                source: str) -> dict:
    """Stage 3 for ``--init-from``: the checkpoint's vocabulary (ids are the checkpoint's), with
    its coverage of this corpus, into ``out_dir``; returns the manifest."""
    splitter = tokenize_manifest.get("config", {}).get("word_splitter", DEFAULT_SPLITTER)
    if splitter != tokenizer.splitter:
        raise ValueError(f"the corpus was split with {splitter} but the checkpoint's tokenizer uses {tokenizer.splitter}")
    key = adopt_vocab_key(tokenize_manifest["fingerprint"], tokenizer_fingerprint(tokenizer))
    with atomic_dir(out_dir, keep_existing="manifest.json") as tmp:
        tokenizer.save(tmp / VOCAB_FILE)
        manifest = {
            "stage": "vocab",
            "adopted_from": source,
            "tokenizer": tokenizer.spec(),
            "config": {"max_input_chars_per_word": tokenizer.max_input_chars_per_word},
            "upstream_fingerprint": tokenize_manifest["fingerprint"],
            "fingerprint": key,
            "counts": {
                "vocab_size": len(tokenizer),
                "continuation_tokens": sum(t.startswith(CONTINUATION) for t in tokenizer.vocab),
                "special_tokens": tokenizer.num_special,
            },
            "coverage": {
                split: coverage_from_counts(_split_counts(tokenize_dir, tokenize_manifest, split), tokenizer)
                for split in ("train", "heldout")
            },
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest
