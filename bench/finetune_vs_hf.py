"""Fine-tuning throughput: Hugging Face ``Trainer`` + ``DataCollatorWithPadding`` against Melos's
packed fine-tuning (``mlm_core.finetune``), the same model, data, epochs and batch, in one process.

Both start from the same weights (a Melos sequence-classification model exported with
``finetune_export`` and loaded by ``BertForSequenceClassification``) and read the same token ids
(Melos's tokenizer; HF gets them pre-tokenised). Useful tokens/s counts real tokens ([CLS] and
[SEP] included, padding not) over the wall time of ``Trainer.train()`` and of Melos's
``train_head``. Both then predict the test split, scored the same way (accuracy, macro F1).

The task: ``aozora-authors`` from a Melos work directory (``--corpus``, after a ``melos pretrain``
on several authors), or, without one, a keyword task on the embedded 走れメロス sentences
(label: does the sentence name メロス), which needs nothing but this checkout.

    .venv/bin/python bench/finetune_vs_hf.py --threads 2 --epochs 2
    .venv/bin/python bench/finetune_vs_hf.py --corpus melos-work --epochs 1 --json

Needs the ``bench`` extra (transformers). Prints a JSON record with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlm_core.finetune import (  # noqa: E402
    FinetuneConfig, FinetuneModel, encode_examples, predict_ids, score, train_head,
)
from mlm_core.finetune_data import Example, TaskData, builtin_task, find_corpus, seeded_split  # noqa: E402
from mlm_core.finetune_export import export_finetuned_hf  # noqa: E402
from mlm_core.model import BertForMaskedLM, ModelConfig  # noqa: E402
from mlm_core.tokenizer import WordPieceTokenizer  # noqa: E402


def embedded_task(tmp: Path) -> tuple[TaskData, WordPieceTokenizer]:
    from mlm_core.config import DownloadConfig, TokenizeConfig, VocabConfig
    from mlm_core.download import download_corpus
    from mlm_core.shards import iter_rows, shard_paths, tokenize_corpus
    from mlm_core.vocab import build_vocab

    docs = download_corpus(DownloadConfig(), tmp / "download", tmp / "raw")
    shards = tokenize_corpus(tmp / "download" / "docs", [d["doc_id"] for d in docs["documents"]], tmp / "tokenize",
                             TokenizeConfig(workers=1), docs["fingerprint"])
    build_vocab(tmp / "tokenize", shards, tmp / "vocab", VocabConfig())
    texts = [r["text"] for split in ("train", "heldout")
             for b in iter_rows(shard_paths(tmp / "tokenize", split, shards), ["text"]) for r in b.to_pylist()]
    exs = [Example(label="melos" if "メロス" in t else "other", text=t, where=f"#{i}") for i, t in enumerate(texts)]
    tr, dv, te, _, rec = seeded_split(exs, 0, dev_fraction=0.0, test_fraction=0.2)
    return TaskData("melos-keyword", "classification", tr, dv, te, None, rec), \
        WordPieceTokenizer.from_file(tmp / "vocab" / "vocab.txt")


def corpus_task(corpus: Path) -> tuple[TaskData, WordPieceTokenizer]:
    tokenize_dir, documents = find_corpus(corpus)
    vocab = sorted((tokenize_dir.parent.parent / "vocab").glob("*/vocab.txt"), key=lambda p: p.stat().st_mtime)
    if not vocab:
        raise SystemExit(f"no vocab stage output under {tokenize_dir.parent.parent}; run melos pretrain there first")
    return builtin_task("aozora-authors", tokenize_dir, documents, seed=0), WordPieceTokenizer.from_file(vocab[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, help="a Melos work directory for aozora-authors (default: embedded keyword task)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import (
        BertForSequenceClassification, BertJapaneseTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="melos-ftbench-") as tmp_name:
        tmp = Path(tmp_name)
        data, tokenizer = corpus_task(args.corpus) if args.corpus else embedded_task(tmp)
        labels = data.labels
        to_id = {l: i for i, l in enumerate(labels)}
        cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_layers=args.layers,
                          num_heads=max(1, args.hidden_size // 64), intermediate_size=4 * args.hidden_size,
                          max_position_embeddings=args.max_length)
        torch.manual_seed(0)
        start_model = FinetuneModel(BertForMaskedLM(cfg), len(labels), "classification")
        init = {k: v.clone() for k, v in start_model.state_dict().items()}
        hf_dir = export_finetuned_hf(start_model, tokenizer, labels, tmp / "hf")
        train_enc = encode_examples(data.train, tokenizer, "classification", to_id, args.max_length)
        test_enc = encode_examples(data.test, tokenizer, "classification", to_id, args.max_length)
        useful = int(train_enc.lengths.sum())

        # ---- Hugging Face Trainer + DataCollatorWithPadding
        hf_model = BertForSequenceClassification.from_pretrained(hf_dir)
        hf_tok = BertJapaneseTokenizer.from_pretrained(hf_dir)
        rows = [{"input_ids": ids.tolist(), "token_type_ids": t.tolist(), "attention_mask": [1] * len(ids),
                 "labels": int(lab[0])} for ids, t, lab in zip(train_enc.ids, train_enc.types, train_enc.labels)]
        test_rows = [{"input_ids": ids.tolist(), "token_type_ids": t.tolist(), "attention_mask": [1] * len(ids),
                      "labels": int(lab[0])} for ids, t, lab in zip(test_enc.ids, test_enc.types, test_enc.labels)]
        targs = TrainingArguments(
            output_dir=str(tmp / "hf-out"), per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64, num_train_epochs=args.epochs, learning_rate=args.learning_rate,
            weight_decay=0.01, warmup_steps=max(1, round(0.1 * math.ceil(len(rows) / args.batch_size) * args.epochs)),
            lr_scheduler_type="linear", max_grad_norm=1.0, seed=0,
            save_strategy="no", logging_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = Trainer(model=hf_model, args=targs, train_dataset=rows,
                          data_collator=DataCollatorWithPadding(hf_tok))
        t0 = time.perf_counter()
        out = trainer.train()
        hf_seconds = time.perf_counter() - t0
        hf_steps = out.global_step
        pred = trainer.predict(test_rows)
        hf_pred = [[int(p)] for p in np.argmax(pred.predictions, -1)]
        hf_scores = score("classification", data.test, hf_pred, labels)
        hf_tokens = useful * args.epochs

        # ---- Melos: packed rows, block-diagonal attention, [CLS] only through the head
        model = FinetuneModel(BertForMaskedLM(cfg), len(labels), "classification")
        model.load_state_dict(init)
        stats = train_head(model, train_enc, FinetuneConfig(epochs=args.epochs, learning_rate=args.learning_rate,
                                                            batch_size=args.batch_size), 0, torch.device("cpu"))
        melos_scores = score("classification", data.test, predict_ids(model, test_enc, torch.device("cpu")), labels)

    record = {
        "task": data.name, "train_examples": len(data.train), "test_examples": len(data.test), "labels": len(labels),
        "model": f"{args.layers}L x {args.hidden_size}", "epochs": args.epochs, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "useful_tokens_per_epoch": useful,
        "hf_trainer": {"seconds": round(hf_seconds, 2), "steps": hf_steps,
                       "useful_tokens_per_s": round(hf_tokens / hf_seconds, 1), "test": hf_scores},
        "melos": {"seconds": round(stats.seconds, 2), "steps": stats.steps, "padding_share": round(1 - stats.tokens / stats.slots, 4),
                  "useful_tokens_per_s": round(stats.tokens_per_s, 1), "test": melos_scores},
    }
    record["speedup_vs_hf_trainer"] = round(record["melos"]["useful_tokens_per_s"]
                                            / record["hf_trainer"]["useful_tokens_per_s"], 3)
    if args.json:
        print(json.dumps(record, ensure_ascii=False, indent=2))
    else:
        h, m = record["hf_trainer"], record["melos"]
        print(f"task {record['task']}: {record['train_examples']} train / {record['test_examples']} test, "
              f"{record['model']}, {args.epochs:g} epochs, batch {args.batch_size}, {record['threads']} threads")
        print(f"HF Trainer: {h['useful_tokens_per_s']:>10,.0f} useful tokens/s ({h['seconds']} s, {h['steps']} steps), "
              f"test accuracy {h['test']['accuracy']:.4f}, macro F1 {h['test']['macro_f1']:.4f}")
        print(f"Melos:      {m['useful_tokens_per_s']:>10,.0f} useful tokens/s ({m['seconds']} s, {m['steps']} steps, "
              f"padding {m['padding_share']:.1%}), test accuracy {m['test']['accuracy']:.4f}, "
              f"macro F1 {m['test']['macro_f1']:.4f}")
        print(f"speedup_vs_hf_trainer: {record['speedup_vs_hf_trainer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
