"""`melos stack`: the PostgreSQL-backed team stack, started for real by `melos stack up`
(one stack for this module), and what must hold on it: loopback only, a password on the
database, the champion gate under concurrent runs, and many deployment runs at once.

The first tests need no servers: the one-line errors, the process identity `down` relies on,
and the champion gate's race on a SQLite store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, free_port

from flows import stack
from mlm_core.config import EvalConfig, RuntimeConfig
from tasks import publish


def _melos(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ.copy())


# ---------------------------------------------------------------------------------------
# no servers


def test_missing_postgresql_binaries_is_one_line_naming_the_package(tmp_path):
    out = _melos("stack", "up", "--dir", str(tmp_path / "s"), env={**os.environ, "MELOS_PG_BINDIR": str(tmp_path / "nope")})
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("melos: ")
    assert "apt-get install postgresql" in out.stderr


def test_missing_drivers_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['asyncpg'] = None; from flows.cli import main; "
            f"sys.exit(main(['stack', 'up', '--dir', {str(tmp_path / 's')!r}]))")
    if not list(Path("/").glob("usr/lib/postgresql/*/bin/initdb")):
        pytest.skip("PostgreSQL is not installed: the binaries are checked first")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.count("\n") == 1
    assert "asyncpg" in out.stderr and "pip install 'melos[team]'" in out.stderr
    assert not (tmp_path / "s").exists()  # nothing half-made


def test_down_without_a_stack_says_so(tmp_path):
    out = _melos("stack", "down", "--dir", str(tmp_path))
    assert out.returncode != 0 and out.stderr.strip() == f"melos: no stack in {tmp_path} (no stack.json); nothing to stop"


def test_a_recycled_pid_is_never_signalled():
    """`down` signals a pid only while its kernel start time is the recorded one."""
    me = {"pid": os.getpid(), "start": stack._proc_start(os.getpid())}
    assert stack.alive(me)
    stranger = {**me, "start": me["start"] - 1}  # same pid, another process's start time
    assert not stack.alive(stranger)
    assert stack.stop(stranger, group=False) is False  # and we are still here to assert it


def _versions(client, name: str, scores: list[float], key: str) -> list[str]:
    client.create_registered_model(name)
    exp = client.create_experiment(f"gate-{name}") if client.get_experiment_by_name(f"gate-{name}") is None else \
        client.get_experiment_by_name(f"gate-{name}").experiment_id
    out = []
    for top1 in scores:
        run = client.create_run(exp)
        mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id,
                                         tags={publish.TAG_EVAL_KEY: key, publish.TAG_TOP1: repr(top1)})
        client.set_terminated(run.info.run_id)
        out.append(mv.version)
    return out


def race(client, name: str, prefect_api: str | None = None) -> dict:
    """Two runs gate at once: the worse one reads first and decides slowly (it would write
    last); the better one reads while the worse is deciding. Returns the champion's top1."""
    worse, better = _versions(client, name, [0.40, 0.60], key="k")
    real = publish.promotion_decision

    def decide(new_top1, champion):
        out = real(new_top1, champion)
        if new_top1 < 0.5:
            time.sleep(2.0)  # the worse run is still "comparing" when the better one reads
        return out

    errors: list[BaseException] = []

    def gate(version, top1):
        import contextlib

        from prefect.settings import PREFECT_API_URL, temporary_settings

        ctx = temporary_settings(updates={PREFECT_API_URL: prefect_api}) if prefect_api else contextlib.nullcontext()
        try:
            with ctx:
                publish.gate(client, name, version, "k", top1, {}, EvalConfig(), RuntimeConfig())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    publish.promotion_decision = decide
    try:
        a = threading.Thread(target=gate, args=(worse, 0.40))
        b = threading.Thread(target=gate, args=(better, 0.60))
        a.start()
        time.sleep(0.5)
        b.start()
        a.join(120)
        b.join(120)
    finally:
        publish.promotion_decision = real
    assert not errors, errors
    champion = client.get_model_version_by_alias(name, publish.CHAMPION)
    return {"version": champion.version, "top1": float(champion.tags[publish.TAG_TOP1]), "better": better}


