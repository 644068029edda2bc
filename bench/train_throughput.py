"""Training throughput and quality: our trainer against Hugging Face ``BertForMaskedLM``.

One model (4 layers, hidden 256, 4 heads, intermediate 1024, a 16k vocabulary, length 128),
the same tokenized sentences of the four authors of the Aozora mirror, three ways:

  (a) ours: ``mlm_core.train.train_model`` with its defaults (packed token-budget batches,
      sparse MLM head), ``--tokens-per-step`` tokens per step;
  (b) HF padded: every sentence padded to 128 (the seed notebook's way), masks and labels
      from ``DataCollatorForLanguageModeling``, ``--tokens-per-step / 128`` sentences a step;
  (c) HF packed: run_mlm's ``group_texts`` (all sentences, each [CLS] ... [SEP], concatenated
      and cut into 128-token blocks), the same collator, ``--tokens-per-step / 128`` blocks.

Useful (non-padding) tokens per second through forward, backward and optimizer step are
measured after ``--warmup-steps``; (a) and (c) then train on to ``--train-tokens`` useful
tokens and are scored on the same fixed held-out masks (15%, all [MASK]). Prints
``name=value`` lines. Needs the ``bench`` extra (transformers). Run from the project root:

    .venv/bin/python bench/train_throughput.py --aozora ../shared/aozora
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aozora_data import prepare  # noqa: E402
from hf_baseline import grouped_examples, heldout_loss, hf_train, padded_examples, sentence_order  # noqa: E402

from hf_baseline import LR, SHAPE, WARMUP  # noqa: E402

from mlm_core.config import RuntimeConfig, TrainConfig  # noqa: E402
from mlm_core.checkpoint import load_pretrained  # noqa: E402
from mlm_core.train import TrainCallback, train_model  # noqa: E402


class StepTimes(TrainCallback):
    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []  # (useful tokens, tokens/s) per step

    def on_log(self, step, metrics):
        self.steps.append((metrics["train/tokens"], metrics["train/tokens_per_s"]))


def rate_after_warmup(steps: list[tuple[float, float]], warmup: int) -> float:
    kept = steps[warmup:] or steps
    return sum(t for t, _ in kept) / sum(t / r for t, r in kept if r > 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aozora", type=Path, default=Path("../shared/aozora"), help="the Aozora mirror directory")
    ap.add_argument("--workdir", type=Path, default=Path("melos-bench"), help="data stage outputs (reused)")
    ap.add_argument("--tokens-per-step", type=int, default=4096, help="slots per step for every trainer")
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the throughput figures")
    ap.add_argument("--padded-steps", type=int, default=15, help="steps of the HF padded run (throughput only)")
    ap.add_argument("--train-tokens", type=int, default=400_000, help="useful tokens before the held-out loss")
    ap.add_argument("--eval-sentences", type=int, default=2000, help="held-out sentences scored")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = prepare(args.aozora.resolve(), args.workdir.resolve(), vocab_size=16000)
    vocab_file = Path(data.tokenizer_path)
    print(f"# {len(data.train)} training sentences, {data.train.num_tokens} tokens, vocabulary {len(data.tokenizer)}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    rows = args.tokens_per_step // 128
    mean_len = data.train.num_tokens / len(data.train) + 2

    # (a) ours, to train_tokens useful tokens
    steps = max(args.warmup_steps + 2, math.ceil(args.train_tokens / args.tokens_per_step))
    cfg = TrainConfig(**SHAPE, tokens_per_batch=args.tokens_per_step, max_steps=steps, learning_rate=LR,
                      warmup_ratio=WARMUP, checkpoint_every=10**9, log_every=1)
    rec = StepTimes()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_model(data.train, data.tokenizer, cfg, RuntimeConfig(num_threads=args.threads), Path(tmp) / "r",
                             data_fingerprint=data.data_fingerprint, callback=rec)
        ours_rate = rate_after_warmup(rec.steps, args.warmup_steps)
        ours_model, _ = load_pretrained(result.model_dir)
        loss_ours = heldout_loss(lambda i, m: ours_model(i, attention_mask=m)[0], data, args.eval_sentences)
    print(f"# ours done: {ours_rate:.1f} useful tokens/s", flush=True)

    # (b) HF padded: throughput only
    order = sentence_order(data)
    hf_total = max(1, math.ceil(args.train_tokens / (rows * mean_len)))
    _, times, _ = hf_train(data, vocab_file, padded_examples(data, order, rows), args.warmup_steps,
                           args.padded_steps, None, hf_total)
    padded_rate = rate_after_warmup(times, args.warmup_steps)
    print(f"# hf padded done: {padded_rate:.1f} useful tokens/s", flush=True)

    # (c) HF packed (group_texts), to the same useful tokens as ours
    packed_total = max(1, math.ceil(result.tokens_seen / (rows * 128)))
    hf_model, times, seen = hf_train(data, vocab_file, grouped_examples(data, order, rows), args.warmup_steps,
                                     packed_total, result.tokens_seen, packed_total)
    packed_rate = rate_after_warmup(times, args.warmup_steps)
    loss_hf = heldout_loss(lambda i, m: hf_model(input_ids=i, attention_mask=m).logits, data, args.eval_sentences)
    print(f"speedup_vs_hf_padded={ours_rate / padded_rate:.2f}")
    print(f"speedup_vs_hf_packed={ours_rate / packed_rate:.2f}")
    print(f"ours_tokens_per_s={ours_rate:.1f}")
    print(f"hf_padded_tokens_per_s={padded_rate:.1f}")
    print(f"hf_packed_tokens_per_s={packed_rate:.1f}")
    print(f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    print(f"heldout_loss_ours={loss_ours:.4f}")
    print(f"heldout_loss_hf_packed={loss_hf:.4f}")
    print(f"# trained tokens: ours {result.tokens_seen}, hf packed {seen}; held-out sentences {args.eval_sentences}")


if __name__ == "__main__":
    main()
