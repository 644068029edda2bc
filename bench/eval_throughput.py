"""Evaluation throughput against training throughput, on the same model and data (issue 18).

The four authors of the Aozora mirror through the data stages (``aozora_data``), a model of
the pipeline's default shape (or ``--hidden/--layers/...``) trained for ``--train-steps``
steps by ``mlm_core.train.train_model`` (its useful tokens/s after ``--warmup-steps`` is the
training figure), then ``evaluate_heldout`` on ``--sentences`` held-out sentences, twice:
packed as training reads them (today's path) and padded one sentence per row (the old
path). Useful evaluation tokens are the real tokens of every sentence ([CLS]/[SEP]
counted) times the passes times the masks (token and whole-word), as training counts
real tokens; the pseudo-perplexity is timed on its own (``--pll-sentences``).

Prints ``name=value`` lines, and checks that both layouts give the same metrics. Run from
the project root:

    .venv/bin/python bench/eval_throughput.py --aozora ../shared/aozora --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aozora_data import prepare  # noqa: E402

from mlm_core.checkpoint import load_pretrained  # noqa: E402
from mlm_core.config import EvalConfig, RuntimeConfig, TrainConfig  # noqa: E402
from mlm_core.data import eval_sample  # noqa: E402
from mlm_core.evaluate import class_unigram_counts, evaluate_heldout, unigram_counts  # noqa: E402
from mlm_core.pll import pll_cost  # noqa: E402
from mlm_core.train import TrainCallback, train_model  # noqa: E402


class StepTimes(TrainCallback):
    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []

    def on_log(self, step, metrics):
        self.steps.append((metrics["train/tokens"], metrics["train/tokens_per_s"]))


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aozora", type=Path, default=Path("../shared/aozora"), help="the Aozora mirror directory")
    ap.add_argument("--workdir", type=Path, default=Path("melos-bench"), help="data stage outputs (reused)")
    ap.add_argument("--vocab-size", type=int, default=16000)
    defaults = TrainConfig()
    ap.add_argument("--hidden", type=int, default=defaults.hidden_size)
    ap.add_argument("--layers", type=int, default=defaults.num_layers)
    ap.add_argument("--heads", type=int, default=defaults.num_heads)
    ap.add_argument("--intermediate", type=int, default=defaults.intermediate_size)
    ap.add_argument("--train-steps", type=int, default=30, help="training steps (the model evaluated)")
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the training figure")
    ap.add_argument("--sentences", type=int, default=2000, help="held-out sentences evaluated (both layouts)")
    ap.add_argument("--passes", type=int, default=EvalConfig().passes)
    ap.add_argument("--pll-sentences", type=int, default=EvalConfig().pll_sentences)
    ap.add_argument("--skip-padded", action="store_true", help="time the packed layout only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = prepare(args.aozora.resolve(), args.workdir.resolve(), vocab_size=args.vocab_size)
    tok = data.tokenizer
    print(f"# {len(data.train)} training / {len(data.heldout)} held-out sentences, vocabulary {len(tok)}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)

    cfg = TrainConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      intermediate_size=args.intermediate, max_steps=args.train_steps, checkpoint_every=10**9,
                      log_every=1)
    rec = StepTimes()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_model(data.train, tok, cfg, RuntimeConfig(device="cpu", num_threads=args.threads),
                             Path(tmp) / "r", data_fingerprint=data.data_fingerprint, callback=rec)
        model, _ = load_pretrained(result.model_dir)
    kept = rec.steps[args.warmup_steps:] or rec.steps
    train_rate = sum(t for t, _ in kept) / sum(t / r for t, r in kept if r > 0)
    print(f"# trained {result.steps} steps: {train_rate:.0f} useful tokens/s", flush=True)

    counts = unigram_counts(data.train, len(tok))
    by_class = class_unigram_counts(data.train, len(tok))
    ecfg = EvalConfig(passes=args.passes, max_sentences=args.sentences, pll_sentences=0)
    chosen = eval_sample(len(data.heldout), ecfg.max_sentences, ecfg.seed)
    chosen = np.arange(len(data.heldout)) if chosen is None else chosen
    masks = 2 if data.heldout.starts is not None else 1
    useful = int((data.heldout.lengths[chosen] + 2).sum()) * ecfg.passes * masks

    def run(layout: str) -> dict:
        return evaluate_heldout(model, tok, data.heldout, counts, ecfg, train_class_counts=by_class, layout=layout)

    packed, packed_s = timed(lambda: run("packed"))
    packed_rate = useful / packed_s
    print(f"# packed: {packed_s:.1f} s", flush=True)
    print(f"train_tokens_per_s={train_rate:.0f}")
    print(f"eval_tokens_per_s={packed_rate:.0f}")
    print(f"eval_vs_train={packed_rate / train_rate:.2f}")
    print(f"eval_seconds={packed_s:.1f}")
    print(f"eval_useful_tokens={useful}")
    print(f"eval_masked_tokens={packed['eval/masked_tokens'] + packed.get('eval/wwm_masked_tokens', 0)}")
    if not args.skip_padded:
        padded, padded_s = timed(lambda: run("padded"))
        print(f"eval_padded_tokens_per_s={useful / padded_s:.0f}")
        print(f"eval_padded_seconds={padded_s:.1f}")
        print(f"packed_vs_padded={padded_s / packed_s:.2f}")
        differ = {k: abs(packed[k] - padded[k]) for k in padded if packed[k] != padded[k]}
        print(f"metrics_compared={len(padded)}")
        print(f"metrics_differing={len(differ)}")
        print(f"max_abs_difference={max(differ.values(), default=0.0):.3g}")
        for key, d in sorted(differ.items(), key=lambda kv: -kv[1])[:5]:
            print(f"# {key}: packed {packed[key]!r} padded {padded[key]!r}")
    if args.pll_sentences:
        pcfg = EvalConfig(passes=1, max_sentences=1, pll_sentences=args.pll_sentences)
        pll_chosen = eval_sample(len(data.heldout), pcfg.pll_sentences, pcfg.seed + 1)
        pll_chosen = np.arange(len(data.heldout)) if pll_chosen is None else pll_chosen
        from mlm_core.pll import pseudo_log_likelihood

        _, pll_s = timed(lambda: pseudo_log_likelihood(model, tok, data.heldout, pll_chosen))
        print(f"pll_seconds={pll_s:.1f}")
        print(f"pll_query_tokens_per_s={pll_cost(data.heldout.lengths[pll_chosen]) / pll_s:.0f}")
    print(f"load_average_end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
