"""Cramming on a small machine: the best masked LM a wall-clock budget buys.

Prepares the four authors of the Aozora mirror with the project's own data stages (not
counted in the budget; reused from ``--workdir`` on later runs), trains with
``budget_minutes`` (warm-up and decay over the elapsed budget) using the budget-run defaults
below, and scores the model with the standard fixed evaluation (15% of held-out tokens, all
[MASK], seed 1234) on a fixed sample of held-out sentences. Prints ``name=value`` lines:

    .venv/bin/python bench/cram.py --aozora ../shared/aozora --minutes 10

The defaults were chosen by short measured runs; the evidence is in the README ("Cramming").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aozora_data import prepare  # noqa: E402

from mlm_core.checkpoint import load_pretrained  # noqa: E402
from mlm_core.config import EvalConfig, RuntimeConfig, TrainConfig  # noqa: E402
from mlm_core.evaluate import evaluate_heldout, unigram_counts  # noqa: E402
from mlm_core.train import TrainCallback, train_model  # noqa: E402

# Budget-run defaults for a 2-core CPU (see README, "Cramming", for the measurements).
CRAM = dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512, max_length=128, dropout=0.0,
            tokens_per_batch=2048, learning_rate=2e-3, warmup_ratio=0.06, mask_rate=0.25)
VOCAB_SIZE = 8000


class Progress(TrainCallback):
    def __init__(self) -> None:
        self.last = time.perf_counter()

    def on_log(self, step, metrics):
        if time.perf_counter() - self.last > 30:
            self.last = time.perf_counter()
            print(f"# step {step} loss {metrics['train/loss']:.3f} lr {metrics['train/lr']:.2e} "
                  f"{metrics['train/tokens_per_s']:.0f} tokens/s budget {metrics['train/budget_used']:.0%}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aozora", type=Path, default=Path("../shared/aozora"), help="the Aozora mirror directory")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes")
    ap.add_argument("--workdir", type=Path, default=Path("melos-bench"), help="data stage outputs (reused)")
    ap.add_argument("--eval-sentences", type=int, default=EvalConfig().max_sentences, help="held-out sample size")
    ap.add_argument("--eval-passes", type=int, default=EvalConfig().passes, help="fixed masks per sentence")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a budget-run default, e.g. --set hidden_size=256 (for tuning runs)")
    args = ap.parse_args()

    data = prepare(args.aozora.resolve(), args.workdir.resolve(), vocab_size=VOCAB_SIZE)
    print(f"# data stages {data.seconds:.0f} s (not in the budget): {len(data.train)} training sequences, "
          f"{data.train.num_tokens} tokens, vocabulary {len(data.tokenizer)}", flush=True)
    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        if field not in TrainConfig.model_fields:
            raise SystemExit(f"--set {item}: {field!r} is not a TrainConfig field")
        overrides[field] = type(CRAM.get(field, 0.0))(value) if field in CRAM else float(value)
    cfg = TrainConfig(**{**CRAM, **overrides}, budget_minutes=args.minutes, checkpoint_every=10**9, log_every=1)
    print(f"# settings {cfg.model_dump(exclude={'fill_mask_examples'})}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_model(data.train, data.tokenizer, cfg, RuntimeConfig(num_threads=args.threads),
                             Path(tmp) / "cram", data_fingerprint=data.data_fingerprint, callback=Progress())
        model, tok = load_pretrained(result.model_dir)
    started = time.perf_counter()
    ecfg = EvalConfig(max_sentences=args.eval_sentences, passes=args.eval_passes)
    metrics = evaluate_heldout(model, tok, data.heldout, unigram_counts(data.train, len(tok)), ecfg)
    print(f"# trained {result.steps} steps in {result.seconds:.0f} s; evaluation {time.perf_counter() - started:.0f} s "
          f"on {metrics['eval/sentences']} sentences x {ecfg.passes} passes ({metrics['eval/masked_tokens']} masked); "
          f"torch threads {torch.get_num_threads()}", flush=True)
    print(f"heldout_top1={metrics['eval/top1_accuracy']:.4f}")
    print(f"unigram_top1={metrics['eval/unigram_top1_accuracy']:.4f}")
    print(f"tokens_trained={result.tokens_seen}")
    print(f"heldout_top5={metrics['eval/top5_accuracy']:.4f}")
    print(f"heldout_loss={metrics['eval/loss']:.4f}")


if __name__ == "__main__":
    main()
