"""Tests for mlm_core.shards: stage 2, documents -> sentences -> MeCab words in Parquet."""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm_core.config import DownloadConfig, TokenizeConfig
from mlm_core.download import download_corpus
from mlm_core.shards import (
    SHARD_SCHEMA,
    SPLITS,
    WORD_COUNTS_FILE,
    is_heldout,
    iter_rows,
    shard_paths,
    tokenize_corpus,
    tokenize_key,
)

COLUMNS = ["doc_id", "sentence_index", "text", "words", "pos"]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> tuple[Path, list[str], str]:
    root = tmp_path_factory.mktemp("docs")
    manifest = download_corpus(DownloadConfig(), root / "download", root / "raw")
    return root / "download" / "docs", [d["doc_id"] for d in manifest["documents"]], manifest["fingerprint"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, docs) -> tuple[Path, dict]:
    docs_dir, ids, fp = docs
    out = tmp_path_factory.mktemp("tok") / "tokenize"
    return out, tokenize_corpus(docs_dir, ids, out, TokenizeConfig(), fp)


def read_split(out: Path, manifest: dict, split: str) -> list[dict]:
    rows: list[dict] = []
    for path in shard_paths(out, split, manifest):
        rows += pq.read_table(path).to_pylist()
    return rows


def write_docs(root: Path, docs: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for doc_id, text in docs.items():
        (root / f"{doc_id}.txt").write_text(text, encoding="utf-8")
    return root


# --- schema and content ------------------------------------------------------------------------


def test_schema_is_the_documented_one(default_run) -> None:
    out, manifest = default_run
    paths = [p for s in SPLITS for p in shard_paths(out, s, manifest)]
    assert [p.name for p in paths] == ["train-00000.parquet", "heldout-00000.parquet"]
    for path in paths:
        schema = pq.read_schema(path)
        assert schema.names == COLUMNS
        assert schema.field("doc_id").type == pa.string()
        assert schema.field("sentence_index").type == pa.int32()
        assert schema.field("text").type == pa.string()
        assert schema.field("words").type == pa.list_(pa.string())
        assert schema.field("pos").type == pa.list_(pa.string())
        assert all(not schema.field(c).nullable for c in COLUMNS)
        assert schema.metadata[b"melos.schema_version"] == b"1"
    assert manifest["schema"] == {
        "doc_id": "string",
        "sentence_index": "int32",
        "text": "string",
        "words": "list<item: string>",
        "pos": "list<item: string>",
    }
    assert manifest["schema_version"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in paths] + ["manifest.json", WORD_COUNTS_FILE])


def test_rows_words_and_pos(default_run, docs) -> None:
    out, manifest = default_run
    rows = read_split(out, manifest, "train") + read_split(out, manifest, "heldout")
    assert len(rows) == 349
    with_spaces = 0
    for row in rows:
        assert row["doc_id"] == docs[1][0]
        assert row["words"] and len(row["words"]) == len(row["pos"])
        assert all(w and not w.isspace() and " " not in w for w in row["words"])
        assert all(p for p in row["pos"])
        assert row["text"] == row["text"].strip() and "\n" not in row["text"]
        assert unicodedata.normalize("NFKC", row["text"]) == row["text"]
        # MeCab keeps every character but the spaces, in order
        assert "".join(row["words"]) == row["text"].replace(" ", "")
        with_spaces += " " in row["text"]
    assert with_spaces >= 1  # the claim above is really tested on text with spaces
    first = min(rows, key=lambda r: r["sentence_index"])
    assert first["text"] == "メロスは激怒した。"
    assert first["words"][0] == "メロス" and first["pos"][0].startswith("名詞")


def test_sentence_index_counts_over_both_splits(default_run) -> None:
    out, manifest = default_run
    for split in SPLITS:
        idx = [r["sentence_index"] for r in read_split(out, manifest, split)]
        assert idx == sorted(idx)  # document order within a split
    all_idx = sorted(r["sentence_index"] for s in SPLITS for r in read_split(out, manifest, s))
    assert all_idx == list(range(len(all_idx)))


def test_manifest_counts_match_a_recount(default_run, docs) -> None:
    out, manifest = default_run
    splits = {}
    for split in SPLITS:
        rows = read_split(out, manifest, split)
        splits[split] = {
            "sentences": len(rows),
            "words": sum(len(r["words"]) for r in rows),
            "characters": sum(len(r["text"]) for r in rows),
        }
        assert [f["rows"] for f in manifest["shards"][split]] == [
            pq.ParquetFile(p).metadata.num_rows for p in shard_paths(out, split, manifest)
        ]
    counts = manifest["counts"]
    assert counts["splits"] == splits
    assert counts["documents"] == 1
    for key in ("sentences", "words", "characters"):
        assert counts[key] == splits["train"][key] + splits["heldout"][key]
    assert counts["sentences"] == 349 and counts["words"] > 6000
    assert manifest["stage"] == "tokenize"
    assert manifest["upstream_fingerprint"] == docs[2]
    assert manifest["fingerprint"] == tokenize_key(docs[2], TokenizeConfig())
    assert manifest["config"] == TokenizeConfig().fingerprint_fields()

    sample = manifest["sample"]
    assert sample["doc_id"] == docs[1][0]
    assert sample["text"] == "メロスは激怒した。"
    matches = [r for s in SPLITS for r in read_split(out, manifest, s) if r["text"] == sample["text"]]
    assert matches and matches[0]["words"] == sample["words"] and matches[0]["pos"] == sample["pos"]


