"""``melos stack up|down|status``: the team setup on one machine, with one command.

PostgreSQL (the machine's own binaries, Debian's ``postgresql`` package), a Prefect server
and an MLflow tracking server both backed by it (MLflow serving the artifacts itself, so
clients need no shared filesystem for them), the ``melos-process`` work pool with its
worker(s), and the deployments of ``prefect.yaml`` applied.

Everything lives under one directory (``--dir``, default ``./melos-stack``)::

    stack.json     ports and the processes started (pid + kernel start time), written atomically
    pgpass         the database password, in libpq's passfile format, mode 600
    pgdata/        the PostgreSQL cluster (initdb on first use)
    artifacts/     MLflow's artifact store (--artifacts-destination)
    prefect-home/  PREFECT_HOME of the servers and workers
    logs/          one log per server and worker, and the last `prefect deploy`

Security: every server listens on 127.0.0.1 unless ``--host`` says otherwise. PostgreSQL
has no Unix socket and its ``pg_hba.conf`` has only ``host ... scram-sha-256`` lines, so
every connection needs the password; nothing is ``trust`` or ``peer``. The password never
appears on a command line or in a URL: the servers find it through ``PGPASSFILE`` (libpq,
psycopg and asyncpg all read it).

Run as root (CI), PostgreSQL still runs unprivileged: ``initdb`` and ``postgres`` refuse
root, so they run as the ``postgres`` account Debian's package creates (or the account
named by ``MELOS_STACK_DB_ACCOUNT``), which owns ``pgdata/`` (mode 700) and nothing else;
the rest of the directory, the password file included, stays the caller's. Every directory
above ``pgdata/`` must therefore be searchable by that account.

``down`` stops exactly the processes recorded in ``stack.json``: a pid counts as ours only
while the kernel's start time of that pid is the one recorded, so a recycled pid is never
signalled. The data (database, artifacts) stays; ``up`` starts the same stack again.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlm_core.errors import UserError
from mlm_core.io import atomic_write_json, exclusive

POOL = "melos-process"
DB_USER = "melos"
DATABASES = ("prefect", "mlflow")
STANDARD_PORTS = {"postgres": 5432, "prefect": 4200, "mlflow": 5000}
START_TIMEOUT_S = float(os.environ.get("MELOS_STACK_START_TIMEOUT", "240"))
STOP_GRACE_S = 20.0
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
}
PROJECT = Path(__file__).resolve().parents[1]  # where prefect.yaml lives in a checkout


class StackError(UserError, RuntimeError):
    """A problem the user can fix; printed as one ``melos: ...`` line."""


# ---------------------------------------------------------------------------------------
# processes: identity (pid + kernel start time), start, stop


def _proc_start(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks after boot); None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(rec: dict | None) -> bool:
    """Whether the process recorded in ``rec`` ({"pid", "start"}) is still that same process."""
    return bool(rec) and _proc_start(rec["pid"]) == rec["start"]


def _executable(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.is_file() else name


@dataclass
class Account:
    """The unprivileged OS account PostgreSQL runs as when the caller is root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def db_account() -> Account | None:
    if os.geteuid() != 0:
        return None
    name = os.environ.get("MELOS_STACK_DB_ACCOUNT", "postgres")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise StackError(
            f"running as root, PostgreSQL must run as an unprivileged account, and there is no account {name!r}; "
            "install Debian's postgresql package (it creates 'postgres') or set MELOS_STACK_DB_ACCOUNT to one"
        ) from None
    return Account(name, entry.pw_uid, entry.pw_gid)


def _spawn(name: str, cmd: list[str], logs: Path, env: dict, cwd: Path, account: Account | None = None) -> dict:
    """Start ``cmd`` in its own session (so ``down`` can stop its whole process group),
    output appended to ``logs/NAME.log``; returns its record for stack.json."""
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} melos stack: {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True, **(account.popen_kwargs() if account else {}))
    start = None
    for _ in range(50):  # /proc/<pid>/stat exists as soon as fork returns; be patient anyway
        start = _proc_start(proc.pid)
        if start is not None or proc.poll() is not None:
            break
        time.sleep(0.02)
    return {"pid": proc.pid, "start": start, "log": str(log), "cmd": cmd[:3]}


