"""Prefect task of stage 3: WordPiece vocabulary over the training shards."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mlm_core.config import VocabConfig
from mlm_core.io import read_json
from mlm_core.vocab import VOCAB_FILE, adopt_vocab, adopt_vocab_key, build_vocab, tokenizer_fingerprint, vocab_key

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
        _log_vocab(run, out, manifest)
    return record("vocab", out, key, manifest, run.run_id)


def adopted_key(shards: dict, init: dict) -> str:
    return adopt_vocab_key(shards["fingerprint"], init["tokenizer_fingerprint"])


@task(name="vocab-adopt", cache_key_fn=cache_key_fn("vocab", lambda p: adopted_key(p["shards"], p["init"])),
      persist_result=True)
def adopt_vocab_stage(shards: dict, init: dict, workdir: str, parent_run_id: str) -> dict:
    """Stage 3 with ``--init-from``: no vocabulary is built; the checkpoint's is adopted (with its
    coverage of this corpus logged), so every id means what it meant in the checkpoint."""
    from mlm_core.tokenizer import WordPieceTokenizer

    tokenizer = WordPieceTokenizer.from_file(Path(init["dir"]) / VOCAB_FILE, **init["tokenizer"])
    assert tokenizer_fingerprint(tokenizer) == init["tokenizer_fingerprint"], "checkpoint changed under the run"
    key = adopted_key(shards, init)
    out = stage_dir(workdir, "vocab", key)
    shards_dir = Path(shards["dir"])
    with stage_run(parent_run_id, "vocab", {"melos.adopted_from": init["source"]}) as run:
        run.log_params({"adopted_from": init["source"], **init["tokenizer"]}, "vocab")
        manifest = adopt_vocab(shards_dir, read_json(shards_dir / MANIFEST), out, tokenizer, init["source"])
        _log_vocab(run, out, manifest)
    return record("vocab", out, key, manifest, run.run_id)


def _log_vocab(run, out: Path, manifest: dict) -> None:
    """Counts, per-split coverage and the files of a vocab stage, built or adopted."""
    metrics = {f"vocab/{k}": v for k, v in manifest["counts"].items()}
    for split, cov in manifest["coverage"].items():
        metrics.update({f"vocab/{split}_{k}": v for k, v in cov.items()})
    run.log_metrics(metrics)
    run.log_artifact(out / VOCAB_FILE)
    run.log_artifact(out / MANIFEST)
