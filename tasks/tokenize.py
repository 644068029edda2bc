"""Prefect task of stage 2: documents -> sentences -> MeCab words in Parquet shards.

The documents are tokenized in parts, in parallel: by default on a local process pool
(one fugashi Tagger per process); with ``dask``/``dask_address`` as Prefect tasks on a
Dask cluster through ``prefect-dask`` (a local cluster, or an existing scheduler). Either
way the shards are merged in document order, so they are identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mlm_core.config import TokenizeConfig
from mlm_core.io import read_json
from mlm_core.shards import cpu_count, tokenize_corpus, tokenize_key, tokenize_part

from .common import MANIFEST, cache_key_fn, record, stage_dir, stage_progress
from .tracking import stage_run

_PART_PARAMS = ("docs_dir", "doc_ids", "parts_dir", "name", "cfg")


@task(name="tokenize-part", cache_policy=NO_CACHE, persist_result=False)
def tokenize_part_task(docs_dir: str, doc_ids: list[str], parts_dir: str, name: str, cfg: TokenizeConfig) -> dict:
    return tokenize_part(docs_dir, doc_ids, parts_dir, name, cfg)


def dask_map(cfg: TokenizeConfig) -> Callable:
    """An ordered map that runs each part as a Prefect task on Dask (prefect-dask)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RuntimeError("tokenize on Dask needs prefect-dask: pip install 'melos[dask]'") from None
    if cfg.dask_address:
        runner = DaskTaskRunner(address=cfg.dask_address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": cfg.workers or cpu_count(),
                "processes": True,
                "threads_per_worker": 1,  # MeCab holds the GIL: one part at a time per process
                "silence_logs": logging.WARNING,
            }
        )

    def run(fn: Callable, *iterables) -> Iterator[dict]:
        assert fn is tokenize_part, fn
        with runner:
            futures = [
                runner.submit(tokenize_part_task, parameters=dict(zip(_PART_PARAMS, args))) for args in zip(*iterables)
            ]
            for future in futures:
                yield future.result()

    return run


@task(
    name="tokenize",
    cache_key_fn=cache_key_fn("tokenize", lambda p: tokenize_key(p["documents"]["fingerprint"], p["cfg"])),
    persist_result=True,
)
def tokenize_stage(documents: dict, cfg: TokenizeConfig, workdir: str, parent_run_id: str) -> dict:
    key = tokenize_key(documents["fingerprint"], cfg)
    out = stage_dir(workdir, "tokenize", key)
    doc_ids = [d["doc_id"] for d in read_json(Path(documents["dir"]) / MANIFEST)["documents"]]
    mapper = dask_map(cfg) if cfg.dask or cfg.dask_address else None
    with stage_run(parent_run_id, "tokenize") as run:
        run.log_params(cfg.model_dump(), "tokenize")
        with stage_progress("tokenize", "parts") as progress:
            manifest = tokenize_corpus(
                Path(documents["dir"]) / "docs", doc_ids, out, cfg, documents["fingerprint"], map_fn=mapper,
                progress=progress,
            )
        sample = manifest["sample"]
        get_run_logger().info(
            "sample sentence from %s: %s\nwords: %s", sample["doc_id"], sample["text"], " | ".join(sample["words"])
        )
        counts = manifest["counts"]
        metrics = {f"tokenize/{k}": v for k, v in counts.items() if not isinstance(v, dict)}
        for split, c in counts["splits"].items():
            metrics.update({f"tokenize/{split}_{k}": v for k, v in c.items()})
        metrics.update({f"tokenize/{split}_distinct_words": n for split, n in counts["distinct_words"].items()})
        metrics["tokenize/shards"] = sum(len(v) for v in manifest["shards"].values())
        run.log_metrics(metrics)
        run.log_artifact(out / MANIFEST)
        run.log_dict(sample, "sample_sentence.json")
    return record("tokenize", out, key, manifest, run.run_id)
