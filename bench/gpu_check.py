"""CUDA training check on one GPU: bf16 throughput and MFU of our trainer against Hugging Face
``BertForMaskedLM`` (padded and group_texts-packed, bf16 autocast), ``torch.compile``, and
whether bf16 autocast trains as well as fp32.

Needs only torch, numpy, tokenizers, pydantic and transformers (no Prefect, MLflow or
fugashi), so it runs on a bare GPU image. The data is an encoded corpus the pipeline made:

    DATA/train/    encoded/<key>/ of the training split (ids.bin, offsets.npy, meta.json, ...)
    DATA/heldout/  encoded/<key>/ of the held-out split
    DATA/vocab.txt the run's vocabulary

    python bench/gpu_check.py --data DATA [--budget-s 330]

Prints ``name=value`` lines as each part finishes (a part that would overrun ``--budget-s``
is skipped and says so). Throughput is useful (non-padding) tokens per second through
forward, backward and optimizer step, after ``--warmup-steps``. Ours runs twice per shape:
batches collated by one background thread, and by the default on CUDA, worker processes.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_baseline import grouped_examples, heldout_loss, hf_train, padded_examples, sentence_order  # noqa: E402

from mlm_core.checkpoint import load_pretrained  # noqa: E402
from mlm_core.config import RuntimeConfig, TrainConfig  # noqa: E402
from mlm_core.data import EncodedCorpus  # noqa: E402
from mlm_core.tokenizer import WordPieceTokenizer  # noqa: E402
from mlm_core.train import TrainCallback, train_model  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, max_length=128),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_length=128),
}
STARTED = time.perf_counter()


def say(name: str, value) -> None:
    print(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}", flush=True)


def left(budget_s: float) -> float:
    return budget_s - (time.perf_counter() - STARTED)


class Rates(TrainCallback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_log(self, step, metrics):
        self.steps.append(metrics)


def after_warmup(rows: list[tuple[float, float]], warmup: int) -> float:
    kept = rows[warmup:] or rows
    return sum(t for t, _ in kept) / sum(t / r for t, r in kept if r > 0)


def ours(data, shape: dict, tokens: int, steps: int, warmup: int, device: str, **runtime):
    """(useful tokens/s, mean MFU after warm-up, the trained model, useful tokens trained on)."""
    cfg = TrainConfig(**shape, tokens_per_batch=tokens, max_steps=steps, learning_rate=1e-3, warmup_ratio=0.06,
                      checkpoint_every=10**9, log_every=1)
    rec = Rates()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_model(data.train, data.tokenizer, cfg, RuntimeConfig(device=device, **runtime), Path(tmp) / "r",
                             data_fingerprint="gpu-check", callback=rec)
        model, _ = load_pretrained(result.model_dir)
    kept = rec.steps[warmup:] or rec.steps
    rate = after_warmup([(m["train/tokens"], m["train/tokens_per_s"]) for m in rec.steps], warmup)
    return rate, sum(m["train/mfu"] for m in kept) / len(kept), model, sum(m["train/tokens"] for m in rec.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=25, help="steps per throughput run, warm-up included")
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--quality-steps", type=int, default=150, help="steps of the bf16-vs-fp32 quality runs")
    ap.add_argument("--eval-sentences", type=int, default=2000)
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--only-quality", action="store_true", help="skip the throughput part")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script out (tiny --steps)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    say("gpu", torch.cuda.get_device_properties(0).name.replace(" ", "_") if cuda else "none")
    say("torch", torch.__version__)
    data = SimpleNamespace(tokenizer=WordPieceTokenizer.from_file(args.data / "vocab.txt"),
                           train=EncodedCorpus(args.data / "train"), heldout=EncodedCorpus(args.data / "heldout"))
    vocab_file = args.data / "vocab.txt"
    print(f"# {len(data.train)} training sentences, {data.train.num_tokens} tokens, vocabulary {len(data.tokenizer)}",
          flush=True)

    n = 8192 if cuda else 1024
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    say("bf16_matmul_tflops", 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    del a

    rows = args.tokens_per_step // 128
    order = sentence_order(data)
    mean_len = data.train.num_tokens / len(data.train) + 2
    for name, shape in SHAPES.items():
        if args.only_quality or left(args.budget_s) < 60:
            print(f"# skipped {name}: --only-quality or budget", flush=True)
            continue
        rate_t, mfu_t, _, _ = ours(data, shape, args.tokens_per_step, args.steps, args.warmup_steps, args.device,
                                loader_workers=0)
        say(f"{name}_ours_bf16_thread_loader_tokens_per_s", rate_t)
        say(f"{name}_ours_bf16_thread_loader_mfu", mfu_t)
        rate, mfu, _, _ = ours(data, shape, args.tokens_per_step, args.steps, args.warmup_steps, args.device)
        say(f"{name}_ours_bf16_tokens_per_s", rate)  # the default: collating worker processes on CUDA
        say(f"{name}_ours_bf16_mfu", mfu)
        hf_total = max(1, math.ceil(args.steps * args.tokens_per_step / (rows * mean_len)))
        for kind, batches in (("padded", padded_examples(data, order, rows)),
                              ("packed", grouped_examples(data, order, rows))):
            _, times, _ = hf_train(data, vocab_file, batches, args.warmup_steps, args.steps, None, hf_total,
                                   shape=shape, device=dev, amp_dtype=torch.bfloat16)
            hf_rate = after_warmup(times, args.warmup_steps)
            say(f"{name}_hf_{kind}_bf16_tokens_per_s", hf_rate)
            say(f"{name}_speedup_vs_hf_{kind}", rate / hf_rate)
        if name == "base" and left(args.budget_s) > 90:
            rate_c, mfu_c, _, _ = ours(data, shape, args.tokens_per_step, args.steps + 10, args.warmup_steps + 10,
                                    args.device, compile=True)
            say("base_ours_bf16_compile_tokens_per_s", rate_c)
            say("base_ours_bf16_compile_mfu", mfu_c)
        if cuda:
            torch.cuda.empty_cache()

    # bf16 autocast against fp32 (TF32 matmuls): the same steps, data and seed; both scored in fp32,
    # so only the training precision differs; and HF packed (bf16) trained on as many useful tokens
    tokens_seen = None
    for precision in ("bf16", "fp32"):
        if left(args.budget_s) < 45:
            print(f"# skipped quality {precision}: budget", flush=True)
            continue
        rate, _, model, tokens_seen = ours(data, SHAPES["small"], args.tokens_per_step, args.quality_steps, args.warmup_steps,
                              args.device, precision=precision)
        model.to(dev).float()
        loss = heldout_loss(lambda i, m: model(i, attention_mask=m)[0], data, args.eval_sentences, dev)
        say(f"quality_small_{precision}_tokens_per_s", rate)
        say(f"quality_small_{precision}_heldout_loss", loss)
    if tokens_seen and left(args.budget_s) > 60:
        packed_total = max(1, math.ceil(tokens_seen / (rows * 128)))
        hf_model, _, seen = hf_train(data, vocab_file, grouped_examples(data, order, rows), args.warmup_steps,
                                     packed_total, tokens_seen, packed_total, shape=SHAPES["small"], device=dev,
                                     amp_dtype=torch.bfloat16)
        hf_model.float()
        say("quality_small_hf_packed_bf16_heldout_loss",
            heldout_loss(lambda i, m: hf_model(input_ids=i, attention_mask=m).logits, data, args.eval_sentences, dev))
        say("quality_small_hf_packed_tokens", seen)
    say("seconds", time.perf_counter() - STARTED)
    if cuda:
        say("peak_gpu_mem_gb", torch.cuda.max_memory_allocated() / 2**30)


if __name__ == "__main__":
    main()