def test_champion_gate_race_on_sqlite(tmp_path, monkeypatch):
    """The race is real (without the lock the worse run wins), and the lock fixes it."""
    import contextlib

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    with monkeypatch.context() as m:
        m.setattr(publish, "gate_lock", lambda name: contextlib.nullcontext())
        assert race(client, "unlocked")["top1"] == 0.40  # the worse one wrote last
    won = race(client, "locked")
    assert won["top1"] == 0.60 and won["version"] == won["better"]
    assert list(tmp_path.glob("mlflow.db.melos-registry-locked.lock"))


# ---------------------------------------------------------------------------------------
# the real stack


@pytest.fixture(scope="module")
def team_stack():
    """`melos stack up --workers 2` on free ports in a fresh directory; `down` at the end."""
    root = Path(tempfile.mkdtemp(prefix="melos-stack-"))
    os.chmod(root, 0o711)  # PostgreSQL may run as another account (under root): let it reach pgdata
    d = root / "stack"
    ports = {name: free_port() for name in ("postgres", "prefect", "mlflow")}
    began = time.monotonic()
    out = _melos("stack", "up", "--dir", str(d), "--workers", "2",
                 *[a for name, port in ports.items() for a in (f"--{name}-port", str(port))])
    took = time.monotonic() - began
    if out.returncode != 0:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((d / "logs").glob("*.log")))
        _melos("stack", "down", "--dir", str(d))
        pytest.fail(f"stack up failed: {out.stderr}{logs}")
    exports = dict(line[len("export "):].split("=", 1) for line in out.stdout.splitlines())
    state = json.loads((d / "stack.json").read_text())
    print(f"\nmelos stack up took {took:.1f} s (its own count: {state['up_seconds']} s)")
    try:
        yield {"dir": d, "state": state, "exports": exports, "ports": ports, "up_stdout": out.stdout,
               "up_stderr": out.stderr}
    finally:
        down = _melos("stack", "down", "--dir", str(d))
        assert down.returncode == 0, down.stderr
        for rec in state["processes"].values():
            assert not stack.alive(rec), f"{rec['cmd']} (pid {rec['pid']}) outlived `melos stack down`"
        for port in ports.values():
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after down"
        shutil.rmtree(root, ignore_errors=True)



@pytest.mark.servers
def test_up_prints_the_exports_and_is_idempotent(team_stack):
    p = team_stack["ports"]
    assert team_stack["exports"] == {"PREFECT_API_URL": f"http://127.0.0.1:{p['prefect']}/api",
                                     "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{p['mlflow']}"}
    assert "pretrain/melos-nightly" in team_stack["up_stderr"] and "compare-setting/melos-compare" in team_stack["up_stderr"]
    again = _melos("stack", "up", "--dir", str(team_stack["dir"]), timeout=120)
    assert again.returncode == 0 and "already running" in again.stderr
    assert again.stdout == team_stack["up_stdout"]  # the same two export lines
    after = json.loads((team_stack["dir"] / "stack.json").read_text())
    assert after["processes"] == team_stack["state"]["processes"]  # nothing restarted
    st = _melos("stack", "status", "--dir", str(team_stack["dir"]), "--json", timeout=120)
    assert st.returncode == 0, st.stdout + st.stderr
    assert set(json.loads(st.stdout)["status"].values()) == {"running"}
    # the deployments are on the Prefect server, on the pool the two workers serve
    api = team_stack["exports"]["PREFECT_API_URL"]
    dep = httpx.get(f"{api}/deployments/name/pretrain/melos-nightly", timeout=30).json()
    assert dep["work_pool_name"] == stack.POOL
    workers = httpx.post(f"{api}/work_pools/{stack.POOL}/workers/filter", json={}, timeout=30).json()
    assert sum(w["status"] == "ONLINE" for w in workers) == 2


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


@pytest.mark.servers
def test_listens_on_loopback_only(team_stack):
    for name, port in team_stack["ports"].items():
        assert _listening(port) == {"0100007F"}, f"{name} on port {port} listens on {_listening(port)}"
    # PostgreSQL has no Unix socket either
    conf = [a for a in team_stack["state"]["processes"]["postgres"]["cmd"]]
    assert conf[0].endswith("/postgres")
    assert not list(Path(team_stack["dir"]).rglob(".s.PGSQL.*"))


