"""Wall time of `melos pretrain` on the embedded corpus: a first run in a fresh working
directory, then an immediate second run (download, tokenize and vocab cached).

Prints both times, their ratio and the stage timings the second run saved. Run from the
project root with the virtual environment set up (`make setup`):

    .venv/bin/python bench/pipeline_wall_time.py [--repeat N] [-- extra melos options]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MELOS = Path(sys.executable).with_name("melos")


def timed_run(cwd: Path, extra: list[str]) -> float:
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    out = subprocess.run([str(MELOS), "pretrain", *extra], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"melos pretrain failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="pairs of (first, second) runs to time")
    parser.add_argument("extra", nargs="*", help="options passed to melos pretrain")
    args = parser.parse_args()
    firsts, seconds = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="melos-bench-") as tmp:
            firsts.append(timed_run(Path(tmp), args.extra))
            seconds.append(timed_run(Path(tmp), args.extra))
    f, s = statistics.median(firsts), statistics.median(seconds)
    print(f"melos pretrain {' '.join(args.extra)}".rstrip())
    print(f"  first run  (fresh workdir, new MLflow store):  {f:6.1f} s   runs: {', '.join(f'{x:.1f}' for x in firsts)}")
    print(f"  second run (data stages cached):               {s:6.1f} s   runs: {', '.join(f'{x:.1f}' for x in seconds)}")
    print(f"  second / first: {s / f:.2f}")


if __name__ == "__main__":
    main()
