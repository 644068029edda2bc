"""Labelled data for fine-tuning: readers, splits, and the built-in Aozora tasks.

Two kinds of example:

- sequence classification: ``text`` (and ``text_b`` for pairs) with one ``label``, from JSON
  Lines, CSV or Parquet;
- token classification: one sentence's tokens and one tag each, from a CoNLL-style IOB2 file
  (one token per line, the tag in the last column, a blank line between sentences), or the
  words and parts of speech of the tokenize stage's shards (``aozora-pos``).

Every problem with the input is a ``TaskDataError`` whose message names the file (and line
where there is one) and what to do, for the CLI to print as one line.

Raw text is split into words by the model's own tokenizer (``WordPieceTokenizer.split_words``:
unidic-lite for a Melos model, the checkpoint's dictionary for an imported one), not here.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError



class TaskDataError(UserError, ValueError):
    """Bad labelled data; the message is one line naming the file (and line) and the fix."""


@dataclass
class Example:
    """One labelled example. Classification: ``text`` (+ ``text_b``) and ``label``. Token
    classification: ``tokens`` (the file's own) and one tag per token in ``tags``."""

    label: str | None = None
    text: str | None = None
    text_b: str | None = None
    tokens: list[str] | None = None
    tags: list[str] | None = None
    group: str | None = None  # examples of one group (a work) stay in one split
    where: str = ""  # "file:line" for messages


@dataclass
class TaskData:
    name: str
    kind: str  # "classification" | "ner" (IOB2 entities) | "tagging" (one label per token)
    train: list[Example]
    dev: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    folds: list[list[int]] | None = None  # k-fold: indices into train of each fold's test part
    split: dict = field(default_factory=dict)  # how the split was made (recorded with the run)

    @property
    def labels(self) -> list[str]:
        """Label set, sorted (``O`` first for NER), from the training examples."""
        found = set()
        for ex in self.train:
            found.update(ex.tags if self.kind != "classification" else [ex.label])
        return sorted(found, key=lambda t: (t != "O", t)) if self.kind == "ner" else sorted(found)


# ----------------------------------------------------------------------------- readers

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
CONLL_SUFFIXES = (".conll", ".conllu", ".iob", ".iob2", ".bio", ".txt")


def guess_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return "classification"
    if suffix in CONLL_SUFFIXES:
        return "ner"
    raise TaskDataError(
        f"{path}: cannot tell the task type from the suffix {suffix or '(none)'}; give --task-type "
        f"classification (JSONL/CSV/Parquet) or ner (CoNLL IOB2)"
    )


def _table_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(line number, row)]) of a JSONL, CSV/TSV or Parquet file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return table.column_names, [(i + 1, r) for i, r in enumerate(table.to_pylist())]
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    except Exception as exc:  # pyarrow's errors
        raise TaskDataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            if None in row:
                raise TaskDataError(f"{path}:{reader.line_num}: more fields than the {len(columns)} columns of the header")
            rows.append((reader.line_num, row))
        return columns, rows
    columns: list[str] = []
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path}:{n}: not a JSON object ({exc.msg}); expected one object per line") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}:{n}: a JSON {type(row).__name__}, expected an object per line")
        columns += [k for k in row if k not in columns]
        rows.append((n, row))
    return columns, rows


def read_classification(
    path: str | Path, text_column: str = "text", text_b_column: str = "text_b", label_column: str = "label",
    need_label: bool = True,
) -> list[Example]:
    path = Path(path)
    columns, rows = _table_rows(path)
    for name, what in ((text_column, "text"), (label_column, "label")):
        if name not in columns and (need_label or what == "text"):
            raise TaskDataError(
                f"{path}: no {what} column {name!r} (columns: {', '.join(columns) or 'none'}); "
                f"name it with --{what}-column"
            )
    pairs = text_b_column in columns
    out = []
    for n, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if text is None or (isinstance(text, str) and not text.strip()):
            raise TaskDataError(f"{path}:{n}: empty {text_column!r}; every example needs a text")
        if need_label and (label is None or str(label).strip() == ""):
            raise TaskDataError(f"{path}:{n}: empty {label_column!r}; every example needs a label")
        text_b = row.get(text_b_column) if pairs else None
        if text_b is not None and not str(text_b).strip():
            raise TaskDataError(f"{path}:{n}: empty {text_b_column!r} in a file of sentence pairs; every pair needs both texts")
        out.append(Example(label=None if label is None else str(label).strip(), text=str(text),
                           text_b=None if text_b is None else str(text_b), where=f"{path}:{n}"))
    return out


