"""The team stack under a short, bounded load, on loopback only.

1. `melos stack up --workers 2` in a fresh directory (timed: the first `up`, initdb included);
2. N tiny pretrain runs (4 settings x 2 seeds by default) submitted at once as flow runs of
   the pretrain/melos-nightly deployment; runs per minute = N / (submit -> last one finished);
3. meanwhile a probe sends MLflow requests to the tracking server (log a metric, read a run,
   search runs), one at a time with a short pause, and records each latency: p50 / p95 of
   the server's answers while the pool is busy;
4. `melos stack down`.

Bounded: at most --max-seconds for the runs, at most --max-requests probe requests; every
server listens on 127.0.0.1. Prints one JSON object. Run from the project root:

    .venv/bin/python bench/stack_load.py [--runs 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 64,
        "max_steps": 6, "checkpoint_every": 3}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def melos(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Probe(threading.Thread):
    """MLflow requests, one at a time, until stopped or ``max_requests`` were made."""

    def __init__(self, uri: str, max_requests: int, pause_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        from mlflow.tracking import MlflowClient

        self.client, self.max, self.pause = MlflowClient(uri), max_requests, pause_s
        self.latency: dict[str, list[float]] = {"log_metric": [], "get_run": [], "search_runs": []}
        self.errors = 0
        self.done = threading.Event()
        exp = self.client.create_experiment(f"probe-{int(time.time())}")
        self.exp, self.run_id = exp, self.client.create_run(exp).info.run_id

    def run(self) -> None:
        step, made = 0, 0
        calls = {
            "log_metric": lambda: self.client.log_metric(self.run_id, "probe", float(step), step=step),
            "get_run": lambda: self.client.get_run(self.run_id),
            "search_runs": lambda: self.client.search_runs([self.exp], max_results=10),
        }
        while not self.done.is_set() and made < self.max:
            for kind, call in calls.items():
                began = time.perf_counter()
                try:
                    call()
                    self.latency[kind].append(time.perf_counter() - began)
                except Exception:  # noqa: BLE001 - counted, the bench goes on
                    self.errors += 1
                made += 1
            step += 1
            time.sleep(self.pause)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=600)
    ap.add_argument("--max-requests", type=int, default=6000)
    ap.add_argument("--keep", action="store_true", help="leave the stack running (prints its directory)")
    ns = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="melos-stack-bench-"))
    os.chmod(base, 0o711)  # PostgreSQL may run as another account (under root)
    d = base / "stack"
    ports = ["--postgres-port", str(free_port()), "--prefect-port", str(free_port()), "--mlflow-port", str(free_port())]
    began = time.monotonic()
    out = melos("stack", "up", "--dir", str(d), "--workers", str(ns.workers), *ports)
    up_s = time.monotonic() - began
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return 1
    exports = dict(line[len("export "):].split("=", 1) for line in out.stdout.splitlines())
    api, uri = exports["PREFECT_API_URL"], exports["MLFLOW_TRACKING_URI"]
    result: dict = {"stack_up_s": round(up_s, 1), "runs": ns.runs, "workers": ns.workers, "dir": str(d)}
    try:
        dep = httpx.get(f"{api}/deployments/name/pretrain/melos-nightly", timeout=30).json()
        grid = [({"mask_rate": r, "masking": m}, s) for r in (0.15, 0.3) for m in ("static", "dynamic") for s in (0, 1)]
        probe = Probe(uri, ns.max_requests)
        # idle latency first (a few seconds), then under load
        probe.start()
        time.sleep(5)
        idle = {k: list(v) for k, v in probe.latency.items()}
        for v in probe.latency.values():
            v.clear()
        t0 = time.monotonic()
        ids = []
        for i in range(ns.runs):
            setting, seed = grid[i % len(grid)]
            params = {"workdir": str(base / "work"), "experiment": "bench-load", "register_as": "bench-load",
                      "train": {**TINY, **setting, "seed": seed + 2 * (i // len(grid))},
                      "evaluate": {"passes": 1, "pll_sentences": 2}, "runtime": {"num_threads": 1}}
            r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params}, timeout=30)
            ids.append(r.json()["id"])
        states: list[str] = []
        while time.monotonic() - t0 < ns.max_seconds:
            runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}, timeout=30).json()
            states = [r["state"]["type"] for r in runs]
            if len(states) == len(ids) and all(s in TERMINAL for s in states):
                break
            time.sleep(1)
        load_s = time.monotonic() - t0
        probe.done.set()
        probe.join(30)
        loaded = probe.latency

        def summary(lat: dict[str, list[float]]) -> dict:
            every = [x for v in lat.values() for x in v]
            if not every:
                return {}
            return {"requests": len(every), "p50_ms": round(1000 * statistics.median(every), 1),
                    "p95_ms": round(1000 * percentile(every, 0.95), 1),
                    **{f"{k}_p50_ms": round(1000 * statistics.median(v), 1) for k, v in lat.items() if v}}

        result.update({
            "states": {s: states.count(s) for s in sorted(set(states))},
            "load_s": round(load_s, 1),
            "runs_per_min": round(60 * states.count("COMPLETED") / load_s, 2),
            "mlflow_idle": summary(idle),
            "mlflow_under_load": summary(loaded),
            "probe_errors": probe.errors,
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
        })
    finally:
        if not ns.keep:
            melos("stack", "down", "--dir", str(d))
            shutil.rmtree(base, ignore_errors=True)
            result["dir"] = "(removed)"
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
