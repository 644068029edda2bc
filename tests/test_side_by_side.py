"""Runs that share a machine: locks on run directories, racing stage producers, and two
`melos pretrain` started at once in a fresh directory. Real processes only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tasks.locks import RunBusyError, acquire_run_lock

REPO = Path(__file__).resolve().parents[1]
IO_MODULE = REPO / "mlm_core" / "io.py"


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def _holder_process(lock: Path, run_id: str) -> subprocess.Popen:
    """Another process that takes the run lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from tasks.locks import acquire_run_lock
        lock = acquire_run_lock({str(lock)!r}, {run_id!r}, log=lambda m: None)
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_busy_run_dir_fails_naming_its_holder_or_waits_and_takes_over_from_the_dead(tmp_path):
    lock = tmp_path / "train" / "abc123.lock"
    holder = _holder_process(lock, "run-of-the-holder")
    try:
        with pytest.raises(RunBusyError) as err:
            acquire_run_lock(lock, "second-run", on_busy="fail", log=lambda m: None)
        message = str(err.value)
        assert f"process {holder.pid}" in message and "run-of-the-holder" in message
        assert str(tmp_path / "train" / "abc123") in message and "--on-busy wait" in message

        logs: list[str] = []
        got: list = []
        waiter = threading.Thread(
            target=lambda: got.append(acquire_run_lock(lock, "third-run", log=logs.append, poll_s=0.05))
        )
        waiter.start()
        _wait_for(lambda: logs, what="the waiting log line")
        assert logs[0].startswith("waiting:") and f"process {holder.pid}" in logs[0], logs
        time.sleep(0.3)
        assert not got, "the lock was taken while its holder was alive"

        holder.send_signal(signal.SIGKILL)  # dies without letting go: the kernel frees the lock
        holder.wait(timeout=10)
        waiter.join(timeout=30)
        assert got, "the lock of a killed process was not taken over"
        taken = got[0]
        assert taken.taken_over["pid"] == holder.pid and taken.taken_over["mlflow_run_id"] == "run-of-the-holder"
        assert any(m.startswith("took over") and "run-of-the-holder" in m for m in logs), logs
        assert json.loads(lock.read_text())["mlflow_run_id"] == "third-run"
        taken.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    # a clean release leaves nothing to take over
    with acquire_run_lock(lock, "fourth-run", on_busy="fail", log=lambda m: None) as again:
        assert again.taken_over == {}
    assert lock.read_text() == ""


_PRODUCER = textwrap.dedent("""
    import importlib.util, sys, time
    from pathlib import Path
    # mlm_core/io.py alone (stdlib only): the package would import torch into every producer
    spec = importlib.util.spec_from_file_location("melos_io", sys.argv[4])
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
    atomic_dir = io.atomic_dir
    target, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    with atomic_dir(target) as tmp:
        for i in range(20):
            (tmp / f"part-{i:02d}").write_text(name)
        (Path(str(go) + "." + name)).touch()  # ready
        while not go.exists():
            time.sleep(0.001)
    print("done", name, flush=True)
""")


def test_producers_racing_for_one_stage_dir_leave_one_complete_dir(tmp_path):
    """Several processes finish the same directory at the same instant, over an existing one:
    every producer succeeds and the directory is wholly one producer's, with no temporaries left."""
    target = tmp_path / "tokenize" / "samekey"
    target.mkdir(parents=True)
    (target / "part-00").write_text("old")
    names = ["a", "b", "c", "d"]
    for round_ in range(4):
        go = tmp_path / f"go-{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", _PRODUCER, str(target), n, str(go), str(IO_MODULE)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in names]
        _wait_for(lambda: all(Path(f"{go}.{n}").exists() for n in names), what="all producers ready")
        go.touch()
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        files = sorted(target.iterdir())
        assert [f.name for f in files] == [f"part-{i:02d}" for i in range(20)]
        assert len({f.read_text() for f in files}) == 1, "the directory mixes producers' files"
        assert sorted(p.name for p in target.parent.iterdir()) == ["samekey"]  # no .tmp / .old left behind


def test_a_finished_keyed_dir_stays_put_for_its_readers_when_a_second_producer_finishes(tmp_path):
    """Two runs make the same stage output at once: the first to finish is kept in place (a
    run may already be reading it) and the second drops its copy; an output with another
    description, or one written without ``keep_existing``, replaces what is there."""
    from mlm_core.io import atomic_dir

    target = tmp_path / "encoded" / "samekey"
    with atomic_dir(target, keep_existing="meta.json") as second:
        (second / "meta.json").write_text("key-a")
        (second / "by").write_text("second")
        with atomic_dir(target, keep_existing="meta.json") as first:
            (first / "meta.json").write_text("key-a")
            (first / "by").write_text("first")
        inode = target.stat().st_ino
        reader = open(target / "by", encoding="utf-8")
    with reader:
        assert reader.read() == "first"
    assert target.stat().st_ino == inode and (target / "by").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["samekey"]  # the loser's temporary is gone
    with atomic_dir(target, keep_existing="meta.json") as other:  # another description: replaced
        (other / "meta.json").write_text("key-b")
    assert (target / "meta.json").read_text() == "key-b"

    plain = tmp_path / "plain"
    with atomic_dir(plain) as tmp:
        (tmp / "meta.json").write_text("old")
    with atomic_dir(plain) as tmp:
        (tmp / "meta.json").write_text("new")
    assert (plain / "meta.json").read_text() == "new"