@pytest.mark.servers
def test_database_refuses_a_connection_without_the_password(team_stack, monkeypatch):
    import psycopg

    d, port = team_stack["dir"], team_stack["ports"]["postgres"]
    assert (d / "pgpass").stat().st_mode & 0o777 == 0o600
    monkeypatch.delenv("PGPASSFILE", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(d / "no-such-passfile"))  # not even ~/.pgpass
    kw = {"host": "127.0.0.1", "port": port, "user": stack.DB_USER, "dbname": "mlflow", "connect_timeout": 10}
    with pytest.raises(psycopg.OperationalError, match="no password supplied|password authentication failed"):
        psycopg.connect(**kw)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**kw, password="not-the-password")
    for user in ("postgres", "prefect"):  # no other role gets in without a password either
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(**{**kw, "user": user})
    monkeypatch.setenv("PGPASSFILE", str(d / "pgpass"))
    with psycopg.connect(**kw) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"runs", "metrics", "registered_models"} <= tables  # MLflow's store is in PostgreSQL


@pytest.mark.servers
def test_champion_gate_race_on_the_stack(team_stack, monkeypatch):
    """Through the tracking server: the gate's lock is a Prefect global concurrency limit."""
    from mlflow.tracking import MlflowClient

    uri = team_stack["exports"]["MLFLOW_TRACKING_URI"]
    api = team_stack["exports"]["PREFECT_API_URL"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    won = race(MlflowClient(uri), "race-on-stack", prefect_api=api)
    assert won["top1"] == 0.60 and won["version"] == won["better"]
    limit = httpx.get(f"{api}/v2/concurrency_limits/{publish.gate_lock_name('race-on-stack')}", timeout=30).json()
    assert limit["limit"] == 1 and limit["active_slots"] == 0  # held one at a time, and released


TINY_TRAIN = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 64,
              "max_steps": 6, "checkpoint_every": 3}
STAGES = ["download", "evaluate", "tokenize", "train", "vocab"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# 4 settings x 2 seeds, as the issue asks; the test runs the first MELOS_STACK_LOAD_RUNS (default 4:
# 2 settings x 2 seeds, since 8 take ~3 min on the shared 2-core test machine; set 8 for all)
GRID = [({"mask_rate": rate, "masking": masking}, seed)
        for rate in (0.15, 0.3) for masking in ("static", "dynamic") for seed in (0, 1)]


def submit(api: str, deployment: str, parameters: list[dict]) -> list[str]:
    dep = httpx.get(f"{api}/deployments/name/{deployment}", timeout=30).json()
    return [httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": p}, timeout=30).json()["id"]
            for p in parameters]


def wait_terminal(api: str, ids: list[str], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}, timeout=30).json()
        if len(runs) == len(ids) and all(r["state"]["type"] in TERMINAL for r in runs):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"not finished in {timeout:.0f}s: {sorted(r['state']['type'] for r in runs)}")
        time.sleep(2)


