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
duplicates into evaluation). Documents are tokenized in parts (whole documents, about
``part_chars`` characters each) that any engine may run in parallel; the parts are merged
in document order, so the shards never depend on how many workers ran them. Beside the
shards, ``word_counts.parquet`` holds the (split, word, count) triples the vocab stage
needs.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import TokenizeConfig
from .io import atomic_dir, atomic_path, atomic_write_json, exclusive, fingerprint, read_json
from .pause import pause_point
from .sentences import split_sentences
from .tokenizer import DEFAULT_SPLITTER, splitter_packages, word_splitter
from .workers import exit_with

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


def analyzer_versions(splitter: str = DEFAULT_SPLITTER) -> dict[str, str]:
    """Versions that change the words MeCab produces; part of the stage's fingerprint."""
    if splitter == DEFAULT_SPLITTER:
        return {pkg: version(pkg) for pkg in ("fugashi", "unidic-lite")}
    return splitter_packages(splitter)


def tokenize_key(upstream_fingerprint: str, cfg: TokenizeConfig) -> str:
    """Same documents + settings + analyzer -> same key -> the stage can be skipped."""
    return fingerprint(
        "tokenize", SCHEMA_VERSION, OUTPUT_VERSION, upstream_fingerprint, cfg.fingerprint_fields(),
        analyzer_versions(cfg.word_splitter),
    )


def is_heldout(text: str, fraction: float, salt: str) -> bool:
    """Deterministic membership of the held-out split, by a salted hash of the text."""
    return heldout_test(fraction, salt)(text)


def heldout_test(fraction: float, salt: str) -> Callable[[str], bool]:
    """``is_heldout`` for one fraction and salt, with the hash key prepared once."""
    if fraction <= 0.0:
        return lambda text: False
    key = salt.encode("utf-8")
    if len(key) > 64:  # blake2b keys hold 64 bytes; hash longer salts rather than cut them
        key = hashlib.blake2b(key, digest_size=64).digest()
    # The rule is "digest as a big-endian integer / 2**64 < fraction". That float division
    # never decreases as the integer grows, so the rule holds exactly below one integer,
    # found once here; big-endian digests of equal length compare as their integers do.
    low, high = 0, 2**64
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if middle / 2**64 < fraction else (low, middle)
    if low == 2**64:
        return lambda text: True
    limit = low.to_bytes(8, "big")
    keyed = hashlib.blake2b(digest_size=8, key=key)  # the key's block hashed once, then copied

    def test(text: str) -> bool:
        h = keyed.copy()
        h.update(text.encode("utf-8"))
        return h.digest() < limit

    return test


WORD_COUNTS_FILE = "word_counts.parquet"
WORD_COUNTS_SCHEMA = pa.schema(
    [pa.field("split", pa.string(), nullable=False), pa.field("word", pa.string(), nullable=False),
     pa.field("count", pa.int64(), nullable=False)]
)

# Bumped when the stage's output files change (v2: per-split word counts beside the shards).
OUTPUT_VERSION = 2


