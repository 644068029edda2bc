"""Issue 18, fast on a busy machine: OpenMP's threads sleep when idle (PASSIVE wait policy,
set before torch loads OpenMP), and the default thread count is the usable CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, sys
import flows.cli  # the melos entry point's imports
loaded_first = "torch" in sys.modules
import torch
from mlm_core.train import configure_threads, usable_cpus
out = {"policy": os.environ.get("OMP_WAIT_POLICY"), "torch_loaded_first": loaded_first, "cpus": usable_cpus(),
       "default": configure_threads(None), "one": configure_threads(1)}
print(json.dumps(out))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_openmp_waits_passively_and_threads_default_to_the_usable_cpus() -> None:
    got = probe()
    # set by mlm_core before anything of melos's loads torch (OpenMP reads it only then)
    assert got["policy"] == "PASSIVE" and not got["torch_loaded_first"]
    assert got["default"] == got["cpus"] and 1 <= got["cpus"] <= len(os.sched_getaffinity(0))
    assert got["one"] == 1
    # what the user sets wins: the wait policy, and OMP_NUM_THREADS over the default count
    user = probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert user["policy"] == "ACTIVE" and user["default"] == 1