@pytest.mark.servers
def test_many_deployment_runs_at_once_all_finish_once_each_in_mlflow(team_stack, tmp_path):
    from mlflow.tracking import MlflowClient

    api, uri = team_stack["exports"]["PREFECT_API_URL"], team_stack["exports"]["MLFLOW_TRACKING_URI"]
    grid = GRID[: int(os.environ.get("MELOS_STACK_LOAD_RUNS", 4))]
    params = [{"workdir": str(tmp_path / "work"), "experiment": "load", "register_as": "load-model",
               "train": {**TINY_TRAIN, **setting, "seed": seed}, "evaluate": {"passes": 1, "pll_sentences": 2},
               "runtime": {"num_threads": 1}} for setting, seed in grid]
    began = time.monotonic()
    ids = submit(api, "pretrain/melos-nightly", params)
    runs = wait_terminal(api, ids, timeout=900)
    took = time.monotonic() - began
    print(f"\n{len(ids)} tiny pipeline runs on 2 workers in {took:.0f} s: {60 * len(ids) / took:.2f} runs/min")
    assert sorted(r["state"]["type"] for r in runs) == ["COMPLETED"] * len(ids), [r["state"] for r in runs]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("load")
    every = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in every if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == len(ids)  # exactly one parent per flow run: no duplicates, none missing
    assert sorted(p.data.tags["prefect.flow_run_id"] for p in parents) == sorted(ids)
    assert {p.info.status for p in parents} == {"FINISHED"}
    assert len(every) == len(ids) * (1 + len(STAGES))
    for parent in parents:
        children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(c.data.tags["melos.stage"] for c in children) == STAGES
        assert {c.info.status for c in children} == {"FINISHED"}
        [train] = [c for c in children if c.data.tags["melos.stage"] == "train"]
        steps = [m.step for m in client.get_metric_history(train.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, TINY_TRAIN["max_steps"] + 1)), steps  # complete, each once
    # all of them went through the champion gate at nearly the same time: the best one holds it
    champion = client.get_model_version_by_alias("load-model", publish.CHAMPION)
    best = max(p.data.metrics["eval/top1_accuracy"] for p in parents)
    assert float(champion.tags[publish.TAG_TOP1]) == best
    assert len(client.search_model_versions("name = 'load-model'")) == len(ids)


def _paused_run(api: str, tmp_path: Path, name: str, at: str = "checkpoint") -> tuple[str, Path]:
    """One tiny pretrain flow run on the pool, held by the test pause hook while writing its
    first checkpoint (``at="checkpoint"``: steps 1-3 done) or its second (``"checkpoint#2"``:
    step 6, the first checkpoint in place), until the returned marker file is deleted."""
    marker = tmp_path / f"{name}.paused"
    params = {"workdir": str(tmp_path / "work"), "experiment": name, "register_as": None,
              "train": TINY_TRAIN, "evaluate": {"passes": 1, "pll_sentences": 2},
              "runtime": {"num_threads": 1}}
    dep = httpx.get(f"{api}/deployments/name/pretrain/melos-nightly", timeout=30).json()
    env = {"MELOS_TEST_PAUSE_AT": at, "MELOS_TEST_PAUSE_MARKER": str(marker)}
    fr = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run",
                    json={"parameters": params, "job_variables": {"env": env}}, timeout=30).json()
    deadline = time.monotonic() + 300
    while not (marker.is_file() and marker.read_text().strip()):
        assert time.monotonic() < deadline, "the run never reached its first checkpoint"
        time.sleep(0.5)
    return fr["id"], marker


@pytest.mark.servers
def test_mlflow_killed_and_restarted_mid_training_loses_no_metric(team_stack, tmp_path):
    from mlflow.tracking import MlflowClient

    api, uri = team_stack["exports"]["PREFECT_API_URL"], team_stack["exports"]["MLFLOW_TRACKING_URI"]
    flow_run_id, marker = _paused_run(api, tmp_path, "mlflow-outage")
    state = json.loads((team_stack["dir"] / "stack.json").read_text())
    assert stack.stop(state["processes"]["mlflow"])  # the tracking server's whole process group
    assert _melos("stack", "status", "--dir", str(team_stack["dir"]), timeout=120).returncode == 3
    marker.unlink()  # training goes on with the server away: steps 4-6 are queued
    time.sleep(3)
    again = _melos("stack", "up", "--dir", str(team_stack["dir"]), timeout=400)  # restarts only MLflow
    assert again.returncode == 0, again.stderr
    after = json.loads((team_stack["dir"] / "stack.json").read_text())["processes"]
    assert after["mlflow"]["pid"] != state["processes"]["mlflow"]["pid"]
    assert after["postgres"] == state["processes"]["postgres"] and after["prefect"] == state["processes"]["prefect"]
    [run] = wait_terminal(api, [flow_run_id], timeout=400)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mlflow-outage")
    [train] = client.search_runs([exp.experiment_id], filter_string="tags.`melos.stage` = 'train'")
    steps = sorted(m.step for m in client.get_metric_history(train.info.run_id, "train/loss"))
    assert steps == list(range(1, TINY_TRAIN["max_steps"] + 1))
    assert train.info.status == "FINISHED"


