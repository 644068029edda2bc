"""`melos` as a user runs it: a pipeline killed mid-training and resumed with --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlm_core.checkpoint import list_checkpoints

ARGS = [
    "--max-steps", "200", "--checkpoint-every", "20", "--batch-size", "16", "--eval-passes", "1",
    "--hidden-size", "64", "--intermediate-size", "256",
    "--experiment", "melos-cli", "--example", "メロスは[MASK]した。",
]


def _melos(args: list[str], cwd: Path, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "pretrain", *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs,
    )


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    workdir = tmp_path / "work"
    args = [*ARGS, "--workdir", str(workdir)]

    # start a run and kill it (and its temporary Prefect server) hard once a checkpoint exists
    proc = _melos(args, tmp_path, env, start_new_session=True)
    deadline = time.monotonic() + 300
    checkpoints: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        checkpoints = [c for d in workdir.glob("train/*/checkpoints") for c in list_checkpoints(d)]
        if checkpoints:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run_dir = checkpoints[0].parent.parent
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    killed_at = int(list_checkpoints(run_dir / "checkpoints")[-1].name.split("-")[1])
    assert 20 <= killed_at < 200
    assert not (run_dir / "model").exists()

    # the same command with --resume finishes the run from that checkpoint
    resumed = _melos([*args, "--resume", "--json"], tmp_path, env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    result = json.loads(out[out.index("{\n"):out.rindex("}") + 1])
    assert Path(result["model_dir"]).parent == run_dir
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == "step-0000200"
    assert not list((run_dir / "checkpoints").glob(".*"))  # a half-written checkpoint was swept away

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    train_run = client.get_run(result["stages"]["train"])
    assert train_run.data.tags["melos.resumed_from_step"] == str(killed_at)
    assert train_run.data.tags["melos.resume"] == "true"
    steps = sorted(m.step for m in client.get_metric_history(train_run.info.run_id, "train/loss"))
    assert steps == list(range(1, 201))  # the whole curve: history up to the checkpoint, then the rest


def test_options_map_onto_the_stage_configs():
    from flows.cli import build_parser, configs_from_args

    ns = build_parser().parse_args(
        ["pretrain", "--source", "embedded", "--source", "a.txt", "--hidden-size", "96", "--heads", "3",
         "--masking", "static", "--mask-rate", "0.2", "--vocab-size", "4000", "--eval-passes", "2",
         "--device", "cpu", "--resume"]
    )
    cfg = configs_from_args(ns)
    assert cfg["download"].sources == ["embedded", "a.txt"]
    assert (cfg["train"].hidden_size, cfg["train"].num_heads, cfg["train"].masking) == (96, 3, "static")
    assert cfg["train"].mask_rate == 0.2 and cfg["train"].num_layers == 2  # untouched fields keep defaults
    assert cfg["vocab"].vocab_size == 4000 and cfg["evaluate"].passes == 2 and cfg["runtime"].device == "cpu"
    assert ns.resume is True


def test_bad_options_get_a_readable_error():
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "pretrain", "--hidden-size", "130", "--heads", "4"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "--hidden-size (130) must be divisible by --heads (4)" in out.stderr  # the flags, not field names
    assert "Traceback" not in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "flows.cli", "pretrain", "--mask-rate", "2", "--lr", "-1", "--tokens-per-batch", "10"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    # one line, naming each bad flag (not pydantic's field names and URLs)
    assert bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "--mask-rate:" in bad.stderr and "--lr:" in bad.stderr and "pydantic.dev" not in bad.stderr
    assert "one sequence of --max-length 128" in bad.stderr and "max_length" not in bad.stderr


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--source", "--vocab-size", "--epochs", "--mask-rate", "--masking", "--seed", "--resume", "--workdir"):
        assert flag in out.stdout
    assert "Stage 4" in out.stdout and "(default: 0.15)" in out.stdout
    # `melos evaluate` scores the whole held-out split unless asked for a sample, and says so
    ev = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", "--help"], capture_output=True, text=True)
    assert "(default: every sentence)" in " ".join(ev.stdout.split()) and "(default: 4000)" not in ev.stdout
