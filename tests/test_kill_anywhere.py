"""`melos pretrain` SIGKILLed at the worst moments, then run again: the rerun completes with
the uninterrupted run's results, nothing half-written looks finished, nothing is left running.

The points are reached through the test hook in ``mlm_core/pause.py`` (MELOS_TEST_PAUSE_AT):
the run writes a marker and sleeps there, and the test kills it. One work directory goes
through every kill in pipeline order, each rerun getting past the previous kill's point
before it is killed at the next one: download (a document written into the stage's temporary
directory), tokenize (a part merged into a shard being written, with the tokenizer processes
running), a checkpoint's files written but not yet renamed, evaluation; the last rerun
finishes and is compared with a reference run made in another work directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mlm_core.checkpoint import CONFIG, MODEL, OPTIMIZER, TRAINER, VOCAB, list_checkpoints
from mlm_core.io import read_json, sha256_bytes
from mlm_core.pause import ENV_MARKER, ENV_POINT
from tests.test_stopping import _alive, _descendants, _wait_gone

ARGS = [
    "--max-steps", "30", "--checkpoint-every", "10", "--batch-size", "16", "--eval-passes", "1",
    "--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64", "--max-length", "64",
    "--part-chars", "1500", "--workers", "2", "--max-rows-per-shard", "60",
    "--experiment", "kill-anywhere", "--example", "メロスは[MASK]した。", "--json",
]


def _corpus(root: Path) -> Path:
    """走れメロス, cleaned, cut into six documents (so tokenize runs several parts in a pool)."""
    from mlm_core.config import DownloadConfig
    from mlm_core.download import download_corpus

    manifest = download_corpus(DownloadConfig(), root / "dl", root / "raw")
    text = root / "dl" / "docs" / f"{manifest['documents'][0]['doc_id']}.txt"
    lines = text.read_text(encoding="utf-8").splitlines()
    out = root / "corpus"
    out.mkdir()
    step = len(lines) // 6 + 1
    for i in range(6):
        (out / f"part{i}.txt").write_text("\n".join(lines[i * step:(i + 1) * step]) + "\n", encoding="utf-8")
    return out


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "pretrain", *args]


def _complete(args: list[str], cwd: Path, env: dict) -> dict:
    done = subprocess.run(_command(args), cwd=cwd, env=env, text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{\n"):done.stdout.rindex("}") + 1])


def _kill_at(point: str, args: list[str], cwd: Path, env: dict) -> None:
    """Run until the process stops at ``point``, SIGKILL it (it alone, not its group), and
    check that every process it had started dies with it."""
    marker, log = cwd / f"paused-at-{point}", cwd / f"killed-at-{point}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(args), cwd=cwd, env={**env, ENV_POINT: point, ENV_MARKER: str(marker)},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the run never reached {point!r} (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        assert int(marker.read_text()) == proc.pid  # held in melos itself, not in a helper process
        children = _descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert children, "the run started no process (no temporary Prefect server?)"
    assert not _wait_gone(children), f"processes outlived the run killed at {point}: {_alive(children)}"
    marker.unlink()


def _visible_dirs(parent: Path) -> list[Path]:
    """What a later run may take as an output: directories without a leading dot (temporary
    ones are dotted and never read)."""
    return [d for d in parent.glob("[!.]*") if d.is_dir()] if parent.is_dir() else []


def _assert_every_finished_looking_output_is_whole(work: Path) -> None:
    for d in _visible_dirs(work / "download"):
        manifest = read_json(d / "manifest.json")
        for doc in manifest["documents"]:
            text = (d / "docs" / f"{doc['doc_id']}.txt").read_text(encoding="utf-8")
            assert text.endswith("\n") and sha256_bytes(text[:-1].encode("utf-8")) == doc["text_sha256"], d
    for d in _visible_dirs(work / "tokenize"):
        manifest = read_json(d / "manifest.json")
        for split, files in manifest["shards"].items():
            rows = [pq.ParquetFile(d / f["file"]).metadata.num_rows for f in files]
            assert rows == [f["rows"] for f in files], d
            assert sum(rows) == manifest["counts"]["splits"][split]["sentences"], d
        assert pq.read_table(d / manifest["word_counts"]).num_rows == sum(manifest["counts"]["distinct_words"].values())
    for d in _visible_dirs(work / "vocab"):
        manifest = read_json(d / "manifest.json")
        assert len((d / "vocab.txt").read_text(encoding="utf-8").splitlines()) == manifest["counts"]["vocab_size"]
    for d in _visible_dirs(work / "encoded"):
        meta = read_json(d / "meta.json")
        assert len(np.load(d / "offsets.npy")) == meta["sequences"] + 1, d
    for run in _visible_dirs(work / "train"):
        for ckpt in [*list_checkpoints(run / "checkpoints"), *([run / "model"] if (run / "model").exists() else [])]:
            files = (CONFIG, VOCAB, MODEL) if ckpt.name == "model" else (CONFIG, VOCAB, MODEL, OPTIMIZER, TRAINER)
            for name in files:
                assert (ckpt / name).is_file(), ckpt / name
                if name.endswith(".pt"):
                    torch.load(ckpt / name, weights_only=True)
            assert read_json(ckpt / CONFIG)["step"] >= 1
        if (run / "run.json").is_file() and read_json(run / "run.json")["status"] == "completed":
            assert (run / "model" / MODEL).is_file()


def _outputs(work: Path) -> dict:
    """What the run produced, comparable across work directories."""
    (tok,) = _visible_dirs(work / "tokenize")
    manifest = read_json(tok / "manifest.json")
    shards = {s: [pq.read_table(tok / f["file"]).to_pylist() for f in files] for s, files in manifest["shards"].items()}
    (voc,) = _visible_dirs(work / "vocab")
    (run,) = _visible_dirs(work / "train")
    return {
        "tokenize": (tok.name, shards, pq.read_table(tok / manifest["word_counts"]).to_pylist()),
        "vocab": (voc.name, (voc / "vocab.txt").read_text(encoding="utf-8")),
        "weights": torch.load(run / "model" / MODEL, weights_only=True),
        "steps": read_json(run / "run.json")["steps"],
    }


def test_killed_anywhere_the_rerun_finishes_with_the_uninterrupted_results(tmp_path):
    corpus = _corpus(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    reference = _complete([*ARGS, "--source", str(corpus), "--workdir", "ref"], tmp_path, env)

    args = [*ARGS, "--source", str(corpus), "--workdir", "work"]
    work = tmp_path / "work"
    _kill_at("download", args, tmp_path, env)
    assert not _visible_dirs(work / "download")
    _kill_at("tokenize", args, tmp_path, env)  # the rerun downloads, then is killed mid-tokenize
    assert _visible_dirs(work / "download") and not _visible_dirs(work / "tokenize")
    _assert_every_finished_looking_output_is_whole(work)
    _kill_at("checkpoint#2", args, tmp_path, env)  # step 10 is kept, step 20 half-written
    (run,) = _visible_dirs(work / "train")
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step-0000010"]
    assert list((run / "checkpoints").glob(".step-0000020.*.tmp"))  # the half-written one, dotted
    _assert_every_finished_looking_output_is_whole(work)
    _kill_at("evaluate", [*args, "--resume"], tmp_path, env)  # trained to the end, killed evaluating
    assert read_json(run / "run.json")["status"] == "completed"
    assert not list((run / "checkpoints").glob(".*.tmp"))
    _assert_every_finished_looking_output_is_whole(work)

    result = _complete([*args, "--resume"], tmp_path, env)
    _assert_every_finished_looking_output_is_whole(work)
    assert result["metrics"] == reference["metrics"]
    assert result["fill_mask"] == reference["fill_mask"]
    ours, theirs = _outputs(work), _outputs(tmp_path / "ref")
    assert ours["tokenize"] == theirs["tokenize"] and ours["vocab"] == theirs["vocab"]
    assert ours["steps"] == theirs["steps"] == 30
    assert ours["weights"].keys() == theirs["weights"].keys()
    assert all(torch.equal(ours["weights"][k], theirs["weights"][k]) for k in ours["weights"])
