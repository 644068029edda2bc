"""Prefect task of stage 2: documents -> sentences -> MeCab words in Parquet shards."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from mlm_core.config import TokenizeConfig
from mlm_core.io import read_json
from mlm_core.shards import tokenize_corpus, tokenize_key

from .common import MANIFEST, cache_key_fn, record, stage_dir
from .tracking import stage_run


@task(
    name="tokenize",
    cache_key_fn=cache_key_fn("tokenize", lambda p: tokenize_key(p["documents"]["fingerprint"], p["cfg"])),
    persist_result=True,
)
def tokenize_stage(documents: dict, cfg: TokenizeConfig, workdir: str, parent_run_id: str) -> dict:
    key = tokenize_key(documents["fingerprint"], cfg)
    out = stage_dir(workdir, "tokenize", key)
    doc_ids = [d["doc_id"] for d in read_json(Path(documents["dir"]) / MANIFEST)["documents"]]
    with stage_run(parent_run_id, "tokenize") as run:
        run.log_params(cfg.model_dump(), "tokenize")
        manifest = tokenize_corpus(Path(documents["dir"]) / "docs", doc_ids, out, cfg, documents["fingerprint"])
        sample = manifest["sample"]
        get_run_logger().info(
            "sample sentence from %s: %s\nwords: %s", sample["doc_id"], sample["text"], " | ".join(sample["words"])
        )
        counts = manifest["counts"]
        metrics = {f"tokenize/{k}": v for k, v in counts.items() if not isinstance(v, dict)}
        for split, c in counts["splits"].items():
            metrics.update({f"tokenize/{split}_{k}": v for k, v in c.items()})
        metrics["tokenize/shards"] = sum(len(v) for v in manifest["shards"].values())
        run.log_metrics(metrics)
        run.log_artifact(out / MANIFEST)
        run.log_dict(sample, "sample_sentence.json")
    return record("tokenize", out, key, manifest, run.run_id)
