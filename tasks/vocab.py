"""Prefect task of stage 3: WordPiece vocabulary over the training shards."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mlm_core.config import VocabConfig
from mlm_core.io import read_json
from mlm_core.vocab import VOCAB_FILE, build_vocab, vocab_key

from .common import MANIFEST, cache_key_fn, record, stage_dir
from .tracking import stage_run


@task(
    name="vocab",
    cache_key_fn=cache_key_fn("vocab", lambda p: vocab_key(p["shards"]["fingerprint"], p["cfg"])),
    persist_result=True,
)
def vocab_stage(shards: dict, cfg: VocabConfig, workdir: str, parent_run_id: str) -> dict:
    key = vocab_key(shards["fingerprint"], cfg)
    out = stage_dir(workdir, "vocab", key)
    shards_dir = Path(shards["dir"])
    with stage_run(parent_run_id, "vocab") as run:
        run.log_params(cfg.model_dump(), "vocab")
        manifest = build_vocab(shards_dir, read_json(shards_dir / MANIFEST), out, cfg)
        metrics = {f"vocab/{k}": v for k, v in manifest["counts"].items()}
        for split, cov in manifest["coverage"].items():
            metrics.update({f"vocab/{split}_{k}": v for k, v in cov.items()})
        run.log_metrics(metrics)
        run.log_artifact(out / VOCAB_FILE)
        run.log_artifact(out / MANIFEST)
    return record("vocab", out, key, manifest, run.run_id)
