"""Tokenize fanned out over parts: the same shards whatever runs them (in-process, a local
process pool, a real Dask LocalCluster through prefect-dask), redo-only-missing after a
crash, word counts made on the way, and the fast MeCab reader equal to fugashi's nodes."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mlm_core.config import DownloadConfig, TokenizeConfig
from mlm_core.download import download_corpus
from mlm_core.shards import SPLITS, WORD_COUNTS_FILE, plan_parts, read_word_counts, shard_paths, tokenize_corpus
from mlm_core.tokenizer import MecabWords
from mlm_core.vocab import count_words

SMALL_PARTS = 1000  # characters: each of the five documents becomes its own part


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str], str]:
    """走れメロス cut into five documents (parts hold whole documents), downloaded once."""
    root = tmp_path_factory.mktemp("parallel")
    story = download_corpus(DownloadConfig(), root / "story", root / "raw")
    lines = (root / "story" / "docs" / f"{story['documents'][0]['doc_id']}.txt").read_text(encoding="utf-8").split("\n")
    sources = []
    for i in range(5):
        path = root / f"chapter{i}.txt"
        path.write_text("\n".join(lines[i::5]) + "\n", encoding="utf-8")
        sources.append(str(path))
    manifest = download_corpus(DownloadConfig(sources=sources), root / "d", root / "raw")
    return root / "d" / "docs", [d["doc_id"] for d in manifest["documents"]], manifest["fingerprint"]


def outputs(out: Path, manifest: dict) -> dict:
    rows = {s: [r for p in shard_paths(out, s, manifest) for r in pq.read_table(p).to_pylist()] for s in SPLITS}
    return {"manifest": manifest, "rows": rows, "counts": pq.read_table(out / WORD_COUNTS_FILE).to_pylist()}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, the whole corpus as a single part."""
    out = tmp_path_factory.mktemp("ref") / "tok"
    cfg = TokenizeConfig(max_rows_per_shard=100, row_group_size=30, part_chars=10**9, workers=1)
    return outputs(out, tokenize_corpus(*corpus[:2], out, cfg, corpus[2]))


def test_process_pool_and_part_size_do_not_change_the_output(corpus, reference, tmp_path: Path) -> None:
    assert len(plan_parts(corpus[0], corpus[1], SMALL_PARTS)) >= 4
    cfg = TokenizeConfig(max_rows_per_shard=100, row_group_size=30, part_chars=SMALL_PARTS, workers=2)
    out = tmp_path / "tok"
    assert outputs(out, tokenize_corpus(*corpus[:2], out, cfg, corpus[2])) == reference
    assert not (tmp_path / ".tok.parts").exists()  # the parts are gone once the shards are complete


def test_word_counts_are_those_of_the_shards(corpus, reference, tmp_path: Path) -> None:
    manifest = reference["manifest"]
    out = tmp_path / "tok"
    tokenize_corpus(*corpus[:2], out, TokenizeConfig(**manifest["config"], workers=1), corpus[2])
    for split in SPLITS:
        assert read_word_counts(out, manifest, split) == dict(count_words(shard_paths(out, split, manifest)))
        assert manifest["counts"]["distinct_words"][split] == len(read_word_counts(out, manifest, split))


def test_a_crashed_run_redoes_only_the_missing_parts(corpus, reference, tmp_path: Path) -> None:
    cfg = TokenizeConfig(max_rows_per_shard=100, row_group_size=30, part_chars=SMALL_PARTS, workers=1)
    out = tmp_path / "tok"
    computed: list[str] = []

    def crash_after_two(fn, *iterables):
        for i, args in enumerate(zip(*iterables)):
            if i == 2:
                raise KeyboardInterrupt("killed")
            yield fn(*args)

    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(*corpus[:2], out, cfg, corpus[2], map_fn=crash_after_two)
    assert not out.exists()
    parts_dir = tmp_path / ".tok.parts"
    done = {p.name: p.stat().st_mtime_ns for p in parts_dir.glob("*.json")}
    assert len(done) == 2

    def recording(fn, *iterables):
        for args in zip(*iterables):
            if not (parts_dir / f"{args[3]}.json").exists():
                computed.append(args[3])
            yield fn(*args)

    assert outputs(out, tokenize_corpus(*corpus[:2], out, cfg, corpus[2], map_fn=recording)) == reference
    n_parts = len(plan_parts(corpus[0], corpus[1], SMALL_PARTS))
    assert len(computed) == n_parts - 2 and not set(computed) & {n[:-5] for n in done}


def test_dask_local_cluster_with_two_worker_processes(corpus, reference, tmp_path: Path, prefect_harness, monkeypatch):
    """The tokenize task on a real distributed.LocalCluster (2 worker processes) given by
    its scheduler address, each part a Prefect task run by prefect-dask."""
    from distributed import Client, LocalCluster
    from prefect import flow

    from tasks import tracking
    from tasks.tokenize import tokenize_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.start_parent("melos-dask", "test", {})
    cfg = TokenizeConfig(max_rows_per_shard=100, row_group_size=30, part_chars=SMALL_PARTS)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        cfg = cfg.model_copy(update={"dask_address": cluster.scheduler_address})

        @flow
        def one_stage():
            documents = {"dir": str(corpus[0].parent), "fingerprint": corpus[2]}
            return tokenize_stage(documents=documents, cfg=cfg, workdir=str(tmp_path / "work"), parent_run_id=parent)

        result = one_stage()
        worker_pids = set(client.run(os.getpid).values())
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    out = Path(result["dir"])
    from mlm_core.io import read_json

    assert outputs(out, read_json(out / "manifest.json")) == reference
    tracking.end_run(parent)


def test_fast_mecab_reader_equals_the_node_api(corpus) -> None:
    mecab = MecabWords()
    text = (corpus[0] / f"{corpus[1][0]}.txt").read_text(encoding="utf-8")
    samples = text.split("\n")[:200] + ["ｱｲｳ 　 テスト\tabc ㋿ 𠮷野家", "EOS と書いた。", "", "　"]
    for line in samples:
        assert mecab(line) == mecab.nodes_reference(line), line