def test_two_stage_runs_of_the_same_download_at_once_agree(tmp_path):
    """The real download stage twice at once into one directory: both succeed, one complete result."""
    code = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from mlm_core.config import DownloadConfig
        from mlm_core.download import download_corpus, download_key
        cfg = DownloadConfig()
        root = Path({str(tmp_path)!r})
        m = download_corpus(cfg, root / "download" / download_key(cfg), root / "raw")
        print(json.dumps({{"fingerprint": m["fingerprint"], "documents": m["counts"]["documents"]}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    (out_dir,) = (tmp_path / "download").iterdir()
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["fingerprint"] == results[0]["fingerprint"]
    assert sorted(p.name for p in (out_dir / "docs").iterdir()) == sorted(
        f"{d['doc_id']}.txt" for d in manifest["documents"]
    )
    assert not [p for p in (tmp_path / "download").iterdir() if p.name.startswith(".")]


ARGS = [
    "--max-steps", "30", "--checkpoint-every", "10", "--batch-size", "16", "--eval-passes", "1",
    "--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64", "--max-length", "64",
    "--experiment", "side-by-side", "--example", "メロスは[MASK]した。", "--workdir", "work",
]
STAGES = ["download", "evaluate", "tokenize", "train", "vocab"]


def test_two_pretrains_at_once_in_a_fresh_directory_both_finish_whole(tmp_path):
    """No mlflow.db and no Prefect database yet; two identical runs start together. Both finish,
    each with its own complete MLflow parent and children, and the two never train at once."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: ./mlflow.db, created by whichever run is first
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "pretrain", *ARGS], cwd=tmp_path, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True) for _ in range(2)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=600)
            outputs.append(out)
            assert p.returncode == 0, out[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("side-by-side")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    train_runs = []
    for parent in parents:
        mine = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["melos.stage"] for r in mine) == STAGES
        assert all(r.info.status == "FINISHED" for r in mine)
        assert parent.data.metrics.get("eval/top1_accuracy") is not None
        train_runs += [r for r in mine if r.data.tags["melos.stage"] == "train"]
    # one run directory, owned by one run at a time: the training spans never overlap
    first, second = sorted(train_runs, key=lambda r: r.info.start_time)
    assert first.info.end_time <= second.info.start_time
    assert first.data.tags["melos.key"] == second.data.tags["melos.key"]


_TOKENIZER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from mlm_core.config import TokenizeConfig
    from mlm_core.shards import tokenize_corpus
    docs, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = TokenizeConfig(part_chars=1500, workers=2, max_rows_per_shard=60)
    manifest = tokenize_corpus(docs, sorted(p.stem for p in docs.glob("*.txt")), out, cfg, "upstream")
    print(json.dumps(manifest, sort_keys=True))
""")


def _waits_for_a_lock(pid: int) -> bool:
    """Whether process ``pid`` is blocked waiting for a file lock (a ``->`` line of /proc/locks)."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[5] == str(pid):
            return True
    return False


def test_two_tokenizers_of_one_corpus_at_once_take_turns_on_its_parts(tmp_path):
    """Two processes tokenize the same corpus into the same output at once. The first is held
    after merging its first part, its process pool having finished every part; the second
    arrives meanwhile. Sharing the parts directory, the second would finish and delete the
    parts the first is still merging; it waits for the first instead, and both get the output."""
    from mlm_core.pause import ENV_MARKER, ENV_POINT
    from mlm_core.shards import plan_parts
    from tests.test_kill_anywhere import _corpus

    docs = _corpus(tmp_path)
    out = tmp_path / "tokenize" / "samekey"
    marker = tmp_path / "first-is-held"
    command = [sys.executable, "-c", _TOKENIZER, str(docs), str(out)]
    first = subprocess.Popen(command, cwd=REPO, env={**os.environ, ENV_POINT: "tokenize", ENV_MARKER: str(marker)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        _wait_for(lambda: marker.exists() or first.poll() is not None, 120, "the first tokenizer to be held")
        assert marker.exists(), first.communicate()[1][-3000:]
        n_parts = len(plan_parts(docs, sorted(p.stem for p in docs.glob("*.txt")), 1500))
        assert n_parts >= 3
        parts_dir = out.parent / ".samekey.parts"
        _wait_for(lambda: len(list(parts_dir.glob("*.json"))) == n_parts, 120, "the first run's parts")
        second = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: second.poll() is not None or _waits_for_a_lock(second.pid), 120,
                  "the second tokenizer to finish or wait")
        marker.unlink()  # the first carries on merging
        results = []
        for proc in (first, second):
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr[-3000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert results[0] == results[1] == json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["samekey"]  # parts, lock and temporaries gone