_TAG = re.compile(r"^(O|[BI]-\S+)$")


def read_conll(path: str | Path) -> list[Example]:
    """Sentences of a CoNLL-style IOB2 file: token in the first column, tag in the last."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    out: list[Example] = []
    tokens: list[str] = []
    tags: list[str] = []
    width: int | None = None
    start = 0
    for n, line in enumerate([*lines, ""], 1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                out.append(Example(tokens=tokens, tags=tags, where=f"{path}:{start}"))
            tokens, tags = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        cols = [c.strip() for c in cols]
        if width is None:
            width = len(cols)
            if width < 2:
                raise TaskDataError(f"{path}:{n}: one column; expected a token and its tag (tag in the last column)")
        elif len(cols) != width:
            raise TaskDataError(f"{path}:{n}: {len(cols)} columns where the file's first token line has {width}")
        tag = cols[-1]
        if not _TAG.match(tag):
            raise TaskDataError(f"{path}:{n}: tag {tag!r} is not IOB2 (O, B-TYPE or I-TYPE)")
        if tag.startswith("I-"):
            prev = tags[-1] if tags else "O"
            if prev == "O" or prev[2:] != tag[2:]:
                raise TaskDataError(
                    f"{path}:{n}: {tag} after {prev} is not IOB2 (an entity starts with B-); convert IOB1 files to IOB2"
                )
        if not tokens:
            start = n
        tokens.append(cols[0])
        tags.append(tag)
    return out


def read_task_file(path: str | Path, kind: str, **columns) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file; give a JSONL/CSV/Parquet or CoNLL file, or a built-in task")
    examples = read_conll(path) if kind == "ner" else read_classification(path, **columns)
    if not examples:
        raise TaskDataError(f"{path}: no examples in it")
    return examples


# ----------------------------------------------------------------------------- splits


def _labels_of(ex: Example) -> list[str]:
    return ex.tags if ex.tags is not None else [ex.label]


def check_splits(data: TaskData) -> None:
    """Empty splits and labels seen only outside train are errors naming where they are."""
    for name in ("train", "dev", "test"):
        if name == "train" or data.split.get(name + "_given"):
            if not getattr(data, name):
                raise TaskDataError(f"{data.split.get(name + '_file', data.name)}: the {name} split is empty")
    known = {label for ex in data.train for label in _labels_of(ex)}
    for name in ("dev", "test"):
        for ex in getattr(data, name):
            for label in _labels_of(ex):
                if label not in known and label != UNSEEN:
                    raise TaskDataError(
                        f"{ex.where}: label {label!r} is in the {name} split but never in train; "
                        "add training examples of it or drop it"
                    )


def seeded_split(
    examples: list[Example], seed: int, dev_fraction: float = 0.1, test_fraction: float = 0.1, kfold_below: int = 0,
    folds: int = 5,
) -> tuple[list[Example], list[Example], list[Example], list[list[int]] | None, dict]:
    """Train/dev/test by a seeded shuffle, whole groups at a time when examples have groups
    (works), stratified by label for classification groups. Below ``kfold_below`` examples:
    ``folds``-fold cross-validation over all of them instead (no dev)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xF17E])
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[ex.group if ex.group is not None else f"#{i}"].append(i)
    names = sorted(groups)
    order = [names[i] for i in rng.permutation(len(names))]
    if len(examples) < kfold_below and len(order) >= folds:
        parts = [sorted(i for g in order[k::folds] for i in groups[g]) for k in range(folds)]
        record = {"method": f"{folds}-fold", "seed": seed, "folds": [len(p) for p in parts], "groups": len(order)}
        return examples, [], [], parts, record
    # by label of the group's first example, so each class has works on every side when it can
    by_label: dict[str, list[str]] = defaultdict(list)
    for g in order:
        first = examples[groups[g][0]]
        by_label[first.label if first.label is not None and first.group is not None else ""].append(g)
    sides: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for members in by_label.values():
        n = len(members)
        n_test = max(1 if n >= 3 else 0, round(n * test_fraction))
        n_dev = max(1 if n >= 3 and dev_fraction > 0 else 0, round(n * dev_fraction))
        sides["test"] += members[:n_test]
        sides["dev"] += members[n_test : n_test + n_dev]
        sides["train"] += members[n_test + n_dev :]
    out = {s: [examples[i] for g in sides[s] for i in groups[g]] for s in sides}
    record = {"method": "seeded", "seed": seed, "dev_fraction": dev_fraction, "test_fraction": test_fraction,
              **{s: len(out[s]) for s in sides}}
    if any(ex.group is not None for ex in examples):
        record.update({f"{s}_groups": sorted(sides[s]) for s in sides})
    return out["train"], out["dev"], out["test"], None, record


