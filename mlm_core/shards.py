"""Stage 2: cleaned documents -> sentences -> MeCab words, in Parquet shards.

Shard schema (one row per sentence), documented in the README and stored as Parquet
schema metadata:

=================  ===============  ==================================================
column             type             meaning
=================  ===============  ==================================================
doc_id             string           the document's id from the download manifest
sentence_index     int32            position of the sentence in its document (0-based,
                                    counted over both splits)
text               string           the sentence, NFKC-normalised
words              list<string>     MeCab (unidic-lite) surface forms, in order
pos                list<string>     their parts of speech, ``pos1`` or ``pos1-pos2``
=================  ===============  ==================================================

Sentences go to ``train-NNNNN.parquet`` or ``heldout-NNNNN.parquet`` by a salted hash
of their text, so the split is deterministic, independent of document order, and a
sentence repeated anywhere in the corpus always lands on the same side (no leakage of
duplicates into evaluation). Everything streams: one document is read line by line and
rows are flushed every ``row_group_size`` sentences.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .config import TokenizeConfig
from .io import atomic_dir, atomic_write_json, fingerprint
from .sentences import split_sentences
from .tokenizer import MecabWords

SCHEMA_VERSION = 1
SPLITS = ("train", "heldout")
SHARD_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("sentence_index", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("words", pa.list_(pa.string()), nullable=False),
        pa.field("pos", pa.list_(pa.string()), nullable=False),
    ],
    metadata={b"melos.schema_version": str(SCHEMA_VERSION).encode()},
)


def analyzer_versions() -> dict[str, str]:
    """Versions that change the words MeCab produces; part of the stage's fingerprint."""
    return {pkg: version(pkg) for pkg in ("fugashi", "unidic-lite")}


def tokenize_key(upstream_fingerprint: str, cfg: TokenizeConfig) -> str:
    """Same documents + settings + analyzer -> same key -> the stage can be skipped."""
    return fingerprint("tokenize", SCHEMA_VERSION, upstream_fingerprint, cfg.fingerprint_fields(), analyzer_versions())


def is_heldout(text: str, fraction: float, salt: str) -> bool:
    """Deterministic membership of the held-out split, by a salted hash of the text."""
    if fraction <= 0.0:
        return False
    key = salt.encode("utf-8")
    if len(key) > 64:  # blake2b keys hold 64 bytes; hash longer salts rather than cut them
        key = hashlib.blake2b(key, digest_size=64).digest()
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class ShardWriter:
    """Appends rows to ``{prefix}-NNNNN.parquet`` files of at most ``max_rows`` rows."""

    def __init__(self, out_dir: Path, prefix: str, max_rows: int, row_group_size: int) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.max_rows, self.row_group_size = max_rows, row_group_size
        self.files: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._buffer: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}

    def add(self, doc_id: str, sentence_index: int, text: str, words: list[str], pos: list[str]) -> None:
        for name, value in zip(SHARD_SCHEMA.names, (doc_id, sentence_index, text, words, pos)):
            self._buffer[name].append(value)
        if len(self._buffer["text"]) >= self.row_group_size or (
            self._rows_in_file + len(self._buffer["text"]) >= self.max_rows
        ):
            self._flush()

    def _flush(self) -> None:
        pending = len(self._buffer["text"])
        while pending:
            if self._writer is None:
                path = self.out_dir / f"{self.prefix}-{len(self.files):05d}.parquet"
                self._writer = pq.ParquetWriter(path, SHARD_SCHEMA, compression="zstd")
                self.files.append({"file": path.name, "rows": 0})
                self._rows_in_file = 0
            take = min(pending, self.max_rows - self._rows_in_file)
            table = pa.table({k: v[:take] for k, v in self._buffer.items()}, schema=SHARD_SCHEMA)
            self._writer.write_table(table, row_group_size=self.row_group_size)
            self._buffer = {k: v[take:] for k, v in self._buffer.items()}
            self._rows_in_file += take
            self.files[-1]["rows"] += take
            pending -= take
            if self._rows_in_file >= self.max_rows:
                self._writer.close()
                self._writer = None

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def iter_document_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                yield line


def tokenize_corpus(
    docs_dir: Path,
    doc_ids: Iterable[str],
    out_dir: Path,
    cfg: TokenizeConfig,
    upstream_fingerprint: str,
) -> dict:
    """Run stage 2 into ``out_dir``; returns the manifest (also written as manifest.json)."""
    mecab = MecabWords()
    counts = {split: {"sentences": 0, "words": 0, "characters": 0} for split in SPLITS}
    n_docs = 0
    sample: dict | None = None
    with atomic_dir(out_dir) as tmp:
        writers = {s: ShardWriter(tmp, s, cfg.max_rows_per_shard, cfg.row_group_size) for s in SPLITS}
        for doc_id in doc_ids:
            n_docs += 1
            index = 0
            for line in iter_document_lines(docs_dir / f"{doc_id}.txt"):
                for sentence in split_sentences(line):
                    words, pos = mecab(sentence)
                    if not words:
                        continue
                    split = "heldout" if is_heldout(sentence, cfg.heldout_fraction, cfg.split_salt) else "train"
                    writers[split].add(doc_id, index, sentence, words, pos)
                    c = counts[split]
                    c["sentences"] += 1
                    c["words"] += len(words)
                    c["characters"] += len(sentence)
                    if sample is None:
                        sample = {"doc_id": doc_id, "text": sentence, "words": words, "pos": pos}
                    index += 1
        for w in writers.values():
            w.close()
        if counts["train"]["sentences"] == 0:
            raise ValueError(
                f"no training sentences: the {n_docs} document(s) in {docs_dir} gave "
                f"{counts['heldout']['sentences']} held-out and 0 training sentences; "
                "add text or lower heldout_fraction"
            )
        totals = {k: sum(counts[s][k] for s in SPLITS) for k in ("sentences", "words", "characters")}
        manifest = {
            "stage": "tokenize",
            "schema_version": SCHEMA_VERSION,
            "schema": {f.name: str(f.type) for f in SHARD_SCHEMA},
            "config": cfg.fingerprint_fields(),
            "upstream_fingerprint": upstream_fingerprint,
            "fingerprint": tokenize_key(upstream_fingerprint, cfg),
            "counts": {"documents": n_docs, **totals, "splits": counts},
            "shards": {s: writers[s].files for s in SPLITS},
            "sample": sample,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def shard_paths(tokenize_dir: Path, split: str, manifest: dict) -> list[Path]:
    return [tokenize_dir / f["file"] for f in manifest["shards"][split]]


def iter_rows(paths: Iterable[Path], columns: list[str], batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Stream record batches of the given columns over shard files, in order."""
    for path in paths:
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)
