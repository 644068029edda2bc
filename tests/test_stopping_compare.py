"""Stopping `melos compare` with SIGTERM: like pretrain, it exits promptly, marks its MLflow
runs KILLED and leaves no process behind (it used to leave Prefect's temporary server); the same
command with --resume keeps the finished setting and continues the stopped one from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlm_core.checkpoint import list_checkpoints
from test_stopping import ARGS, _alive, _descendants, _wait_gone


def test_sigterm_stops_a_comparison_cleanly_and_resume_keeps_what_finished(tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    work = tmp_path / "work"
    command = [sys.executable, "-m", "flows.cli", "compare", "--grid", "masking=static,dynamic", *ARGS,
               "--workdir", str(work)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # stopped while the second setting trains
        if sum(bool(list_checkpoints(d)) for d in work.glob("train/*/checkpoints")) == 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the comparison ended before it could be stopped:\n{proc.communicate()[0]}"
    children = _descendants(proc.pid)
    assert children, "the comparison started no process (no temporary Prefect server?)"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM" in out
    assert not _wait_gone(children), f"processes outlived the stopped comparison: {_alive(children)}"

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("melos-stop")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("melos.comparison") == "parent"]
    assert parent.info.status == "KILLED", out[-3000:]
    settings = {r.data.tags["melos.setting"]: r for r in runs if "melos.setting" in r.data.tags}
    assert {k: r.info.status for k, r in settings.items()} == {"masking=static": "FINISHED", "masking=dynamic": "KILLED"}
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert "--resume" in out

    # resumed with a downstream task added: the finished setting's model is fine-tuned on it too
    task = tmp_path / "kw.jsonl"
    lines = ["メロスは激怒した。", "王は笑った。", "メロスは走った。", "妹は眠った。", "メロスは友を待たせた。", "日は沈んだ。"] * 6
    task.write_text("".join(json.dumps({"text": t, "label": "melos" if "メロス" in t else "other"},
                                       ensure_ascii=False) + "\n" for t in lines), encoding="utf-8")
    done = subprocess.run([*command, "--resume", "--downstream", str(task), "--downstream-max-steps", "2", "--json"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert [r["setting"] for r in result["rows"]] == ["masking=static", "masking=dynamic", "random init (control)"]
    assert all(0.0 <= r["finetune/kw/f1"] <= 1.0 for r in result["rows"])
    new_parent = client.get_run(result["mlflow_run_id"])
    assert new_parent.info.status == "FINISHED" and new_parent.data.tags["melos.resumed_from"] == parent.info.run_id
    children = {r.data.tags["melos.setting"]: r for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`melos.comparison` = '{result['mlflow_run_id']}'")}
    # the finished setting joined as it was (same run, not trained again) ...
    assert children["masking=static"].info.run_id == settings["masking=static"].info.run_id
    assert children["masking=static"].data.tags["mlflow.parentRunId"] == result["mlflow_run_id"]
    # ... and the stopped one trained on from its last checkpoint
    dynamic = children["masking=dynamic"]
    assert dynamic.info.status == "FINISHED" and dynamic.info.run_id != settings["masking=dynamic"].info.run_id
    [train] = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{dynamic.info.run_id}' and tags.`melos.stage` = 'train'"))
    assert int(train.data.tags["melos.resumed_from_step"]) >= 20
