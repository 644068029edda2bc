"""Cramming on a small machine: the best masked LM a wall-clock budget buys, through `melos pretrain`.

Runs exactly what a user types,

    melos pretrain --source aozora:author=35,879,148,81 --budget-minutes 10

with the Aozora mirror as the catalogue (``--aozora-base-url``), so every setting comes from the
budget profile (``mlm_core/profiles.py``) and this script has none of its own. The data stages
are not counted in the budget and are reused from ``--workdir`` on later runs; evaluation is the
pipeline's own (15% of held-out tokens, all [MASK], fixed seed, a fixed sample of held-out
sentences). Prints ``name=value`` lines:

    .venv/bin/python bench/cram.py --aozora ../shared/aozora --minutes 10

Anything after ``--`` goes to `melos pretrain` as is (e.g. ``-- --hidden-size 256`` to try a
setting against the profile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

AUTHORS = "35,879,148,81"  # 太宰治, 芥川竜之介, 夏目漱石, 宮沢賢治: the four authors of the mirror


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aozora", type=Path, default=Path("../shared/aozora"), help="the Aozora mirror directory")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes")
    ap.add_argument("--workdir", type=Path, default=Path("melos-bench"), help="stage outputs (data stages reused)")
    ap.add_argument("melos_args", nargs="*", help="after --: more `melos pretrain` options")
    args = ap.parse_args()
    if not (args.aozora / "cards").is_dir():
        raise SystemExit(f"{args.aozora} has no cards/ directory: pass --aozora the mirror's directory")
    workdir = args.workdir.resolve()
    melos = Path(sys.executable).with_name("melos")
    cmd = [str(melos), "pretrain", "--source", f"aozora:author={AUTHORS}", "--aozora-base-url",
           str(args.aozora.resolve()), "--budget-minutes", f"{args.minutes:g}", "--workdir", str(workdir),
           "--tracking-uri", f"sqlite:///{workdir}/mlflow.db", "--json", *args.melos_args]
    print("# " + " ".join(cmd), flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           **os.environ}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"melos pretrain failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    m, t = result["metrics"], result["train"]
    budget_s = args.minutes * 60
    print(f"# profile: {result['profile']['why'] if result.get('profile') else 'none'}")
    print(f"# whole command {time.perf_counter() - started:.0f} s; MLflow run {result['mlflow_run_id']}")
    print(f"# held-out sample: {m['eval/sentences']} sentences, {m['eval/masked_tokens']} masked tokens")
    print(f"heldout_top1={m['eval/top1_accuracy']:.4f}")
    print(f"unigram_top1={m['eval/unigram_top1_accuracy']:.4f}")
    print(f"tokens_trained={int(t['train/tokens_seen'])}")
    print(f"steps={int(t['train/steps'])}")
    print(f"step_seconds={t['train/step_seconds']:.1f}")
    print(f"steps_share_of_budget={t['train/step_seconds'] / budget_s:.3f}")
    print(f"heldout_top5={m['eval/top5_accuracy']:.4f}")
    print(f"heldout_loss={m['eval/loss']:.4f}")
    print(f"pseudo_perplexity={m['eval/pseudo_perplexity']:.2f}")


if __name__ == "__main__":
    main()