@pytest.mark.servers
def test_a_worker_killed_mid_run_leaves_a_crashed_run_that_resume_completes(team_stack, tmp_path):
    """The machine of a worker lost mid-training: the worker and its flow run's process die
    together. Prefect marks the run CRASHED (the stack's heartbeat automation); the same
    parameters with resume=true, on the other worker, finish it from its checkpoint."""
    from mlflow.tracking import MlflowClient

    api, uri = team_stack["exports"]["PREFECT_API_URL"], team_stack["exports"]["MLFLOW_TRACKING_URI"]
    flow_run_id, marker = _paused_run(api, tmp_path, "worker-lost", at="checkpoint#2")
    run_pid = int(marker.read_text().split()[0])
    procs = json.loads((team_stack["dir"] / "stack.json").read_text())["processes"]
    workers = {name: rec for name, rec in procs.items() if name.startswith("worker-")}
    # the worker that runs it is the flow run process's parent
    parent = int(Path(f"/proc/{run_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    [(lost, rec)] = [(n, r) for n, r in workers.items() if r["pid"] in (parent, os.getpgid(run_pid))]
    os.kill(run_pid, signal.SIGKILL)
    stack.stop(rec, signal.SIGKILL)
    killed_at = time.monotonic()
    [run] = wait_terminal(api, [flow_run_id], timeout=stack.CRASH_AFTER_S + 150)
    print(f"\nmarked {run['state']['type']} {time.monotonic() - killed_at:.0f} s after the worker was killed")
    assert run["state"]["type"] == "CRASHED" and "heartbeat" in run["state"]["message"]

    params = {**run["parameters"], "resume": True}
    [again] = submit(api, "pretrain/melos-nightly", [params])
    [done] = wait_terminal(api, [again], timeout=400)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("worker-lost")
    trains = client.search_runs([exp.experiment_id], filter_string="tags.`melos.stage` = 'train'")
    resumed = [t for t in trains if t.info.status == "FINISHED"]
    assert len(resumed) == 1
    steps = sorted(m.step for m in client.get_metric_history(resumed[0].info.run_id, "train/loss"))
    assert steps == list(range(1, TINY_TRAIN["max_steps"] + 1))  # the whole curve, checkpoint + the rest
    # `up` brings the lost worker back
    assert _melos("stack", "up", "--dir", str(team_stack["dir"]), timeout=400).returncode == 0
    assert stack.alive(json.loads((team_stack["dir"] / "stack.json").read_text())["processes"][lost])


@pytest.mark.servers
def test_postgresql_restarted_mid_run_ends_finished_or_failed_and_resumable(team_stack, tmp_path):
    """PostgreSQL (under both servers) stopped while a run trains, started again by `melos
    stack up`: the run ends, COMPLETED or FAILED/CRASHED with a one-line reason, and if not
    completed, the same parameters with resume=true complete it."""
    api = team_stack["exports"]["PREFECT_API_URL"]
    flow_run_id, marker = _paused_run(api, tmp_path, "db-restart", at="checkpoint#2")
    procs = json.loads((team_stack["dir"] / "stack.json").read_text())["processes"]
    assert stack.stop(procs["postgres"], signal.SIGINT, group=False, grace=60)
    marker.unlink()  # training writes its last checkpoint and goes on to evaluation without a database
    time.sleep(5)
    again = _melos("stack", "up", "--dir", str(team_stack["dir"]), timeout=400)
    assert again.returncode == 0, again.stderr
    [run] = wait_terminal(api, [flow_run_id], timeout=600)
    print(f"\nrun across the database restart: {run['state']['type']}: {run['state'].get('message')}")
    if run["state"]["type"] != "COMPLETED":
        assert run["state"]["type"] in ("FAILED", "CRASHED")
        assert run["state"]["message"] and "\n" not in run["state"]["message"].strip()
        [resumed] = submit(api, "pretrain/melos-nightly", [{**run["parameters"], "resume": True}])
        [done] = wait_terminal(api, [resumed], timeout=400)
        assert done["state"]["type"] == "COMPLETED", done["state"]
