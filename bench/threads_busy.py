"""Training speed of the default thread setting against ``--threads 1`` and ``--threads 2``,
with and without a competing busy process (issue 18, "fast on a busy machine").

Each setting trains in a fresh process (OpenMP reads its environment when torch loads), on
the four authors of the Aozora mirror (``aozora_data``), with the pipeline's default model
shape, for ``--seconds`` of steps after ``--warmup-steps``; the figure is useful tokens/s.
Settings:

  default    Melos's default (no --threads): ``mlm_core.train.configure_threads``
  threads1   --threads 1
  threads2   --threads 2
  torch      what Melos did before: torch's own default threads, OpenMP's default wait policy

"busy" runs the same with ``--busy`` competing processes, each spinning on one core for as
long as the measurement lasts (they are stopped at the end, and bounded by a timeout in any
case). Prints ``name=value`` lines: tokens/s per setting and condition, and the default's
ratio to the best of threads1/threads2 (target <= 1.25), medians of ``--rounds`` interleaved
rounds. Run from the project root:

    .venv/bin/python bench/threads_busy.py --aozora ../shared/aozora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SETTINGS = ("default", "threads1", "threads2", "torch")


def child(settings: list[str], aozora: Path, workdir: Path, seconds: float, warmup: int, rounds: int) -> None:
    """The measurements of one condition, in this (fresh) process, settings interleaved
    round by round (the load of a shared machine drifts); prints one JSON line each."""
    import mlm_core  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)

    assert "torch" not in sys.modules, "torch was loaded before mlm_core could set OpenMP's wait policy"
    if settings == ["torch"]:
        del os.environ["OMP_WAIT_POLICY"]  # before torch loads: OpenMP's own default policy
    sys.path.insert(0, str(HERE))
    import tempfile

    import torch
    from aozora_data import prepare

    from mlm_core.config import RuntimeConfig, TrainConfig
    from mlm_core.train import TrainCallback, TrainingStopped, train_model

    data = prepare(aozora, workdir, vocab_size=16000)
    torch_default = torch.get_num_threads()

    class Clock(TrainCallback):
        def __init__(self) -> None:
            self.tokens, self.t0, self.steps, self.threads = 0, None, 0, None

        def on_log(self, step, metrics):
            self.steps, self.threads = step, torch.get_num_threads()
            if step == warmup:
                self.t0 = time.perf_counter()
            elif step > warmup:
                self.tokens += metrics["train/tokens"]

        def stop_requested(self) -> bool:
            return self.t0 is not None and time.perf_counter() - self.t0 >= seconds

    cfg = TrainConfig(max_steps=100_000, log_every=1, checkpoint_every=10**9)
    for r in range(rounds):
        for setting in settings:
            threads = {"threads1": 1, "threads2": 2, "torch": torch_default}.get(setting)
            clock = Clock()
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    train_model(data.train, data.tokenizer, cfg, RuntimeConfig(device="cpu", num_threads=threads),
                                Path(tmp) / "r", data_fingerprint=data.data_fingerprint, callback=clock)
                except TrainingStopped:
                    pass
            elapsed = time.perf_counter() - clock.t0
            print(json.dumps({"setting": setting, "round": r, "tokens_per_s": clock.tokens / elapsed,
                              "threads": clock.threads, "steps": clock.steps - warmup, "load_before": load,
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}), flush=True)


SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


def measure(settings: list[str], args, busy: int) -> list[dict]:
    budget = (args.seconds + 20) * len(settings) * args.rounds + 120
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(budget)]) for _ in range(busy)]
    try:
        if busy:
            time.sleep(1.0)  # let the spinners show up as load
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(settings), "--aozora", str(args.aozora),
             "--workdir", str(args.workdir), "--seconds", str(args.seconds), "--warmup-steps", str(args.warmup_steps),
             "--rounds", str(args.rounds)],
            env=env, capture_output=True, text=True, timeout=budget,
        )
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    if out.returncode != 0:
        raise SystemExit(f"{settings} failed:\n{out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aozora", type=Path, default=Path("../shared/aozora"), help="the Aozora mirror directory")
    ap.add_argument("--workdir", type=Path, default=Path("melos-bench"), help="data stage outputs (reused)")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured training time per setting")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--busy", type=int, default=1, help="competing spinning processes in the busy condition")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--conditions", default="quiet,busy", help="quiet: no competitor of ours; busy: --busy spinners")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the settings, interleaved; medians reported")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.aozora, args.workdir = args.aozora.resolve(), args.workdir.resolve()
    if args.child:
        child(args.child.split(","), args.aozora, args.workdir, args.seconds, args.warmup_steps, args.rounds)
        return

    sys.path.insert(0, str(HERE))
    from aozora_data import prepare

    prepare(args.aozora, args.workdir, vocab_size=16000)  # once, before any timing
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cpus={cpus}")
    print(f"load_average_start={os.getloadavg()[0]:.2f}")
    settings = args.settings.split(",")
    for condition in args.conditions.split(","):
        busy = args.busy if condition == "busy" else 0
        results = []
        ours = [s for s in settings if s != "torch"]
        if ours:
            results += measure(ours, args, busy)
        if "torch" in settings:  # its own process: OpenMP's wait policy is fixed when torch loads
            results += measure(["torch"], args, busy)
        rates = {}
        for setting in settings:
            runs = [r for r in results if r["setting"] == setting]
            for r in runs:
                print(f"# {condition} {setting} round {r['round']}: {r['tokens_per_s']:.0f} tokens/s, "
                      f"{r['threads']} threads, {r['steps']} steps, load average before {r['load_before']:.2f}")
            rates[setting] = float(np.median([r["tokens_per_s"] for r in runs]))
            print(f"{condition}_{setting}_tokens_per_s={rates[setting]:.0f}")
            print(f"{condition}_{setting}_threads={','.join(str(r['threads']) for r in runs)}", flush=True)
        best = max(rates.get("threads1", 0.0), rates.get("threads2", 0.0))
        if best and "default" in rates:
            print(f"{condition}_best_over_default={best / rates['default']:.2f}")
        if best and "torch" in rates:
            print(f"{condition}_best_over_torch_default={best / rates['torch']:.2f}")
    print(f"load_average_end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