def _signal(rec: dict, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(rec["pid"], sig)
        else:
            os.kill(rec["pid"], sig)


def stop(rec: dict, first: int = signal.SIGTERM, group: bool = True, grace: float = STOP_GRACE_S,
         again_after: float | None = None) -> bool:
    """Stop one recorded process (its process group when ``group``): ``first`` (sent a second
    time after ``again_after`` seconds if given), then SIGKILL after ``grace``. Returns False
    when it was not running (nothing signalled)."""
    if not alive(rec):
        return False
    _signal(rec, first, group)
    began = time.monotonic()
    deadline = began + grace
    while time.monotonic() < deadline:
        _reap(rec["pid"])
        if not alive(rec):
            break
        if again_after is not None and time.monotonic() - began > again_after:
            _signal(rec, first, group)
            again_after = None
        time.sleep(0.1)
    else:
        _signal(rec, signal.SIGKILL, group)
    if group:  # leftovers of the group (uvicorn workers) once the leader is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rec["pid"], signal.SIGKILL)
    _reap(rec["pid"])
    return True


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (when `up` and `down` run in one process, e.g. tests)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# ---------------------------------------------------------------------------------------
# the layout under DIR and the state file


@dataclass
class Layout:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "stack.json"

    @property
    def passfile(self) -> Path:
        return self.root / "pgpass"

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect-home"

    @property
    def lock(self) -> Path:
        return self.root / ".stack.lock"


def read_state(layout: Layout) -> dict:
    try:
        return json.loads(layout.state.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise StackError(f"{layout.state} is not valid JSON ({exc}); move it away and run `melos stack up` again") from None


def password(layout: Layout) -> str:
    line = layout.passfile.read_text().strip().splitlines()[0]
    return line.split(":", 4)[4]


def urls(state: dict) -> dict:
    host = state["host"]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    p = state["ports"]
    return {
        "postgres": f"postgresql://{DB_USER}@{shown}:{p['postgres']}",
        "prefect_ui": f"http://{shown}:{p['prefect']}",
        "prefect_api": f"http://{shown}:{p['prefect']}/api",
        "mlflow": f"http://{shown}:{p['mlflow']}",
    }


def database_url(state: dict, database: str, driver: str) -> str:
    """A SQLAlchemy URL without the password (the drivers read it from PGPASSFILE)."""
    return f"postgresql+{driver}://{DB_USER}@127.0.0.1:{state['ports']['postgres']}/{database}"


def client_env(state: dict) -> dict[str, str]:
    """What a teammate exports to use the stack."""
    u = urls(state)
    return {"PREFECT_API_URL": u["prefect_api"], "MLFLOW_TRACKING_URI": u["mlflow"]}


# ---------------------------------------------------------------------------------------
# prerequisites


def pg_bindir() -> Path:
    """The PostgreSQL server binaries: $MELOS_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin."""
    named = os.environ.get("MELOS_PG_BINDIR")
    candidates = [Path(named)] if named else sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0], reverse=True,
    )
    for path in candidates:
        if (path / "initdb").is_file() and (path / "postgres").is_file():
            return path
    where = named or "/usr/lib/postgresql/*/bin"
    raise StackError(f"no PostgreSQL server binaries (initdb, postgres) in {where}; install Debian's package: "
                     "apt-get install postgresql (or set MELOS_PG_BINDIR to their directory)")


