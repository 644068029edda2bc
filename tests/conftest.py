"""Shared fixtures. Everything runs offline, on 127.0.0.1, in temporary directories.

The environment is set before Prefect or MLflow are imported: Prefect reads its settings
(home directory, analytics) at import time.
"""

from __future__ import annotations

import http.server
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="melos-tests-"))
os.environ.update(
    {
        "PREFECT_HOME": str(_SESSION_HOME / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        # Prefect's 20 s default is too short for a temporary server on a busy 2-core machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # the stores Melos remembers go to a temporary file, not the user's ~/.config/melos
        "MELOS_CONFIG_DIR": str(_SESSION_HOME / "melos-config"),
    }
)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_ZIP = REPO / "mlm_core" / "corpus" / "1567_ruby_4948.zip"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_processes(procs: list, timeout: float = 30.0) -> None:
    """Terminate server/worker processes, newest first, killing any that outlive ``timeout``."""
    import subprocess

    for proc in reversed(procs):
        proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for_http(url: str, timeout: float = 120.0, proc=None) -> None:
    """Poll ``url`` until it answers 2xx; fail early if ``proc`` died."""
    import httpx

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2.0).is_success:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s ({last})")


@dataclass
class LocalHTTPServer:
    """A real HTTP server on 127.0.0.1 serving ``root``, plus two misbehaving routes:
    ``/slow/<path>`` answers after ``slow_seconds``; ``/flaky/<path>`` answers 503 the first
    ``flaky_failures`` times it is asked for a given path."""

    root: Path
    port: int = 0
    slow_seconds: float = 5.0
    flaky_failures: int = 1
    requests: list[str] = field(default_factory=list)
    _flaky_seen: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LocalHTTPServer]:
    root = tmp_path / "www"
    root.mkdir()
    state = LocalHTTPServer(root=root)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            state.requests.append(self.path)
            if self.path.startswith("/slow/"):
                time.sleep(state.slow_seconds)
                self.path = self.path[len("/slow") :]
            elif self.path.startswith("/flaky/"):
                seen = state._flaky_seen.get(self.path, 0)
                state._flaky_seen[self.path] = seen + 1
                if seen < state.flaky_failures:
                    self.send_error(503, "Service Unavailable")
                    return
                self.path = self.path[len("/flaky") :]
            try:
                super().do_GET()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (e.g. a timeout test): nothing to answer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Tasks and flows against a temporary local Prefect server (one per test session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass
class PreparedData:
    """The embedded corpus taken through download -> tokenize -> vocab -> encode."""

    root: Path
    tokenize_dir: Path
    tokenize_manifest: dict
    vocab_dir: Path
    vocab_manifest: dict
    tokenizer: object
    train: object  # EncodedCorpus
    heldout: object  # EncodedCorpus
    data_fingerprint: str

    def shard_paths(self, split: str) -> list[Path]:
        from mlm_core.shards import shard_paths

        return shard_paths(self.tokenize_dir, split, self.tokenize_manifest)


@pytest.fixture(scope="session")
def merosu(tmp_path_factory) -> PreparedData:
    from mlm_core.config import DownloadConfig, TokenizeConfig, VocabConfig
    from mlm_core.data import EncodedCorpus, encode_key, encode_shards
    from mlm_core.download import download_corpus
    from mlm_core.shards import shard_paths, tokenize_corpus
    from mlm_core.tokenizer import WordPieceTokenizer
    from mlm_core.vocab import build_vocab

    root = tmp_path_factory.mktemp("merosu")
    docs = download_corpus(DownloadConfig(), root / "download", root / "raw")
    shards = tokenize_corpus(
        root / "download" / "docs", [d["doc_id"] for d in docs["documents"]], root / "tokenize",
        TokenizeConfig(), docs["fingerprint"],
    )
    vocab = build_vocab(root / "tokenize", shards, root / "vocab", VocabConfig())
    tokenizer = WordPieceTokenizer.from_file(root / "vocab" / "vocab.txt")
    corpora = {}
    for split in ("train", "heldout"):
        key = encode_key(shards["fingerprint"], vocab["fingerprint"], split, 64)
        path = encode_shards(shard_paths(root / "tokenize", split, shards), tokenizer, root / "encoded" / split, 64, key)
        corpora[split] = EncodedCorpus(path)
    return PreparedData(
        root=root,
        tokenize_dir=root / "tokenize",
        tokenize_manifest=shards,
        vocab_dir=root / "vocab",
        vocab_manifest=vocab,
        tokenizer=tokenizer,
        train=corpora["train"],
        heldout=corpora["heldout"],
        data_fingerprint=f"{shards['fingerprint']}-{vocab['fingerprint']}",
    )


# The slow end-to-end tests (issue 18): each runs whole `melos` commands in their own
# processes, or its own Prefect/MLflow servers, workers or torchrun, and takes tens of
# seconds to minutes on 2 cores. `pytest -m "not slow"` runs the rest quickly; `make test`
# runs everything. Whole modules by name, single tests as "module::test"; every test marked
# `servers` is slow too. A listed test that is renamed or removed fails the collection of
# its module, so the list cannot go stale silently.
SLOW = {
    "test_compare_deployment", "test_deployment", "test_distributed", "test_kill_anywhere", "test_publish",
    "test_side_by_side", "test_stopping", "test_stopping_compare", "test_tracking_outage", "test_ctrl_c",
    "test_finetune_cli",
    "test_cli::test_killed_run_resumes_from_its_last_checkpoint",
    "test_compare::test_compare_cli_runs_each_setting_and_seed_under_one_comparison",
    "test_evaluate_cli::test_evaluate_scores_a_run_on_another_corpus_and_links_the_runs",
    "test_first_hour::test_a_run_is_found_from_another_directory_without_creating_a_store",
    "test_first_hour::test_runs_lists_the_run_as_a_table_and_as_json",
    "test_first_hour::test_experiment_and_runs_are_tagged_for_the_mlflow_ui",
    "test_first_hour::test_the_wheel_carries_the_corpus_and_builds_without_warnings",
    "test_first_hour::test_runs_lookup_order_filters_and_latest",
    "test_flow::test_flow_end_to_end_then_cached_rerun",
    "test_flow::test_flow_fails_clearly_and_marks_the_mlflow_run_failed",
    "test_flow::test_flow_against_a_real_mlflow_server_and_fill_mask_cli",
    "test_tokenize_parallel::test_dask_local_cluster_with_two_worker_processes",
}


def pytest_collection_modifyitems(config, items) -> None:
    modules = {}
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        modules[module] = item.module
        name = getattr(item, "originalname", item.name)
        if module in SLOW or f"{module}::{name}" in SLOW or item.get_closest_marker("servers"):
            item.add_marker(pytest.mark.slow)
    stale = sorted(
        entry for entry in SLOW
        if "::" in entry and (m := modules.get(entry.split("::")[0])) is not None and not hasattr(m, entry.split("::")[1])
    )
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW lists tests that no longer exist: {', '.join(stale)}")