def test_iter_rows_streams_columns_in_order(default_run) -> None:
    out, manifest = default_run
    paths = shard_paths(out, "train", manifest)
    batches = list(iter_rows(paths, ["text", "sentence_index"], batch_size=64))
    assert len(batches) > 1 and all(b.num_rows <= 64 for b in batches)
    assert all(b.schema.names == ["text", "sentence_index"] for b in batches)
    streamed = [t for b in batches for t in b.column(0).to_pylist()]
    assert streamed == [r["text"] for r in read_split(out, manifest, "train")]


# --- sharding -----------------------------------------------------------------------------------


def test_small_shards_and_row_groups(tmp_path: Path, docs, default_run) -> None:
    docs_dir, ids, fp = docs
    out = tmp_path / "tok"
    cfg = TokenizeConfig(max_rows_per_shard=50, row_group_size=7)
    manifest = tokenize_corpus(docs_dir, ids, out, cfg, fp)
    for split in SPLITS:
        files = manifest["shards"][split]
        n = manifest["counts"]["splits"][split]["sentences"]
        assert [f["file"] for f in files] == [f"{split}-{i:05d}.parquet" for i in range(len(files))]
        assert [f["rows"] for f in files] == [50] * (n // 50) + ([n % 50] if n % 50 else [])
        for path in shard_paths(out, split, manifest):
            meta = pq.ParquetFile(path).metadata
            assert 0 < meta.num_rows <= 50
            assert all(meta.row_group(i).num_rows <= 7 for i in range(meta.num_row_groups))
        # the same rows, in the same order, as with one big shard
        assert read_split(out, manifest, split) == read_split(*default_run, split)
    assert len(manifest["shards"]["train"]) == 7  # 319 training sentences
    assert manifest["counts"] == default_run[1]["counts"]
    assert manifest["fingerprint"] != default_run[1]["fingerprint"]


def test_shard_boundary_exactly_full(tmp_path: Path) -> None:
    lines = "\n".join(f"これは{i}番目の文です。" for i in range(20))
    docs_dir = write_docs(tmp_path / "docs", {"d": lines + "\n"})
    manifest = tokenize_corpus(docs_dir, ["d"], tmp_path / "tok", TokenizeConfig(heldout_fraction=0.0, max_rows_per_shard=10), "up")
    assert manifest["shards"] == {
        "train": [{"file": "train-00000.parquet", "rows": 10}, {"file": "train-00001.parquet", "rows": 10}],
        "heldout": [],
    }
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["manifest.json", "train-00000.parquet", "train-00001.parquet", WORD_COUNTS_FILE]


# --- held-out split ------------------------------------------------------------------------------


def test_heldout_membership_is_the_salted_hash(default_run) -> None:
    out, manifest = default_run
    cfg = TokenizeConfig()
    for split in SPLITS:
        for row in read_split(out, manifest, split):
            assert is_heldout(row["text"], cfg.heldout_fraction, cfg.split_salt) == (split == "heldout")
    counts = manifest["counts"]["splits"]
    share = counts["heldout"]["sentences"] / manifest["counts"]["sentences"]
    assert 0.04 < share < 0.16  # 10% requested; binomial std on 349 sentences is 1.6%


def test_is_heldout_properties() -> None:
    texts = [f"文{i}です。" for i in range(4000)]
    assert not any(is_heldout(t, 0.0, "s") for t in texts)
    for fraction in (0.1, 0.5, 0.9):
        share = sum(is_heldout(t, fraction, "s") for t in texts) / len(texts)
        assert abs(share - fraction) < 0.03  # std <= 0.008
    # nested: a sentence held out at 10% is held out at 50% too
    assert all(is_heldout(t, 0.5, "s") for t in texts if is_heldout(t, 0.1, "s"))
    # deterministic, and the salt draws another split
    assert [is_heldout(t, 0.3, "s") for t in texts] == [is_heldout(t, 0.3, "s") for t in texts]
    assert [is_heldout(t, 0.3, "s") for t in texts] != [is_heldout(t, 0.3, "other") for t in texts]
    # every byte of a long salt counts (blake2b keys hold only 64 bytes)
    long_a, long_b = "a" * 64 + "-one", "a" * 64 + "-two"
    assert [is_heldout(t, 0.3, long_a) for t in texts] != [is_heldout(t, 0.3, long_b) for t in texts]
    share = sum(is_heldout(t, 0.3, long_a) for t in texts) / len(texts)
    assert abs(share - 0.3) < 0.03


def test_split_is_independent_of_document_order_and_duplicates_stay_together(tmp_path: Path) -> None:
    shared = "同じ文はいつも同じ側に入る。"
    a = "\n".join([shared] + [f"一つ目の文書の{i}番目の文。" for i in range(60)]) + "\n"
    b = "\n".join([f"二つ目の文書の{i}番目の文。" for i in range(60)] + [shared]) + "\n"
    docs_dir = write_docs(tmp_path / "docs", {"a": a, "b": b})
    cfg = TokenizeConfig(heldout_fraction=0.3)
    m1 = tokenize_corpus(docs_dir, ["a", "b"], tmp_path / "ab", cfg, "up")
    m2 = tokenize_corpus(docs_dir, ["b", "a"], tmp_path / "ba", cfg, "up")

    def sides(out: Path, m: dict) -> dict[tuple[str, str], set[str]]:
        where: dict[tuple[str, str], set[str]] = defaultdict(set)
        for split in SPLITS:
            for r in read_split(out, m, split):
                where[(r["doc_id"], r["text"])].add(split)
        return where

    s1, s2 = sides(tmp_path / "ab", m1), sides(tmp_path / "ba", m2)
    assert s1 == s2 and len(s1) == 122
    assert s1[("a", shared)] == s1[("b", shared)]
    assert 0 < m1["counts"]["splits"]["heldout"]["sentences"] < 122
    assert m1["counts"]["splits"] == m2["counts"]["splits"]


def test_tokenize_is_deterministic(tmp_path: Path, docs, default_run) -> None:
    manifest = tokenize_corpus(*docs[:2], tmp_path / "again", TokenizeConfig(), docs[2])
    assert manifest == default_run[1]
    for split in SPLITS:
        assert read_split(tmp_path / "again", manifest, split) == read_split(*default_run, split)


def test_no_heldout_fraction_means_no_heldout_files(tmp_path: Path, docs) -> None:
    manifest = tokenize_corpus(*docs[:2], tmp_path / "tok", TokenizeConfig(heldout_fraction=0.0), docs[2])
    assert manifest["shards"]["heldout"] == []
    assert manifest["counts"]["splits"]["heldout"] == {"sentences": 0, "words": 0, "characters": 0}
    assert manifest["counts"]["splits"]["train"]["sentences"] == 349


# --- failures -------------------------------------------------------------------------------------


def test_no_documents_is_a_clear_error(tmp_path: Path) -> None:
    docs_dir = write_docs(tmp_path / "docs", {})
    with pytest.raises(ValueError, match="no training sentences") as info:
        tokenize_corpus(docs_dir, [], tmp_path / "out" / "tok", TokenizeConfig(), "up")
    assert "0 document(s)" in str(info.value)
    assert not (tmp_path / "out" / "tok").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary directory left


def test_documents_without_sentences_are_a_clear_error(tmp_path: Path) -> None:
    docs_dir = write_docs(tmp_path / "docs", {"blank": "\n\n   \n", "punct": "\n"})
    with pytest.raises(ValueError, match="no training sentences") as info:
        tokenize_corpus(docs_dir, ["blank", "punct"], tmp_path / "tok", TokenizeConfig(), "up")
    assert "2 document(s)" in str(info.value)
    assert not (tmp_path / "tok").exists()


def test_all_heldout_is_a_clear_error_and_keeps_the_previous_output(tmp_path: Path) -> None:
    sentence = "メロスは激怒した。"
    salt = next(f"salt-{i}" for i in range(1000) if is_heldout(sentence, 0.5, f"salt-{i}"))
    docs_dir = write_docs(tmp_path / "docs", {"one": sentence + "\n"})
    out = tmp_path / "work" / "tok"
    good = tokenize_corpus(docs_dir, ["one"], out, TokenizeConfig(heldout_fraction=0.0), "up")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(ValueError, match="no training sentences") as info:
        tokenize_corpus(docs_dir, ["one"], out, TokenizeConfig(heldout_fraction=0.5, split_salt=salt), "up")
    message = str(info.value)
    assert "1 held-out and 0 training sentences" in message
    assert "heldout_fraction" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert good["counts"]["sentences"] == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["tok"]


def test_missing_document_fails_without_leaving_a_directory(tmp_path: Path) -> None:
    docs_dir = write_docs(tmp_path / "docs", {"here": "ここにある。\n"})
    with pytest.raises(FileNotFoundError):
        tokenize_corpus(docs_dir, ["here", "gone"], tmp_path / "out" / "tok", TokenizeConfig(), "up")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_tokenize_key_follows_inputs() -> None:
    base = tokenize_key("up", TokenizeConfig())
    assert base == tokenize_key("up", TokenizeConfig())
    assert tokenize_key("up2", TokenizeConfig()) != base
    assert tokenize_key("up", TokenizeConfig(heldout_fraction=0.2)) != base
    assert tokenize_key("up", TokenizeConfig(split_salt="x")) != base
    assert SHARD_SCHEMA.names == COLUMNS