def load_task_files(
    train: str | Path, kind: str, dev: str | Path | None = None, test: str | Path | None = None, *, seed: int = 0,
    kfold_below: int = 1000, folds: int = 5, **columns,
) -> TaskData:
    """A task from files: train (+ dev, + test). Without a test file the train file is split
    (seeded; k-fold below ``kfold_below`` examples); the split goes into ``TaskData.split``."""
    train = Path(train)
    examples = read_task_file(train, kind, **columns)
    data = TaskData(name=train.stem, kind=kind, train=examples)
    data.split = {"train_file": str(train)}
    if dev is not None:
        data.dev = read_task_file(dev, kind, **columns)
        data.split.update(dev_file=str(dev), dev_given=True)
    if test is not None:
        data.test = read_task_file(test, kind, **columns)
        data.split.update(test_file=str(test), test_given=True, method="given files")
    else:
        tr, dv, te, parts, record = seeded_split(
            examples, seed, dev_fraction=0.0 if dev is not None else 0.1, kfold_below=kfold_below, folds=folds)
        data.train, data.test, data.folds = tr, te, parts
        if dev is None:
            data.dev = dv
        data.split.update(record)
    if kind == "ner" and data.folds is None:
        pass
    check_splits(data)
    return data


# ----------------------------------------------------------------------------- built-in tasks

BUILTIN_TASKS = ("aozora-authors", "aozora-pos")


def corpus_sentences(tokenize_dir: Path, documents: list[dict]) -> list[dict]:
    """Every sentence of the tokenize stage's shards (both splits) with its document's author
    and work: [{"doc_id", "work", "author", "text", "words", "pos"}]."""
    from .io import read_json
    from .shards import iter_rows, shard_paths

    manifest = read_json(tokenize_dir / "manifest.json")
    by_doc = {d["doc_id"]: d for d in documents}
    out = []
    for split in ("train", "heldout"):
        for batch in iter_rows(shard_paths(tokenize_dir, split, manifest), ["doc_id", "sentence_index", "text", "words", "pos"]):
            for row in batch.to_pylist():
                doc = by_doc.get(row["doc_id"], {})
                out.append({**row, "author": doc.get("author"), "work": doc.get("work_id") or row["doc_id"]})
    out.sort(key=lambda r: (r["doc_id"], r["sentence_index"]))
    return out


