"""The first hour with `melos`, through the CLI as a user types it: a run found from another
directory, `--run latest`, `melos runs`, `melos ui` started and stopped for real, the tags
that make MLflow's UI show runs with their source, and the wheel that carries the corpus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import REPO, free_port

TINY = [
    "--max-steps", "5", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64",
    "--max-length", "64", "--eval-passes", "1", "--example", "メロスは[MASK]した。", "--experiment", "melos-first-hour",
]


def melos(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny `melos pretrain` in its own directory, with the default store (./mlflow.db)
    and its own record of remembered stores; a budget run, so what it left unset comes from a
    budget profile (its shape and mask rate are given, and win)."""
    root = tmp_path_factory.mktemp("first-hour")
    project, elsewhere = root / "project", root / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MELOS_CONFIG_DIR"] = str(root / "config")
    env["PREFECT_LOGGING_TO_API_ENABLED"] = "true"  # as a user's run: logs go to the Prefect server too
    out = melos(["pretrain", *TINY, "--budget-minutes", "0.05", "--mask-rate", "0.15", "--json"], project, env,
                timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # every queued log line reached the temporary server before it was stopped
    assert "Error logging to API" not in out.stderr, out.stderr[-2000:]
    result = json.loads(out.stdout[out.stdout.index("{\n"):out.stdout.rindex("}") + 1])
    return {"result": result, "project": project, "elsewhere": elsewhere, "env": env, "root": root}


def _store(trained) -> str:
    return f"sqlite:///{trained['project'] / 'mlflow.db'}"


def test_a_run_is_found_from_another_directory_without_creating_a_store(trained, monkeypatch):
    run_id, elsewhere = trained["result"]["mlflow_run_id"], trained["elsewhere"]
    expected = [t for t, _ in trained["result"]["fill_mask"][0]["predictions"][0]]
    for ref in (run_id, "latest"):
        out = melos(["fill-mask", "メロスは[MASK]した。", "--run", ref], elsewhere, trained["env"])
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        assert lines[0] == "[MASK] #1" and [line.split()[1] for line in lines[1:]] == expected
        assert "Downloading artifacts" not in out.stderr  # MLflow's progress bars stay out of the answer
        assert "Creating initial MLflow database tables" not in out.stdout + out.stderr
    assert not (elsewhere / "mlflow.db").exists()

    from flows.cli import resolve_model_dir

    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MELOS_CONFIG_DIR", trained["env"]["MELOS_CONFIG_DIR"])
    with pytest.raises(SystemExit) as missing:
        resolve_model_dir("0" * 32, elsewhere / "dst")
    [line] = str(missing.value).splitlines()  # one line that names every store searched
    assert f"sqlite:///{elsewhere / 'mlflow.db'} (no such file)" in line and _store(trained) in line
    assert not (elsewhere / "mlflow.db").exists()


def test_runs_lists_the_run_as_a_table_and_as_json(trained):
    result, elsewhere = trained["result"], trained["elsewhere"]
    table = melos(["runs"], elsewhere, trained["env"])
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.strip().splitlines()
    assert header.split()[:2] == ["RUN", "ID"] and "TOP-1 (UNIGRAM)" in header
    assert row.startswith(result["mlflow_run_id"])
    tokens = result["train"]["train/tokens_seen"]
    for cell in ("FINISHED", "embedded", "1L x 32", "dynamic 15%", f"{result['metrics']['eval/top1_accuracy']:.3f}",
                 f"0.05 min, cpu-2.5min, {tokens / 1e6:.1f}M tokens"):
        assert cell in row

    out = melos(["runs", "--json", "--experiment", "melos-first-hour", "--status", "finished"], elsewhere, trained["env"])
    assert out.returncode == 0, out.stderr
    [run] = json.loads(out.stdout)
    assert run["run_id"] == result["mlflow_run_id"] and run["store"] == _store(trained)
    assert run["top1"] == pytest.approx(result["metrics"]["eval/top1_accuracy"])
    assert run["unigram_top5"] == pytest.approx(result["metrics"]["eval/unigram_top5_accuracy"])
    assert (run["layers"], run["hidden_size"], run["masking"], run["corpus"]) == (1, 32, "dynamic", ["embedded"])
    assert (run["budget_minutes"], run["profile"], run["tokens_seen"]) == (0.05, "cpu-2.5min", tokens)
    assert run["wall_s"] > 0


def test_a_budget_run_takes_what_it_was_not_given_from_its_profile(trained):
    from mlflow.tracking import MlflowClient

    from mlm_core.profiles import PROFILES

    [profile] = [p for p in PROFILES if p.name == "cpu-2.5min"]
    client = MlflowClient(_store(trained))
    result = trained["result"]
    parent = client.get_run(result["mlflow_run_id"]).data
    assert parent.tags["melos.profile"] == "cpu-2.5min"
    assert "yours kept: hidden_size, num_layers, num_heads, intermediate_size, max_length, mask_rate" \
        in parent.tags["melos.profile_reason"]
    params = client.get_run(result["stages"]["train"]).data.params
    for field in ("dropout", "learning_rate", "tokens_per_batch", "warmup_ratio"):  # not given: the profile's
        assert float(params[f"train.{field}"]) == profile.train[field], field
    given = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 64,
             "mask_rate": 0.15, "max_steps": 5}
    for field, value in given.items():  # given: as given
        assert float(params[f"train.{field}"]) == value, field
    assert int(client.get_run(result["stages"]["vocab"]).data.params["vocab.vocab_size"]) == profile.vocab_size
    # what the budget bought, on the parent run that the MLflow UI's run list shows
    assert parent.metrics["train/tokens_seen"] == result["train"]["train/tokens_seen"] > 0
    assert 0 < parent.metrics["train/budget_used"] <= 1.0
    assert 0 < parent.metrics["train/step_seconds"] <= 0.05 * 60 * 1.5
    # --resume with another budget picks other settings: the one line says the profile chose them
    out = melos(["pretrain", *TINY, "--budget-minutes", "0.07", "--mask-rate", "0.15", "--resume"],
                trained["project"], trained["env"])
    assert out.returncode != 0 and "Traceback" not in out.stderr
    [line] = [ln for ln in out.stderr.splitlines() if ln.startswith("melos:")]
    assert "no earlier run with these settings" in line and "budget profile cpu-2.5min" in line, line


