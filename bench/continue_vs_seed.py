"""Continued pre-training: the seed notebook's recipe against ``melos pretrain --init-from``.

The seed notebook continued ``cl-tohoku/bert-base-japanese-whole-word-masking`` on 走れメロス
with the Hugging Face ``Trainer``: batch 16, every sentence padded to 128, 15% masks made once
(80/10/10), learning rate 5e-5. No hub is reachable here, so the checkpoint is BERT-base
shaped (12 x 768, 12 heads, 3072, 512 positions, a 32,000-token vocabulary, MeCab + IPAdic
words, WordPiece) with random weights, saved as a Hugging Face directory. Both sides train on
the same training sentences of the embedded corpus, with the same threads, the same number
of optimizer steps and about the same useful (non-padding) tokens per step:

  seed:  transformers.Trainer on the pre-masked, padded sentences
  melos: ``melos pretrain --init-from DIR`` (dynamic masks, packed token-budget batches,
         sparse MLM head), ``--tokens-per-batch`` = the seed's mean useful tokens per step

Useful tokens per second is the training loop's (the seed's ``train_runtime``; Melos's
``train/mean_tokens_per_s``), so Melos's Prefect start-up, caching and evaluation stages
are not counted. Held-out loss: both trained models (and the untouched checkpoint) are scored
by one function on the same held-out sentences and fixed 15% masks (all [MASK]).

    .venv/bin/python bench/continue_vs_seed.py --steps 4 --threads 1

Prints ``name=value`` lines. Needs the test or bench extra (transformers) and ``ipadic``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_baseline import heldout_loss  # noqa: E402

from mlm_core.config import DownloadConfig, TokenizeConfig, VocabConfig  # noqa: E402
from mlm_core.data import EncodedCorpus, encode_key, encode_shards  # noqa: E402
from mlm_core.download import download_corpus  # noqa: E402
from mlm_core.io import read_json  # noqa: E402
from mlm_core.shards import iter_rows, read_word_counts, shard_paths, tokenize_corpus  # noqa: E402
from mlm_core.tokenizer import WordPieceTokenizer  # noqa: E402
from mlm_core.vocab import train_wordpiece_from_counts  # noqa: E402

SPLITTER = "mecab:ipadic"
VOCAB_SIZE = 32000


class Data:
    def __init__(self, tokenizer: WordPieceTokenizer, heldout: EncodedCorpus, train_texts: list[str]) -> None:
        self.tokenizer, self.heldout, self.train_texts = tokenizer, heldout, train_texts


def prepare(work: Path) -> tuple[Path, Data]:
    """The embedded corpus split into IPAdic words, a BERT-base-shaped random checkpoint with a
    32,000-token vocabulary from those words (padded with [unused] tokens), the held-out encoding."""
    from transformers import BertConfig, BertForMaskedLM, BertJapaneseTokenizer

    docs = download_corpus(DownloadConfig(), work / "download", work / "raw")
    cfg = TokenizeConfig(word_splitter=SPLITTER)
    shards = tokenize_corpus(work / "download" / "docs", [d["doc_id"] for d in docs["documents"]], work / "tokenize",
                             cfg, docs["fingerprint"])
    ck = work / "bert-base-ipadic"
    if not (ck / "model.safetensors").is_file():
        counts = read_word_counts(work / "tokenize", shards, "train")
        tokens = train_wordpiece_from_counts(counts, VocabConfig(vocab_size=VOCAB_SIZE, min_frequency=1))
        tokens += [f"[unused{i}]" for i in range(VOCAB_SIZE - len(tokens))]
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
        tok = BertJapaneseTokenizer(str(ck / "vocab.txt"), word_tokenizer_type="mecab",
                                    mecab_kwargs={"mecab_dic": "ipadic"}, do_lower_case=False)
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=VOCAB_SIZE)).save_pretrained(ck)  # 12 x 768, 512 positions
        tok.save_pretrained(ck)
    tokenizer = WordPieceTokenizer.from_file(ck / "vocab.txt", splitter=SPLITTER)
    paths = shard_paths(work / "tokenize", "heldout", shards)
    key = encode_key(shards["fingerprint"], "bench-bert-base-ipadic", "heldout", 128)
    heldout = EncodedCorpus(encode_shards(paths, tokenizer, work / "encoded-heldout", 128, key))
    texts = [t for b in iter_rows(shard_paths(work / "tokenize", "train", shards), ["text"]) for t in b.column(0).to_pylist()]
    return ck, Data(tokenizer, heldout, texts)


def seed_recipe(ck: Path, data: Data, steps: int, out: Path) -> dict:
    """The notebook: Trainer, batch 16, padded to 128, masks made once, lr 5e-5."""
    from transformers import (BertForMaskedLM, BertJapaneseTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments, default_data_collator)

    tok = BertJapaneseTokenizer.from_pretrained(ck)
    enc = tok(data.train_texts, padding="max_length", truncation=True, max_length=128)
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    torch.manual_seed(0)
    masked = collator([{"input_ids": i, "attention_mask": a} for i, a in zip(enc["input_ids"], enc["attention_mask"])])
    examples = [{k: masked[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(len(data.train_texts))]
    model = BertForMaskedLM.from_pretrained(ck)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=16, max_steps=steps, learning_rate=5e-5,
                             warmup_steps=max(1, math.ceil(0.06 * steps)), weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=default_data_collator)
    seen = {"useful": 0}

    def count(_module, _args, kwargs):  # the useful tokens of every batch the Trainer feeds
        seen["useful"] += int(kwargs["attention_mask"].sum())

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    result = trainer.train()
    hook.remove()
    model.eval()
    useful = seen["useful"]
    return {"model": model, "useful_tokens": useful, "seconds": result.metrics["train_runtime"],
            "sentences_per_step": 16, "padding_share": 1 - useful / (steps * 16 * 128)}


def melos_run(ck: Path, work: Path, steps: int, tokens_per_batch: int, threads: int) -> dict:
    cmd = [str(Path(sys.executable).with_name("melos")), "pretrain", "--init-from", str(ck),
           "--max-steps", str(steps), "--tokens-per-batch", str(tokens_per_batch), "--max-length", "128",
           "--threads", str(threads), "--lr", "5e-5", "--warmup-ratio", "0.06", "--checkpoint-every", "100000",
           "--eval-passes", "1", "--eval-pll-sentences", "0", "--workdir", str(work / "melos-work"),
           "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--experiment", "continue-vs-seed", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        sys.exit(f"melos pretrain failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    out = json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{"):]))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run_id = out["stages"]["train"]
    metrics = client.get_run(run_id).data.metrics
    # The training loop's own time, step by step (each step's tokens over its tokens/s), as the
    # Trainer's train_runtime is: train/seconds also holds writing the final checkpoint (weights
    # and optimizer state, 1.3 GB at BERT-base) and the model directory, which the seed recipe's
    # measured time does not.
    tokens = {m.step: m.value for m in client.get_metric_history(run_id, "train/tokens")}
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "train/tokens_per_s")}
    loop_s = sum(tokens[s] / rates[s] for s in tokens if rates.get(s))
    return {"result": out, "useful_tokens": metrics["train/tokens_seen"], "seconds": loop_s,
            "seconds_with_saves": metrics["train/seconds"], "wall_s": time.perf_counter() - started}


def score(model, data: Data) -> float:
    def forward(ids, mask):
        out = model(ids, attention_mask=mask)
        return out.logits if hasattr(out, "logits") else out[0]

    return heldout_loss(forward, data, len(data.heldout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps on each side (the seed did 180)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    ap.add_argument("--workdir", type=Path, default=Path("melos-bench/continue"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.workdir.resolve()
    ck, data = prepare(work)
    from mlm_core.checkpoint import load_pretrained
    from mlm_core.hf_import import load_hf_pretrained

    start, _ = load_hf_pretrained(ck)
    initial = score(start, data)
    del start
    seed = seed_recipe(ck, data, args.steps, work / "hf-trainer")
    seed_loss = score(seed.pop("model"), data)
    per_step = round(seed["useful_tokens"] / args.steps)
    melos = melos_run(ck, work, args.steps, per_step, args.threads)
    model, _ = load_pretrained(melos["result"]["model_dir"])
    melos_loss = score(model, data)
    seed_rate = seed["useful_tokens"] / seed["seconds"]
    melos_rate = melos["useful_tokens"] / melos["seconds"]
    lines = {
        "model": "bert-base-shaped (12x768, 32000 vocab, MeCab+IPAdic, random weights)",
        "threads": args.threads,
        "steps": args.steps,
        "train_sentences": len(data.train_texts),
        "heldout_sentences": len(data.heldout),
        "seed_useful_tokens": seed["useful_tokens"],
        "seed_padding_share": round(seed["padding_share"], 3),
        "seed_train_seconds": round(seed["seconds"], 1),
        "seed_useful_tokens_per_s": round(seed_rate, 1),
        "melos_tokens_per_batch": per_step,
        "melos_useful_tokens": int(melos["useful_tokens"]),
        "melos_train_seconds": round(melos["seconds"], 1),
        "melos_train_seconds_with_final_saves": round(melos["seconds_with_saves"], 1),
        "melos_useful_tokens_per_s": round(melos_rate, 1),
        "melos_command_wall_s": round(melos["wall_s"], 1),
        "speedup_vs_seed_recipe": round(melos_rate / seed_rate, 2),
        "heldout_loss_initial": round(initial, 4),
        "heldout_loss_seed": round(seed_loss, 4),
        "heldout_loss_melos": round(melos_loss, 4),
        "melos_eval_initial_top1": round(melos["result"]["initial_metrics"]["eval/initial_top1_accuracy"], 4),
        "melos_eval_top1": round(melos["result"]["metrics"]["eval/top1_accuracy"], 4),
    }
    for k, v in lines.items():
        print(f"{k}={v}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
