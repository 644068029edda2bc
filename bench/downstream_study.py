"""Issue 17's study: do the masking settings that win at masked-token accuracy also win downstream?

Runs what a user types,

    melos compare --grid-file bench/downstream_study.yaml --seeds 3 --max-steps 1500 \\
        --downstream aozora-authors --source aozora:author=35,879,148,81 --aozora-base-url MIRROR ...

five masking settings (15%, 30%, 40%, 30%->15%, whole-word at 15%), three seeds each, every run
pre-trained for the same 1,500 steps with the model of the 2.5-minute budget profile (2 layers x
128, 2,048 tokens a step, lr 2e-3, no dropout: about 2.5 minutes a run on the idle 2-core
machine), scored by the pipeline's fixed 15% evaluation masks and pseudo-perplexity, then
fine-tuned on the two built-in tasks (author attribution among the 4 authors, and the UniDic
part of speech of each word; both split by work) beside the random-init control.
Then it prints how to read the result: per setting the masked-LM and downstream scores with their
spreads, each setting's pre-training gain over the control, each setting against 15%, and the
rankings with Kendall's tau (the reading `melos compare` writes under its table). About an hour of idle CPU.

    .venv/bin/python bench/downstream_study.py --aozora ../shared/aozora
    .venv/bin/python bench/downstream_study.py --workdir melos-study --report RUN_ID   # read a finished one again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

AUTHORS = "35,879,148,81"  # 太宰治, 芥川竜之介, 夏目漱石, 宮沢賢治
TASKS = ("aozora-authors", "aozora-pos")
PROFILE_MODEL = ["--vocab-size", "8000", "--hidden-size", "128", "--layers", "2", "--heads", "2",
                 "--intermediate-size", "512", "--max-length", "128", "--dropout", "0", "--tokens-per-batch", "2048",
                 "--lr", "2e-3", "--warmup-ratio", "0.06"]
MLM = ("eval/top1_accuracy", "eval/pseudo_perplexity")
DOWNSTREAM = tuple(f"finetune/{t}/{m}" for t in TASKS for m in ("f1", "accuracy"))


def run_study(args: argparse.Namespace, env: dict) -> str:
    melos = Path(sys.executable).with_name("melos")
    cmd = [str(melos), "compare", "--grid-file", str(Path(__file__).with_name("downstream_study.yaml")),
           "--seeds", str(args.seeds), "--max-steps", str(args.steps), *(x for t in TASKS for x in ("--downstream", t)),
           "--source", f"aozora:author={AUTHORS}", "--aozora-base-url", str(args.aozora.resolve()),
           *PROFILE_MODEL, "--mask-rate", "0.15", "--threads", str(args.threads), "--workdir", str(args.workdir),
           "--tracking-uri", env["MLFLOW_TRACKING_URI"], "--experiment", "downstream-study", "--json"]
    print("# " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"melos compare failed with exit code {proc.returncode}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])["mlflow_run_id"]


def read(comparison: str) -> tuple[list[dict], list[dict]]:
    """The setting runs and the control rows (one per seed) of a finished comparison, from MLflow."""
    from flows.compare import CONTROL_LABEL, collect_results
    from tasks import tracking

    results = collect_results(comparison)
    per_seed: dict[int, dict] = {}
    for m in DOWNSTREAM:  # the control's scores are logged on the comparison run, one step per seed
        for point in tracking.client().get_metric_history(comparison, m):
            per_seed.setdefault(point.step, {})[m] = point.value
    return results, [{"label": CONTROL_LABEL, "seed": s, "metrics": v} for s, v in sorted(per_seed.items())]


def _verdict(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "no"


def paired(results: list[dict], controls: list[dict], a: str, b: str, metric: str) -> tuple[float, float, float] | None:
    """Mean and spread of the per-seed differences a - b (the same seed is the same fine-tuning
    split and order for every setting and the control), and the paired t-test's two-sided p."""
    def by_seed(label):
        rows = controls if label == "control" else [r for r in results if r["label"] == label]
        return {r["seed"]: r["metrics"].get(metric, math.nan) for r in rows}

    from mlm_core.grid import mean_spread

    x, y = by_seed(a), by_seed(b)
    diffs = [x[s] - y[s] for s in sorted(set(x) & set(y)) if not math.isnan(x[s] - y[s])]
    if len(diffs) < 2:
        return None
    mean, sd = mean_spread(diffs)
    try:
        from scipy.stats import ttest_1samp

        p = float(ttest_1samp(diffs, 0.0).pvalue)
    except ImportError:  # scipy is not a Melos dependency
        p = math.nan
    return mean, sd, p


def report(comparison: str) -> None:
    from flows.compare import reading
    from mlm_core.grid import beyond_noise, markdown_table, summarise

    results, controls = read(comparison)
    downstream = [m for m in DOWNSTREAM if any(m in r["metrics"] for r in results)]
    metrics = [*MLM, *downstream]
    rows = summarise(results, metrics)
    control = next(iter(summarise(controls, metrics)), None)  # none yet while the comparison runs
    print(f"# comparison run {comparison}: {len(results)} finished runs, control over "
          f"{control['runs'] if control else 0} seeds\n")
    print(markdown_table([*rows, *([control] if control else [])], metrics), "\n")
    if control:
        print("## Pre-training gain of each setting over the random-init control\n")
        print("| setting | " + " | ".join(f"gain {m} (beyond the noise?)" for m in downstream) + " |")
        print("|---|" + "---|" * len(downstream))
        for r in rows:
            print(f"| {r['setting']} | " + " | ".join(
                f"{r[m] - control[m]:+.4f} ({_verdict(beyond_noise(r, control, m))})" for m in downstream) + " |")
    print("\n## Paired by seed (seed k: the same fine-tuning split of works for every row)\n")
    print("| comparison | metric | mean difference ± spread | paired t-test p |\n|---|---|---|---|")
    labels = [r["setting"] for r in rows]
    pairs = [(label, "control") for label in labels] + [(label, labels[0]) for label in labels[1:]]
    for a, b in pairs:
        for m in downstream if b == "control" else metrics:
            got = paired(results, controls, a, b, m)
            if got:
                print(f"| {a} − {b} | `{m}` | {got[0]:+.4f} ± {got[1]:.4f} | {got[2]:.3f} |")
    print()
    print("\n".join(reading(rows, rows, list(MLM), downstream)))
    for r in [*rows, *([control] if control else [])]:
        for m in metrics:
            if not math.isnan(r.get(m, math.nan)):
                print(f"{r['setting'].replace(' ', '_')}:{m}={r[m]:.4f}+-{r[f'{m}:spread']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aozora", type=Path, default=Path("../shared/aozora"), help="the Aozora mirror directory")
    ap.add_argument("--workdir", type=Path, default=Path("melos-study"), help="stage outputs and mlflow.db")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500, help="pre-training steps per run (the same for every run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", metavar="RUN_ID", help="only read the comparison run RUN_ID of --workdir's store")
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           **os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{args.workdir}/mlflow.db"}
    os.environ.update(env)
    if args.report:
        report(args.report)
        return
    if not (args.aozora / "cards").is_dir():
        raise SystemExit(f"{args.aozora} has no cards/ directory: pass --aozora the mirror's directory")
    report(run_study(args, env))


if __name__ == "__main__":
    main()