class ShardWriter:
    """Appends rows to ``{prefix}-NNNNN.parquet`` files of at most ``max_rows`` rows, in row
    groups of ``row_group_size`` rows."""

    def __init__(self, out_dir: Path, prefix: str, max_rows: int, row_group_size: int) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.max_rows, self.row_group_size = max_rows, row_group_size
        self.files: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add_table(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
            self._pending_rows += table.num_rows
        while self._pending_rows and self._pending_rows >= min(self.row_group_size, self.max_rows - self._rows_in_file):
            self._write(min(self.row_group_size, self.max_rows - self._rows_in_file))

    def _write(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        chunk, rest = pending.slice(0, rows), pending.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._writer is None:
            path = self.out_dir / f"{self.prefix}-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(path, SHARD_SCHEMA, compression="zstd")
            self.files.append({"file": path.name, "rows": 0})
            self._rows_in_file = 0
        self._writer.write_table(chunk, row_group_size=self.row_group_size)
        self._rows_in_file += rows
        self.files[-1]["rows"] += rows
        if self._rows_in_file >= self.max_rows:
            self._writer.close()
            self._writer, self._rows_in_file = None, 0

    def close(self) -> None:
        while self._pending_rows:
            self._write(min(self._pending_rows, self.row_group_size, self.max_rows - self._rows_in_file))
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def iter_document_lines(path: Path) -> list[str]:
    """The document's non-blank lines, stripped (universal newlines, as ``open`` reads)."""
    with open(path, encoding="utf-8") as fh:
        return [line for line in map(str.strip, fh.read().split("\n")) if line]


def plan_parts(docs_dir: Path, doc_ids: list[str], part_chars: int) -> list[list[str]]:
    """Consecutive documents grouped into parts of about ``part_chars`` characters (UTF-8
    bytes / 3, read from the file sizes): a function of the corpus, never of the workers."""
    parts: list[list[str]] = []
    current: list[str] = []
    size = 0
    for doc_id in doc_ids:
        current.append(doc_id)
        size += (docs_dir / f"{doc_id}.txt").stat().st_size // 3
        if size >= part_chars:
            parts.append(current)
            current, size = [], 0
    if current:
        parts.append(current)
    return parts


def _part_name(index: int, doc_ids: list[str]) -> str:
    return f"part-{index:05d}-{fingerprint(doc_ids, length=8)}"


def tokenize_part(docs_dir: str, doc_ids: list[str], parts_dir: str, name: str, cfg: TokenizeConfig) -> dict:
    """The unit of parallel work: documents -> ``{name}.train.arrow`` and
    ``{name}.heldout.arrow`` (the rows of each split, SHARD_SCHEMA), ``{name}.counts.arrow``
    (word counts per split) and ``{name}.json`` (counts, a sample). Pure: same inputs, same
    files.

    The rows are kept as uncompressed Arrow IPC files, cheap to write and to read back once
    by the merge. The JSON is written last, atomically; its presence marks the part done,
    so a re-run after a crash redoes only the parts without one.
    """
    done = Path(parts_dir) / f"{name}.json"
    if done.is_file() and all((Path(parts_dir) / f"{name}.{kind}.arrow").is_file() for kind in _PART_FILES):
        return read_json(done)["summary"]
    doc_col, index_col, texts, words, pos = _words_of(docs_dir, doc_ids, cfg.word_splitter)
    table = pa.Table.from_arrays([doc_col, index_col, _string_array(texts), words, pos], schema=SHARD_SCHEMA)
    held = pa.array(list(map(heldout_test(cfg.heldout_fraction, cfg.split_salt), texts)), pa.bool_())
    tables = {"train": table.filter(pc.invert(held)), "heldout": table.filter(held)}
    sample = None
    if texts:
        sample = {"doc_id": doc_col[0].as_py(), "text": texts[0], "words": words[0].as_py(), "pos": pos[0].as_py()}
    for split in SPLITS:
        _write_ipc(Path(parts_dir) / f"{name}.{split}.arrow", tables[split])
    _write_ipc(Path(parts_dir) / f"{name}.counts.arrow", _count_table(tables))
    counts = {split: _counts_of(tables[split]) for split in SPLITS}
    summary = {"name": name, "documents": len(doc_ids), "counts": counts, "sample": sample}
    atomic_write_json(done, {"summary": summary})
    return summary


_PART_FILES = (*SPLITS, "counts")


def read_part(parts_dir: Path, name: str) -> dict[str, pa.Table]:
    """A finished part's tables: its rows of each split, and its word counts ("counts")."""
    tables = {}
    for kind in _PART_FILES:
        with pa.ipc.open_file(str(parts_dir / f"{name}.{kind}.arrow")) as reader:
            tables[kind] = reader.read_all()
    return tables


def _write_ipc(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp, pa.ipc.new_file(str(tmp), table.schema) as writer:
        writer.write_table(table)


def _words_of(
    docs_dir: str, doc_ids: list[str], splitter: str = DEFAULT_SPLITTER
) -> tuple[pa.Array, pa.Array, list[str], pa.Array, pa.Array]:
    """(doc ids, sentence indexes, sentences, words, pos) of the documents' sentences that
    have words; all but the sentences are Arrow arrays.

    MeCab writes "surface<TAB>context id" pairs; the outputs of the whole part are split on
    tabs and the ids mapped to parts of speech by Arrow at once, with no Python object per
    word. ``MecabWords.split`` reads them one by one only in the rare part where that would
    differ from it (a whitespace or empty token, an odd field count) or where the
    dictionary's context ids do not fix the parts of speech. ``splitter`` names the word
    splitter (one per process, built on first use, reused by every part).
    """
    words_of = word_splitter(splitter)
    parse = words_of.parser()
    pos_by_id = words_of.pos_by_id()
    docs: list[tuple[list[str], list[str]]] = []
    for doc_id in doc_ids:
        sentences = [s for line in iter_document_lines(Path(docs_dir) / f"{doc_id}.txt") for s in split_sentences(line)]
        parsed = list(map(parse, sentences))
        if not all(parsed):
            kept = [i for i, out in enumerate(parsed) if out]
            sentences, parsed = [sentences[i] for i in kept], [parsed[i] for i in kept]
        docs.append((sentences, parsed))
    texts = [s for sentences, _ in docs for s in sentences]
    outs = [out for _, parsed in docs for out in parsed]
    fast = _read_outputs(outs, pos_by_id) if pos_by_id is not None and outs else None
    if fast is not None or not outs:
        words, pos = fast or (pa.array([], pa.list_(pa.string())), pa.array([], pa.list_(pa.string())))
        return (*_document_columns(doc_ids, [len(sentences) for sentences, _ in docs]), texts, words, pos)
    texts, words_rows, pos_rows, sizes = [], [], [], []
    read = words_of.split
    for sentences, parsed in docs:
        sizes.append(len(texts))
        for sentence, out in zip(sentences, parsed):
            words, pos = read(out, sentence)
            if words:
                texts.append(sentence)
                words_rows.append(words)
                pos_rows.append(pos)
        sizes[-1] = len(texts) - sizes[-1]
    words, pos = pa.array(words_rows, pa.list_(pa.string())), pa.array(pos_rows, pa.list_(pa.string()))
    return (*_document_columns(doc_ids, sizes), texts, words, pos)


def _document_columns(doc_ids: list[str], sizes: list[int]) -> tuple[pa.Array, pa.Array]:
    """The doc_id and sentence_index columns of documents with ``sizes`` sentences each."""
    which = np.repeat(np.arange(len(doc_ids)), sizes)
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return (pa.array(doc_ids, pa.string()).take(pa.array(which)),
            pa.array(np.arange(len(which)) - starts, pa.int32()))


def _string_array(strings: list[str]) -> pa.Array:
    """``pa.array(strings, pa.string())``, built from the strings joined by newlines: one
    UTF-8 encoding instead of one per string (sentences and MeCab outputs have no newline;
    a list with one is converted string by string)."""
    if not strings:
        return pa.array([], pa.string())
    joined = pa.array(["\n".join(strings)], pa.large_string())
    array = pc.list_flatten(pc.split_pattern(joined, "\n")).cast(pa.string())
    return array if len(array) == len(strings) else pa.array(strings, pa.string())


def _read_outputs(outs: list[str], pos_by_id: dict[str, str]) -> tuple[pa.Array, pa.Array] | None:
    """(words, pos) list arrays of "surface<TAB>tag<TAB>..." outputs, or None where a
    sentence's output needs ``MecabWords.split``'s reading. A tag is a context id (a
    dictionary word's) or a part of speech (an unknown word's)."""
    fields = pc.split_pattern(_string_array(outs), "\t")
    lengths = pc.list_value_length(fields)
    if pc.any(pc.not_equal(pc.bit_wise_and(lengths, 1), 0)).as_py():
        return None
    flat = pc.list_flatten(fields)
    surfaces = flat.take(pa.array(np.arange(0, len(flat), 2)))
    # The checks and the id mapping run on the part's distinct surfaces and tags only.
    distinct = pc.unique(surfaces).to_pylist()
    if "" in distinct or any(map(str.isspace, distinct)):
        return None
    tags = pc.dictionary_encode(flat.take(pa.array(np.arange(1, len(flat), 2))))
    pos = pa.array([pos_by_id.get(tag, tag) for tag in tags.dictionary.to_pylist()], pa.string()).take(tags.indices)
    offsets = pa.concat_arrays([pa.array([0], pa.int32()),
                                pc.cast(pc.cumulative_sum(pc.shift_right(lengths, 1)), pa.int32())])
    return pa.ListArray.from_arrays(offsets, surfaces), pa.ListArray.from_arrays(offsets, pos)


def _counts_of(rows: pa.Table) -> dict[str, int]:
    """Sentences, words and characters (code points) of a split's rows."""
    return {"sentences": rows.num_rows,
            "words": pc.sum(pc.list_value_length(rows.column("words"))).as_py() or 0,
            "characters": pc.sum(pc.utf8_length(rows.column("text"))).as_py() or 0}


def _count_table(tables: dict[str, pa.Table]) -> pa.Table:
    """(split, word, count) of a part's rows, counted by Arrow rather than word by word."""
    counted = []
    for split in SPLITS:
        words = pc.list_flatten(tables[split].column("words"))
        counts = pc.value_counts(words) if len(words) else pa.array([], pa.struct([("values", pa.string()),
                                                                                  ("counts", pa.int64())]))
        counted.append(pa.table({
            "split": pa.array([split] * len(counts), pa.string()),
            "word": counts.field("values"),
            "count": pc.cast(counts.field("counts"), pa.int64()),
        }, schema=WORD_COUNTS_SCHEMA))
    return pa.concat_tables(counted)


def cpu_count() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _map_local(workers: int | None) -> Callable:
    """A process pool's ordered map (one fugashi Tagger per process), or a plain map."""

    def run(fn: Callable, *iterables) -> Iterator:
        jobs = list(zip(*iterables))
        n = min(workers or cpu_count(), len(jobs))
        if n <= 1:
            yield from (fn(*job) for job in jobs)
            return
        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has this module (pyarrow, pydantic) loaded already,
        # and pandas, which pyarrow imports on a process's first pa.array (0.2-0.5 CPU s);
        # a preload that cannot be imported is skipped.
        ctx.set_forkserver_preload([__name__, "pandas"])
        # the workers end with this process, even SIGKILLed (left alone they would wait forever)
        pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=exit_with, initargs=(os.getpid(),))
        try:
            yield from pool.map(fn, *zip(*jobs))
        except BaseException:  # stopped (Ctrl-C, SIGTERM) or failed: drop the queued parts, end the workers now
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            raise
        pool.shutdown(wait=True)

    return run


def _taking_turns(produce: Callable[..., dict]) -> Callable[..., dict]:
    """Runs making the same output at once share its parts directory, so they take turns (a
    lock file beside ``out_dir``); one that waited finds the output finished and returns it."""

    @functools.wraps(produce)
    def run(docs_dir: Path, doc_ids: Iterable[str], out_dir: Path, cfg: TokenizeConfig, upstream_fingerprint: str,
            *args, **kwargs) -> dict:
        doc_ids = list(doc_ids)
        missing = [d for d in doc_ids if not (docs_dir / f"{d}.txt").is_file()]
        if missing:  # before the lock file: a failed call leaves nothing behind
            raise FileNotFoundError(
                f"document {missing[0]!r} is missing from {docs_dir} ({len(missing)} missing); rerun download"
            )
        with exclusive(out_dir.parent / f".{out_dir.name}.lock"):
            done = out_dir / "manifest.json"
            if done.is_file() and read_json(done).get("fingerprint") == tokenize_key(upstream_fingerprint, cfg):
                return read_json(done)
            return produce(docs_dir, doc_ids, out_dir, cfg, upstream_fingerprint, *args, **kwargs)

    return run


@_taking_turns
def tokenize_corpus(
    docs_dir: Path,
    doc_ids: Iterable[str],
    out_dir: Path,
    cfg: TokenizeConfig,
    upstream_fingerprint: str,
    map_fn: Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run stage 2 into ``out_dir``; returns the manifest (also written as manifest.json).

    Documents are tokenized in parts, fanned out by ``map_fn`` (an ordered ``map`` such as
    a process pool's or a Dask client's; default: a local process pool of ``cfg.workers``),
    then merged in document order into the shards, so the output is the same whatever
    runs the parts. Parts finished before a crash are kept next to ``out_dir`` and reused.
    """
    doc_ids = list(doc_ids)
    parts = plan_parts(docs_dir, doc_ids, cfg.part_chars)
    parts_dir = out_dir.parent / f".{out_dir.name}.parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    names = [_part_name(i, p) for i, p in enumerate(parts)]
    mapper = map_fn or _map_local(cfg.workers)
    counts = {split: {"sentences": 0, "words": 0, "characters": 0} for split in SPLITS}
    sample: dict | None = None
    word_counts = WordCountMerger()
    with atomic_dir(out_dir, keep_existing="manifest.json") as tmp:
        writers = {s: ShardWriter(tmp, s, cfg.max_rows_per_shard, cfg.row_group_size) for s in SPLITS}
        results = mapper(tokenize_part, [str(docs_dir)] * len(parts), parts, [str(parts_dir)] * len(parts), names,
                         [cfg] * len(parts))
        for n, summary in enumerate(results, 1):
            part = read_part(parts_dir, summary["name"])
            for split in SPLITS:
                writers[split].add_table(part[split])
                for k, v in summary["counts"][split].items():
                    counts[split][k] += v
            word_counts.add(part["counts"])
            sample = sample or summary["sample"]
            pause_point("tokenize")
            if progress is not None:
                progress(n, len(parts))
        for w in writers.values():
            w.close()
        if counts["train"]["sentences"] == 0:
            shutil.rmtree(parts_dir, ignore_errors=True)  # a re-run cannot change this: keep nothing
            raise ValueError(
                f"no training sentences: the {len(doc_ids)} document(s) in {docs_dir} gave "
                f"{counts['heldout']['sentences']} held-out and 0 training sentences; "
                "add text or lower heldout_fraction"
            )
        counted = word_counts.sorted_table()
        pq.write_table(counted, tmp / WORD_COUNTS_FILE, compression="zstd")
        distinct = dict(Counter(counted.column("split").to_pylist()))
        totals = {k: sum(counts[s][k] for s in SPLITS) for k in ("sentences", "words", "characters")}
        manifest = {
            "stage": "tokenize",
            "schema_version": SCHEMA_VERSION,
            "schema": {f.name: str(f.type) for f in SHARD_SCHEMA},
            "config": cfg.fingerprint_fields(),
            "upstream_fingerprint": upstream_fingerprint,
            "fingerprint": tokenize_key(upstream_fingerprint, cfg),
            "counts": {"documents": len(doc_ids), **totals, "splits": counts,
                       "distinct_words": {s: distinct.get(s, 0) for s in SPLITS}},
            "shards": {s: writers[s].files for s in SPLITS},
            "word_counts": WORD_COUNTS_FILE,
            "sample": sample,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return manifest


class WordCountMerger:
    """Sums (split, word, count) tables with Arrow. Tables are combined whenever the rows held
    double, so memory stays a small multiple of the number of distinct (split, word) pairs."""

    def __init__(self, min_rows: int = 1 << 20) -> None:
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._limit = min_rows

    def add(self, table: pa.Table) -> None:
        self._tables.append(table)
        self._rows += table.num_rows
        if self._rows > self._limit:
            self._combine()
            self._limit = max(self._limit, 2 * self._rows)

    def _combine(self) -> None:
        if not self._tables:
            return
        summed = pa.concat_tables(self._tables).group_by(["split", "word"]).aggregate([("count", "sum")])
        table = pa.table([summed.column("split"), summed.column("word"), summed.column("count_sum")],
                         schema=WORD_COUNTS_SCHEMA)
        self._tables, self._rows = [table], table.num_rows

    def sorted_table(self) -> pa.Table:
        """One table: each split in SPLITS order, most frequent first, ties by word (UTF-8
        byte order, which is Python's code point order)."""
        self._combine()
        table = self._tables[0] if self._tables else WORD_COUNTS_SCHEMA.empty_table()
        parts = []
        for split in SPLITS:
            rows = table.filter(pc.equal(table.column("split"), split))
            parts.append(rows.take(pc.sort_indices(rows, [("count", "descending"), ("word", "ascending")])))
        return pa.concat_tables(parts).combine_chunks()


def read_word_counts(tokenize_dir: Path, manifest: dict, split: str) -> dict[str, int] | None:
    """The split's word counts made during tokenization (None for an output without them)."""
    name = manifest.get("word_counts")
    if not name:
        return None
    table = pq.read_table(tokenize_dir / name, filters=[("split", "=", split)], columns=["word", "count"])
    return dict(zip(table.column("word").to_pylist(), table.column("count").to_pylist()))


def shard_paths(tokenize_dir: Path, split: str, manifest: dict) -> list[Path]:
    return [tokenize_dir / f["file"] for f in manifest["shards"][split]]


def iter_rows(paths: Iterable[Path], columns: list[str], batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Stream record batches of the given columns over shard files, in order."""
    for path in paths:
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)
