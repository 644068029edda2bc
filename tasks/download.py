"""Prefect task of stage 1: fetch sources into cleaned documents, retried on network errors."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from mlm_core.config import DownloadConfig
from mlm_core.download import TransientSourceError, download_corpus, download_key

from .common import MANIFEST, cache_key_fn, log_corpus_dataset, record, stage_dir, stage_progress
from .tracking import stage_run


def retry_on_network_error(_task, _task_run, state) -> bool:
    """Retry only what a retry can fix: timeouts, resets, HTTP 5xx. A 404 fails at once."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            return False
    return isinstance(exc, TransientSourceError)


@task(
    name="download",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    retry_condition_fn=retry_on_network_error,
    cache_key_fn=cache_key_fn("download", lambda p: download_key(p["cfg"])),
    persist_result=True,
)
def download_stage(cfg: DownloadConfig, workdir: str, parent_run_id: str) -> dict:
    key = download_key(cfg)
    out = stage_dir(workdir, "download", key)
    with stage_run(parent_run_id, "download") as run:
        run.log_params(cfg.model_dump(), "download")
        with stage_progress("download", "files") as progress:
            manifest = download_corpus(cfg, out, Path(workdir).resolve() / "raw", progress=progress)
        counts = manifest["counts"]
        run.log_metrics({f"download/{k}": v for k, v in counts.items()})
        run.set_tags({"melos.fingerprint": manifest["fingerprint"], "melos.key": key})
        run.log_artifact(out / MANIFEST)
        if manifest["failures"] or manifest["skipped"]:
            run.log_dict({"failures": manifest["failures"], "skipped": manifest["skipped"]}, "download_problems.json")
            for failure in manifest["failures"][:20]:
                get_run_logger().warning("failed, left out: %s", failure["error"])
        log_corpus_dataset(
            [run.run_id, parent_run_id], f"melos-corpus-{manifest['fingerprint'][:8]}", manifest["fingerprint"],
            str(out), {"sources": cfg.sources, **counts},
        )
    return record("download", out, key, manifest, run.run_id, failed=counts["failed"])