def test_experiment_and_runs_are_tagged_for_the_mlflow_ui(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(_store(trained))
    exp = client.get_experiment_by_name("melos-first-hour")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # runs table, not the GenAI overview
    result = trained["result"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    for run_id in (result["mlflow_run_id"], result["stages"]["train"]):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"].startswith("melos pretrain --max-steps 5")
        if head.returncode == 0:  # run from a git checkout
            assert tags["mlflow.source.git.commit"] == head.stdout.strip()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.servers
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process tree read from /proc")
def test_ui_serves_the_store_and_ctrl_c_stops_everything_it_started(trained):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=trained["elsewhere"],
        env=trained["env"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not line.startswith("MLflow UI:"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "melos ui exited before printing its URL"
        url = line.split()[2]
        exp_id = trained_experiment_id(trained)
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp_id}?workflowType=machine_learning"
        assert _store(trained) in line
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and "mlflow" in page.text.lower()
        found = httpx.get(
            f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/get",
            params={"run_id": trained["result"]["mlflow_run_id"]}, timeout=30,
        )
        assert found.status_code == 200, found.text  # the UI serves Melos's store, found from elsewhere
        started = _descendants(proc.pid)
        assert started
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT  # as a shell reports a job stopped by Ctrl-C
        assert not [pid for pid in started if _alive(pid)]  # no orphaned server or worker
    finally:
        if proc.poll() is None:
            proc.kill()


def trained_experiment_id(trained) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(_store(trained)).get_experiment_by_name("melos-first-hour").experiment_id


def test_runs_lookup_order_filters_and_latest(tmp_path, monkeypatch):
    """Newest first, children and failed runs kept out of `latest`, several stores merged."""
    from mlflow.tracking import MlflowClient

    from flows.runs import list_runs, resolve_run
    from tasks import stores

    monkeypatch.setenv("MELOS_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    uris = [f"sqlite:///{tmp_path / name}" for name in ("a.db", "b.db")]
    made = {}
    for i, (uri, status) in enumerate([(uris[0], "FINISHED"), (uris[1], "FINISHED"), (uris[0], "FAILED")]):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("e") or client.get_experiment(client.create_experiment("e"))
        run = client.create_run(exp.experiment_id, start_time=1_000_000 + i, run_name=f"r{i}",
                                tags={"prefect.flow_run_id": str(i)})
        client.create_run(exp.experiment_id, start_time=2_000_000 + i,
                          tags={"prefect.flow_run_id": str(i), "mlflow.parentRunId": run.info.run_id,
                                "melos.stage": "train"})
        client.set_terminated(run.info.run_id, status, end_time=1_000_500 + i)
        made[i] = run.info.run_id
        stores.remember(uri)

    rows, searched = list_runs()
    assert [r["run_id"] for r in rows] == [made[2], made[1], made[0]]  # parents only, newest first
    assert searched[0] == f"sqlite:///{tmp_path / 'mlflow.db'} (no such file)" and set(uris) <= set(searched)
    assert [r["run_id"] for r in list_runs(status="failed")[0]] == [made[2]]
    assert [r["run_id"] for r in list_runs(limit=1)[0]] == [made[2]]
    assert list_runs(experiment="nope")[0] == []
    assert resolve_run("latest")[1].info.run_id == made[1]  # the newest *finished* one
    assert resolve_run(made[0])[0] == uris[0]
    assert [r["run_id"] for r in list_runs(tracking_uri=uris[0])[0]] == [made[2], made[0]]  # a named store only
    with pytest.raises(ValueError, match="unknown status 'done'"):
        list_runs(status="done")
    assert not (tmp_path / "mlflow.db").exists()


def test_remembered_stores_are_absolute_and_written_atomically(tmp_path, monkeypatch):
    from tasks import stores

    monkeypatch.setenv("MELOS_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.chdir(tmp_path)
    stores.remember("sqlite:///mlflow.db")
    stores.remember("http://127.0.0.1:5000")
    stores.remember("sqlite:///mlflow.db")
    assert stores.remembered() == [f"sqlite:///{tmp_path / 'mlflow.db'}", "http://127.0.0.1:5000"]
    assert [p.name for p in (tmp_path / "cfg").iterdir()] == ["stores.json"]  # no temporary file left behind
    (tmp_path / "cfg" / "stores.json").write_text("{not json")
    assert stores.remembered() == []


def test_help_names_flags_and_shows_examples():
    import argparse

    from flows.cli import _OPTIONS, build_parser

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {None: parser.format_help(), **{name: p.format_help() for name, p in commands.choices.items()}}
    assert {"pretrain", "fill-mask", "runs", "ui"} <= set(helps)
    fields = {field for _, _, field, flag, _ in _OPTIONS if "_" in field}
    for command, text in helps.items():
        assert "example" in text, command
        text = " ".join(text.split())
        assert not [f for f in fields if f in text], command  # flags, never config field names
        helps[command] = text
    pretrain = helps["pretrain"]
    assert "--limit-alphabet" in pretrain
    assert "(ignored if --max-steps is set)" in pretrain and "none of this enters a fingerprint" not in pretrain
    assert pretrain.count("replaces the default rather than adding to it") == 2  # --source and --example
    assert "--device {auto,cpu,cuda} 'auto' picks CUDA when present (default: auto)" in helps["fill-mask"]


def test_the_wheel_carries_the_corpus_and_builds_without_warnings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((REPO / name).read_bytes())
    for pkg in ("mlm_core", "tasks", "flows"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    assert "BuildBackendWarning" not in log and "SetuptoolsDeprecationWarning" not in log, log
    assert "would be ignored" not in log, log
    [wheel] = (tmp_path / "dist").glob("melos-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "mlm_core/corpus/1567_ruby_4948.zip" in names
        assert {"flows/cli.py", "flows/runs.py", "tasks/stores.py"} <= names
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "melos = flows.cli:main" in zf.read(entry_points).decode()
        zf.extractall(tmp_path / "site")
    # installed from the wheel, the package finds its embedded corpus from any directory
    check = subprocess.run(
        [sys.executable, "-c", "import mlm_core.download as d; print(d.EMBEDDED_ZIP, d.EMBEDDED_ZIP.is_file())"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True,
        timeout=120,
    )
    assert check.stdout.split() == [str(tmp_path / "site" / "mlm_core" / "corpus" / "1567_ruby_4948.zip"), "True"]