def check_drivers() -> None:
    missing = []
    for module in ("psycopg", "asyncpg"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise StackError(f"the stack needs the PostgreSQL driver(s) {', '.join(missing)}: pip install 'melos[team]'")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # as the servers do: a port whose old connections linger in TIME_WAIT is free to them
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(name: str, asked: int | None, recorded: int | None, host: str) -> int:
    """--NAME-port if given (it must be free), else the port used last time, else the
    standard one when free, else any free port."""
    if asked:
        if not _port_free(host, asked):
            raise StackError(f"port {asked} on {host} (--{name}-port) is in use; choose another or leave the option out")
        return asked
    for port in (recorded, STANDARD_PORTS[name]):
        if port and _port_free(host, port):
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait(what: str, ready, rec: dict, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(rec):
            raise StackError(f"{what} exited during start; see {rec['log']}")
        if ready():
            return
        time.sleep(0.3)
    raise StackError(f"{what} did not become ready within {timeout:.0f}s; see {rec['log']}")


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=3.0).is_success
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------------------------
# PostgreSQL


def _as_account(account: Account | None, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **(account.popen_kwargs() if account else {}), **kw)


def init_cluster(layout: Layout, bindir: Path, account: Account | None) -> None:
    """initdb on first use: superuser ``melos`` with a generated password (SCRAM-SHA-256)."""
    if (layout.pgdata / "PG_VERSION").is_file():
        return
    layout.pgdata.mkdir(mode=0o700, exist_ok=True)
    if account:
        os.chown(layout.pgdata, account.uid, account.gid)
        probe = _as_account(account, ["test", "-w", str(layout.pgdata)])
        if probe.returncode != 0:
            raise StackError(
                f"the {account.name!r} account PostgreSQL runs as cannot reach {layout.pgdata}: every directory above "
                f"it must be searchable by that account (chmod o+x), or choose another --dir"
            )
    secret = secrets.token_urlsafe(24)  # no ':' or '\\', so the passfile line needs no escaping
    # initdb reads the password from a file; a private one only the database account can read
    with tempfile.TemporaryDirectory(dir=layout.root, prefix=".initdb-") as tmp:
        pwfile = Path(tmp) / "pw"
        pwfile.write_text(secret + "\n")
        os.chmod(pwfile, 0o600)
        if account:
            os.chown(tmp, account.uid, account.gid)
            os.chown(pwfile, account.uid, account.gid)
        done = _as_account(account, [str(bindir / "initdb"), "-D", str(layout.pgdata), "-U", DB_USER,
                                     "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"])
    (layout.logs / "initdb.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise StackError(f"initdb failed; see {layout.logs / 'initdb.log'}")
    fd = os.open(layout.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"*:*:*:{DB_USER}:{secret}\n")
    os.chmod(layout.passfile, 0o600)


def write_hba(layout: Layout, host: str, account: Account | None) -> None:
    """Password (SCRAM) for every TCP connection; no Unix socket, no trust, no peer."""
    lines = ["# written by `melos stack up`: every connection must give the password (SCRAM-SHA-256)",
             "host all all 127.0.0.1/32 scram-sha-256", "host all all ::1/128 scram-sha-256"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        lines += ["host all all 0.0.0.0/0 scram-sha-256", "host all all ::/0 scram-sha-256"]
    path = layout.pgdata / "pg_hba.conf"
    path.write_text("\n".join(lines) + "\n")
    if account:
        os.chown(path, account.uid, account.gid)
    os.chmod(path, 0o600)


def connect(state: dict, layout: Layout, dbname: str = "postgres", **kw):
    import psycopg

    return psycopg.connect(host="127.0.0.1", port=state["ports"]["postgres"], user=DB_USER, dbname=dbname,
                           password=password(layout), connect_timeout=5, **kw)


def _pg_ready(state: dict, layout: Layout) -> bool:
    import psycopg

    try:
        with connect(state, layout):
            return True
    except psycopg.OperationalError:
        return False


def create_databases(state: dict, layout: Layout) -> None:
    with connect(state, layout, autocommit=True) as conn:
        for name in DATABASES:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')


# ---------------------------------------------------------------------------------------
# up / down / status


def _base_env(layout: Layout) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(QUIET_ENV)
    env.update({"PREFECT_HOME": str(layout.prefect_home), "PGPASSFILE": str(layout.passfile)})
    return env


def _start_postgres(state, layout, bindir, account) -> dict:
    cmd = [str(bindir / "postgres"), "-D", str(layout.pgdata), "-h", state["host"], "-p", str(state["ports"]["postgres"]),
           "-c", "unix_socket_directories=", "-c", "logging_collector=off", "-c", "max_connections=200"]
    rec = _spawn("postgres", cmd, layout.logs, _base_env(layout), layout.root, account)
    _wait("PostgreSQL", lambda: _pg_ready(state, layout), rec)
    return rec


def _start_prefect(state, layout) -> dict:
    env = _base_env(layout)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url(state, "prefect", "asyncpg")
    cmd = [_executable("prefect"), "server", "start", "--host", state["host"], "--port", str(state["ports"]["prefect"])]
    rec = _spawn("prefect", cmd, layout.logs, env, layout.root)
    _wait("the Prefect server", lambda: _http_ok(urls(state)["prefect_api"] + "/health"), rec)
    return rec


def _start_mlflow(state, layout) -> dict:
    env = _base_env(layout)
    env["MLFLOW_BACKEND_STORE_URI"] = database_url(state, "mlflow", "psycopg")
    cmd = [_executable("mlflow"), "server", "--host", state["host"], "--port", str(state["ports"]["mlflow"]),
           "--workers", str(state["mlflow_workers"]), "--serve-artifacts",
           "--artifacts-destination", str(layout.artifacts)]
    rec = _spawn("mlflow", cmd, layout.logs, env, layout.root)
    _wait("the MLflow server", lambda: _http_ok(urls(state)["mlflow"] + "/health"), rec)
    return rec


def _ensure_pool(state) -> None:
    import httpx

    r = httpx.post(urls(state)["prefect_api"] + "/work_pools/", json={"name": POOL, "type": "process"}, timeout=30)
    if r.status_code not in (200, 201, 409):
        raise StackError(f"could not create the work pool {POOL}: HTTP {r.status_code} {r.text[:200]}")


HEARTBEAT_S = 30  # flow runs' heartbeat (Prefect's minimum; its default is 180 s)
CRASH_AFTER_S = 75  # no heartbeat for this long: the run's process is gone with its worker
AUTOMATION = "melos: mark flow runs whose heartbeat stopped as crashed"


def _ensure_crash_automation(state) -> None:
    """A flow run whose worker (machine) dies stops sending heartbeats but stays RUNNING for
    ever; this automation (Prefect's own recipe for such "zombie" runs) marks it CRASHED."""
    import httpx

    api = urls(state)["prefect_api"]
    existing = httpx.post(f"{api}/automations/filter", json={}, timeout=30).json()
    if any(a["name"] == AUTOMATION for a in existing):
        return
    body = {
        "name": AUTOMATION,
        "description": f"Created by `melos stack up`: no heartbeat from a running flow run for {CRASH_AFTER_S} s "
                       f"(they beat every {HEARTBEAT_S} s).",
        "enabled": True,
        "trigger": {"type": "event", "posture": "Proactive", "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
                    "after": ["prefect.flow-run.heartbeat"], "expect": ["prefect.flow-run.*"],
                    "for_each": ["prefect.resource.id"], "threshold": 1, "within": CRASH_AFTER_S},
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": f"no heartbeat for {CRASH_AFTER_S} s: the flow run's process or its worker died; "
                                "run it again with resume=true (melos pretrain --resume) to continue from its checkpoint"}],
    }
    r = httpx.post(f"{api}/automations/", json=body, timeout=30)
    if not r.is_success:
        raise StackError(f"could not create the Prefect automation {AUTOMATION!r}: HTTP {r.status_code} {r.text[:200]}")


def _start_worker(state, layout, index: int) -> dict:
    env = {**_base_env(layout), **client_env(state), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    cmd = [_executable("prefect"), "worker", "start", "--pool", POOL, "--type", "process",
           "--name", f"melos-stack-{index}-{socket.gethostname()}", "--limit", str(state["worker_limit"])]
    return _spawn(f"worker-{index}", cmd, layout.logs, env, PROJECT)


def _workers_online(state, names: list[str]) -> bool:
    import httpx

    try:
        r = httpx.post(f"{urls(state)['prefect_api']}/work_pools/{POOL}/workers/filter", json={}, timeout=5)
    except httpx.HTTPError:
        return False
    online = {w["name"] for w in r.json() if w.get("status") == "ONLINE"} if r.is_success else set()
    return set(names) <= online


def deploy(state, layout) -> list[str]:
    """``prefect deploy --all`` from the checkout's prefect.yaml; the names of the deployments."""
    if not (PROJECT / "prefect.yaml").is_file():
        return []
    env = {**_base_env(layout), **client_env(state)}
    out = subprocess.run([_executable("prefect"), "--no-prompt", "deploy", "--all"], cwd=PROJECT, env=env,
                         capture_output=True, text=True, timeout=START_TIMEOUT_S)
    (layout.logs / "deploy.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise StackError(f"`prefect deploy --all` failed; see {layout.logs / 'deploy.log'}")
    return sorted(set(re.findall(r"'([\w-]+/[\w-]+)'", out.stdout)))


def up(root: Path, host: str = "127.0.0.1", ports: dict | None = None, workers: int | None = None,
       mlflow_workers: int | None = None, worker_limit: int | None = None, log=print) -> dict:
    """Start whatever of the stack is not running; returns the state (as in stack.json).
    ``workers`` / ``mlflow_workers`` / ``worker_limit`` (flow runs at once per worker): None
    keeps the numbers recorded (else 1, 2 and 1: a training run uses the whole machine)."""
    layout = Layout(Path(root).resolve())
    bindir = pg_bindir()
    check_drivers()
    account = db_account()
    layout.root.mkdir(parents=True, exist_ok=True)
    for d in (layout.logs, layout.artifacts, layout.prefect_home):
        d.mkdir(exist_ok=True)
    with exclusive(layout.lock, remove=False):
        state = read_state(layout)
        procs = state.get("processes", {})
        workers = workers or state.get("workers") or 1
        mlflow_workers = mlflow_workers or state.get("mlflow_workers") or 2
        worker_limit = worker_limit or state.get("worker_limit") or 1
        wanted = ["postgres", "prefect", "mlflow"] + [f"worker-{i}" for i in range(1, workers + 1)]
        if state and all(alive(procs.get(name)) for name in wanted):
            state["already_running"] = True
            return state
        began = time.monotonic()
        ports = ports or {}
        running = {name for name in procs if alive(procs[name])}
        if not running:  # nothing of ours is up: free to (re)choose host and ports
            state["host"] = host
            recorded = state.get("ports", {})
            state["ports"] = {name: choose_port(name, ports.get(name), recorded.get(name), host) for name in STANDARD_PORTS}
        state.update({"dir": str(layout.root), "mlflow_workers": mlflow_workers, "workers": workers,
                      "worker_limit": worker_limit,
                      "processes": procs, "pool": POOL})

        def save():
            atomic_write_json(layout.state, state)

        if not alive(procs.get("postgres")):
            init_cluster(layout, bindir, account)
            write_hba(layout, state["host"], account)
            log(f"starting PostgreSQL on {state['host']}:{state['ports']['postgres']} ...")
            procs["postgres"] = _start_postgres(state, layout, bindir, account)
            save()
        create_databases(state, layout)
        fresh_prefect = not alive(procs.get("prefect"))
        if fresh_prefect:
            log(f"starting the Prefect server on {urls(state)['prefect_ui']} ...")
            procs["prefect"] = _start_prefect(state, layout)
            save()
        if not alive(procs.get("mlflow")):
            log(f"starting the MLflow server on {urls(state)['mlflow']} ...")
            procs["mlflow"] = _start_mlflow(state, layout)
            save()
        _ensure_pool(state)
        _ensure_crash_automation(state)
        names = []
        for i in range(1, workers + 1):
            names.append(f"melos-stack-{i}-{socket.gethostname()}")
            if not alive(procs.get(f"worker-{i}")):
                procs[f"worker-{i}"] = _start_worker(state, layout, i)
                save()
        for name in [n for n in procs if n.startswith("worker-") and n not in wanted]:
            stop(procs.pop(name))  # fewer workers asked for than are running
        if fresh_prefect or not state.get("deployments"):
            log("applying the deployments ...")
            state["deployments"] = deploy(state, layout)
        log(f"waiting for {workers} worker(s) ...")
        _wait("the worker(s)", lambda: _workers_online(state, names), procs["worker-1"])
        state["up_seconds"] = round(time.monotonic() - began, 1)
        state["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        save()
        state["already_running"] = False
        return state


def down(root: Path, log=print) -> list[str]:
    """Stop the processes recorded in stack.json, newest first; returns the names stopped."""
    layout = Layout(Path(root).resolve())
    if not layout.state.is_file():
        raise StackError(f"no stack in {layout.root} (no stack.json); nothing to stop")
    with exclusive(layout.lock, remove=False):
        state = read_state(layout)
        procs = state.get("processes", {})
        order = sorted((n for n in procs if n.startswith("worker-")), reverse=True) + ["mlflow", "prefect", "postgres"]
        stopped = []
        for name in order:
            rec = procs.get(name)
            if rec is None:
                continue
            # PostgreSQL: SIGINT is its "fast" shutdown (rolls back open transactions, checkpoints, exits);
            # its children are its own business, so signal the postmaster only. A Prefect worker
            # takes the first SIGTERM as "take no new runs" and stays up; the second ends it
            # (with the flow runs it started: they show as crashed and continue with --resume).
            how = {"postgres": {"first": signal.SIGINT, "group": False, "grace": 60.0}}.get(
                name, {"again_after": 2.0} if name.startswith("worker-") else {})
            if stop(rec, **how):
                stopped.append(name)
                log(f"stopped {name} (pid {rec['pid']})")
            procs.pop(name)
        atomic_write_json(layout.state, state)
        return stopped


def status(root: Path) -> tuple[dict, dict[str, str]]:
    """(state, {component: "running" | "not running" | "running, not answering"})."""
    layout = Layout(Path(root).resolve())
    state = read_state(layout)
    if not state:
        raise StackError(f"no stack in {layout.root} (no stack.json); start one with: melos stack up --dir {root}")
    procs = state.get("processes", {})
    health = {"prefect": urls(state)["prefect_api"] + "/health", "mlflow": urls(state)["mlflow"] + "/health"}
    out = {}
    for name in ["postgres", "prefect", "mlflow"] + sorted(n for n in procs if n.startswith("worker-")):
        if not alive(procs.get(name)):
            out[name] = "not running"
        elif name == "postgres":
            out[name] = "running" if _pg_ready(state, layout) else "running, not answering"
        elif name in health:
            out[name] = "running" if _http_ok(health[name]) else "running, not answering"
        else:
            out[name] = "running"
    return state, out


# ---------------------------------------------------------------------------------------
# the CLI


def add_parser(sub) -> None:
    s = sub.add_parser(
        "stack", help="start/stop a team stack: PostgreSQL, Prefect and MLflow servers, a work pool and worker",
        description="`up` starts PostgreSQL (initdb on first use), a Prefect server and an MLflow tracking server "
        "backed by it (MLflow serving artifacts), the melos-process work pool with --workers worker(s), and applies "
        "prefect.yaml's deployments; it prints the two lines a teammate exports. `down` stops what `up` started; "
        "`status` reports. Everything lives under --dir. Needs Debian's postgresql package and pip install 'melos[team]'.",
        epilog="examples:\n  melos stack up\n  eval \"$(melos stack up --dir /srv/melos)\"\n"
        "  melos stack up --workers 2 --prefect-port 4300\n  melos stack status\n  melos stack down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--dir", default="melos-stack", help="directory of the stack's data, logs and state (default: melos-stack)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address every server listens on (default: 127.0.0.1; the database always requires the password)")
    for name in STANDARD_PORTS:
        s.add_argument(f"--{name}-port", type=int, metavar="N",
                       help=f"port of {name} (default: the one used last, else {STANDARD_PORTS[name]} if free, else any free port)")
    s.add_argument("--workers", type=int, metavar="N", help="process workers on the pool (default: as last time, else 1)")
    s.add_argument("--worker-limit", type=int, metavar="N",
                   help="flow runs each worker runs at once (default: as last time, else 1)")
    s.add_argument("--mlflow-workers", type=int, metavar="N",
                   help="MLflow server processes (default: as last time, else 2)")
    s.add_argument("--json", action="store_true", help="print the state as JSON")


def print_up(state: dict) -> None:
    u = urls(state)
    first = "already running" if state.get("already_running") else f"up in {state['up_seconds']} s"
    info = [
        f"melos stack: {first} ({state['dir']})",
        f"  postgresql   {u['postgres']}  (databases {', '.join(DATABASES)}; password in {state['dir']}/pgpass, mode 600)",
        f"  prefect      {u['prefect_ui']}",
        f"  mlflow       {u['mlflow']}  (artifacts in {state['dir']}/artifacts)",
        f"  work pool    {POOL}, {state['workers']} worker(s) x {state['worker_limit']} run(s) at once; "
        f"logs in {state['dir']}/logs",
    ]
    if state.get("deployments"):
        info.append(f"  deployments  {', '.join(state['deployments'])}")
    print("\n".join(info), file=sys.stderr)
    for key, value in client_env(state).items():
        print(f"export {key}={value}")


def main(ns) -> int:
    try:
        if ns.action == "up":
            ports = {name: getattr(ns, f"{name}_port") for name in STANDARD_PORTS}
            state = up(Path(ns.dir), ns.host, ports, ns.workers, ns.mlflow_workers, ns.worker_limit,
                       log=lambda m: print(m, file=sys.stderr))
            print(json.dumps(state, indent=2)) if ns.json else print_up(state)
            return 0
        if ns.action == "down":
            stopped = down(Path(ns.dir), log=lambda m: print(m, file=sys.stderr))
            print(f"melos stack: stopped {len(stopped)} process(es); the data stays in {Path(ns.dir).resolve()}")
            return 0
        state, report = status(Path(ns.dir))
        if ns.json:
            print(json.dumps({"state": state, "status": report}, indent=2))
        else:
            u = urls(state)
            where = {"postgres": u["postgres"], "prefect": u["prefect_ui"], "mlflow": u["mlflow"]}
            for name, what in report.items():
                pid = state["processes"].get(name, {}).get("pid", "-")
                print(f"{name:10} {what:24} pid {pid!s:8} {where.get(name, 'pool ' + POOL)}")
        return 0 if all(v == "running" for v in report.values()) else 3
    except StackError as exc:
        raise SystemExit(f"melos: {exc}") from None