def builtin_task(
    name: str, tokenize_dir: Path, documents: list[dict], *, seed: int = 0, max_per_author: int = 2000,
    max_sentences: int = 4000, min_words: int = 3,
) -> TaskData:
    """``aozora-authors``: which author wrote a sentence (works split between train, dev and
    test, so no work is on two sides). ``aozora-pos``: the UniDic part of speech of each
    MeCab word (split by work too). Sentences are sampled with ``seed`` to the caps."""
    if name not in BUILTIN_TASKS:
        raise TaskDataError(f"unknown built-in task {name!r}; choose one of {', '.join(BUILTIN_TASKS)} or give a file")
    rows = [r for r in corpus_sentences(tokenize_dir, documents) if len(r["words"]) >= min_words]
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xA07A])
    where = f"{tokenize_dir}"
    if name == "aozora-authors":
        by_author: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r["author"]:
                by_author[r["author"]].append(r)
        works = {a: {r["work"] for r in rs} for a, rs in by_author.items()}
        usable = sorted(a for a in by_author if len(works[a]) >= 2)
        if len(usable) < 2:
            raise TaskDataError(
                f"{where}: aozora-authors needs at least two authors with two works or more each "
                f"(found {', '.join(f'{a} ({len(works[a])})' for a in sorted(works)) or 'no authors'}); "
                "pre-train on a corpus of several authors, e.g. --source aozora:author=ID,ID"
            )
        examples = []
        for a in usable:
            chosen = by_author[a]
            if len(chosen) > max_per_author:
                chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), max_per_author, replace=False))]
            examples += [Example(label=a, text=r["text"], group=r["work"], where=f"{r['doc_id']}#{r['sentence_index']}")
                         for r in chosen]
        kind = "classification"
        data = TaskData(name=name, kind=kind, train=[])
        # whole works per side, per author: each author has works in test (and dev when it has 3+)
        sides: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
        record = {"method": "by work", "seed": seed, "authors": usable}
        for a in usable:
            own = [e for e in examples if e.label == a]
            tr, dv, te, _, rec = seeded_split(own, seed)
            if not te:  # two works: one for test, one for train
                ws = sorted({e.group for e in own})
                pick = ws[int(rng.integers(len(ws)))]
                te = [e for e in own if e.group == pick]
                tr = [e for e in own if e.group != pick]
                dv = []
            sides["train"] += tr
            sides["dev"] += dv
            sides["test"] += te
            record[a] = {s: sorted({e.group for e in part}) for s, part in (("train", tr), ("dev", dv), ("test", te))}
    else:
        by_work: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_work[r["work"]].append(r)
        if len(by_work) < 2:
            raise TaskDataError(f"{where}: aozora-pos needs a corpus of at least two works (found {len(by_work)})")
        if len(rows) > max_sentences:
            rows = [rows[i] for i in sorted(rng.choice(len(rows), max_sentences, replace=False))]
        examples = [Example(tokens=list(r["words"]), tags=list(r["pos"]), group=r["work"],
                            where=f"{r['doc_id']}#{r['sentence_index']}") for r in rows]
        kind = "tagging"
        data = TaskData(name=name, kind=kind, train=[])
        tr, dv, te, _, record = seeded_split(examples, seed)
        if not te:
            ws = sorted(by_work)
            pick = ws[int(rng.integers(len(ws)))]
            te = [e for e in examples if e.group == pick]
            tr = [e for e in examples if e.group != pick]
            dv = []
        record["method"] = "by work"
        sides = {"train": tr, "dev": dv, "test": te}
        # labels only seen in test: tag them as the commonest train tag would be wrong; drop those words' scoring
    data.train, data.dev, data.test = sides["train"], sides["dev"], sides["test"]
    data.split = {**record, **{s: len(v) for s, v in sides.items()}}
    if kind == "tagging":
        known = {t for ex in data.train for t in ex.tags}
        data.split["unseen_tags_as_unknown"] = sum(t not in known for part in (data.dev, data.test)
                                                   for ex in part for t in ex.tags)
        for part in (data.dev, data.test):
            for ex in part:
                ex.tags = [t if t in known else UNSEEN for t in ex.tags]
    check_splits(data)
    return data


UNSEEN = "<unseen>"  # a built-in tag never seen in training: scored as a word no prediction can match


def find_corpus(path: Path, doc_ids: set[str] | None = None) -> tuple[Path, list[dict]]:
    """(tokenize stage directory, documents of its download manifest) from a tokenize directory,
    a Melos work directory, or a train run's directory / model directory inside one. With
    ``doc_ids`` (the documents the model was trained on), only a corpus of exactly those."""
    from .io import read_json

    path = Path(path).resolve()
    candidates: list[Path] = []
    if (path / "manifest.json").is_file() and (path / "word_counts.parquet").exists():
        candidates = [path]
        workdir = path.parent.parent
    else:
        workdir = next((p for p in (path, *path.parents) if (p / "tokenize").is_dir() and (p / "download").is_dir()), None)
        if workdir is None:
            raise TaskDataError(
                f"{path}: no Melos work directory (with tokenize/ and download/) here or above; "
                "give --corpus WORKDIR or a tokenize stage directory"
            )
        candidates = sorted((p for p in (workdir / "tokenize").iterdir() if (p / "manifest.json").is_file()),
                            key=lambda p: p.stat().st_mtime, reverse=True)
    downloads = {}
    for d in (workdir / "download").glob("*/manifest.json") if (workdir / "download").is_dir() else []:
        try:
            m = read_json(d)
            if doc_ids is None or {doc["doc_id"] for doc in m["documents"]} == set(doc_ids):
                downloads[m["fingerprint"]] = m["documents"]
        except (OSError, KeyError, ValueError):
            continue
    for tok in candidates:
        up = read_json(tok / "manifest.json").get("upstream_fingerprint")
        if up in downloads:
            return tok, downloads[up]
    raise TaskDataError(
        f"{path}: no tokenize stage output whose download manifest (with the authors) is under {workdir}; "
        "give --corpus with the work directory of the pre-training run"
    )
