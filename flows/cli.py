"""The ``melos`` command: run the pipeline by hand, or ask a trained model to fill a blank.

Options map one-to-one onto the flow's typed configs; their help text and defaults are
read from those configs, so the CLI, the Prefect UI form and the docs never disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mlm_core.config import DownloadConfig, EvalConfig, RuntimeConfig, TokenizeConfig, TrainConfig, VocabConfig

# (section, config class, field, flag, extra argparse kwargs)
_OPTIONS: list[tuple[str, type[BaseModel], str, str, dict]] = [
    ("download", DownloadConfig, "sources", "--source", {"action": "append", "metavar": "SRC"}),
    ("download", DownloadConfig, "encoding", "--encoding", {}),
    ("download", DownloadConfig, "timeout_s", "--timeout", {"type": float}),
    ("tokenize", TokenizeConfig, "heldout_fraction", "--heldout-fraction", {"type": float}),
    ("tokenize", TokenizeConfig, "max_rows_per_shard", "--max-rows-per-shard", {"type": int}),
    ("vocab", VocabConfig, "vocab_size", "--vocab-size", {"type": int}),
    ("vocab", VocabConfig, "min_frequency", "--min-frequency", {"type": int}),
    ("train", TrainConfig, "hidden_size", "--hidden-size", {"type": int}),
    ("train", TrainConfig, "num_layers", "--layers", {"type": int}),
    ("train", TrainConfig, "num_heads", "--heads", {"type": int}),
    ("train", TrainConfig, "intermediate_size", "--intermediate-size", {"type": int}),
    ("train", TrainConfig, "max_length", "--max-length", {"type": int}),
    ("train", TrainConfig, "dropout", "--dropout", {"type": float}),
    ("train", TrainConfig, "epochs", "--epochs", {"type": float}),
    ("train", TrainConfig, "max_steps", "--max-steps", {"type": int}),
    ("train", TrainConfig, "batch_size", "--batch-size", {"type": int}),
    ("train", TrainConfig, "tokens_per_batch", "--tokens-per-batch", {"type": int}),
    ("train", TrainConfig, "grad_accum", "--grad-accum", {"type": int}),
    ("train", TrainConfig, "budget_minutes", "--budget-minutes", {"type": float}),
    ("train", TrainConfig, "learning_rate", "--lr", {"type": float}),
    ("train", TrainConfig, "warmup_ratio", "--warmup-ratio", {"type": float}),
    ("train", TrainConfig, "seed", "--seed", {"type": int}),
    ("train", TrainConfig, "mask_rate", "--mask-rate", {"type": float}),
    ("train", TrainConfig, "masking", "--masking", {"choices": ["dynamic", "static"]}),
    ("train", TrainConfig, "checkpoint_every", "--checkpoint-every", {"type": int}),
    ("evaluate", EvalConfig, "passes", "--eval-passes", {"type": int}),
    ("evaluate", EvalConfig, "max_sentences", "--eval-max-sentences", {"type": int}),
    ("evaluate", EvalConfig, "fill_mask_examples", "--example", {"action": "append", "metavar": "TEXT"}),
    ("runtime", RuntimeConfig, "device", "--device", {"choices": ["auto", "cpu", "cuda"]}),
    ("runtime", RuntimeConfig, "precision", "--precision", {"choices": ["auto", "fp32", "bf16"]}),
    ("runtime", RuntimeConfig, "num_threads", "--threads", {"type": int}),
    ("runtime", RuntimeConfig, "compile", "--compile", {"action": "store_true"}),
    ("runtime", RuntimeConfig, "prefetch", "--prefetch", {"type": int}),
    ("runtime", RuntimeConfig, "peak_tflops", "--peak-tflops", {"type": float}),
    ("runtime", RuntimeConfig, "nproc_per_node", "--nproc-per-node", {"type": int}),
    ("runtime", RuntimeConfig, "nnodes", "--nnodes", {"type": int}),
    ("runtime", RuntimeConfig, "rdzv_endpoint", "--rdzv-endpoint", {"metavar": "HOST:PORT"}),
    ("runtime", RuntimeConfig, "rdzv_id", "--rdzv-id", {}),
]
_SECTIONS = {
    "download": DownloadConfig, "tokenize": TokenizeConfig, "vocab": VocabConfig,
    "train": TrainConfig, "evaluate": EvalConfig, "runtime": RuntimeConfig,
}


def _help(cls: type[BaseModel], field: str) -> str:
    info = cls.model_fields[field]
    default = info.default_factory() if info.default_factory else info.default
    shown = ", ".join(default) if isinstance(default, list) else default
    return f"{info.description} (default: {shown})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melos",
        description="Pre-train a Japanese BERT masked language model from scratch, orchestrated by "
        "Prefect and tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="run the whole pipeline (download, tokenize, vocab, train, evaluate)",
        description="Run the pretrain flow: download -> tokenize -> vocab -> train -> evaluate. "
        "With no options it trains a small model on the embedded 走れメロス corpus. "
        "Outputs go to --workdir; every stage is logged to MLflow (sqlite:///mlflow.db in the "
        "current directory unless MLFLOW_TRACKING_URI is set).",
        epilog="examples:\n"
        "  melos pretrain\n"
        "  melos pretrain --source my_novel.txt --source https://www.aozora.gr.jp/cards/000035/files/1567_ruby_4948.zip\n"
        "  melos pretrain --epochs 20 --mask-rate 0.2 --masking static --seed 1\n"
        "  melos pretrain --resume            # continue an interrupted run with the same settings",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, cls, field, flag, extra in _OPTIONS:
        group = groups.setdefault(section, p.add_argument_group(cls.__doc__.splitlines()[0].rstrip(".")))
        if "metavar" not in extra and "choices" not in extra and extra.get("action") != "store_true":
            extra = {**extra, "metavar": {int: "N", float: "X"}.get(extra.get("type"), "NAME")}
        group.add_argument(flag, dest=f"{section}.{field}", default=argparse.SUPPRESS, help=_help(cls, field), **extra)
    run = p.add_argument_group("run")
    run.add_argument("--workdir", default="melos-work", help="directory for all stage outputs (default: melos-work)")
    run.add_argument("--experiment", default="melos", help="MLflow experiment name (default: melos)")
    run.add_argument("--resume", action="store_true", help="continue the last run with the same settings from its latest checkpoint")
    run.add_argument("--json", action="store_true", help="print the result as JSON")

    f = sub.add_parser(
        "fill-mask",
        help="predict the [MASK] tokens of a sentence with a trained model",
        description="Print the top-k predictions for each [MASK] in TEXT.",
        epilog='example:\n  melos fill-mask "メロスは[MASK]した。" --run <MLflow run id>',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("text", help="a sentence containing [MASK]")
    f.add_argument(
        "--run", required=True,
        help="an MLflow run id (a pretrain parent run or its train run) or a model/checkpoint directory",
    )
    f.add_argument("--top-k", type=int, default=5, help="predictions per [MASK] (default: 5)")
    f.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    return parser


def configs_from_args(ns: argparse.Namespace) -> dict[str, BaseModel]:
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in vars(ns).items():
        if "." in key:
            section, field = key.split(".", 1)
            values[section][field] = value
    return {section: cls(**values[section]) for section, cls in _SECTIONS.items()}


def resolve_model_dir(run: str, dst: Path) -> Path:
    """A local directory as is; an MLflow run id -> its train run's ``model`` artifacts."""
    if Path(run).is_dir():
        return Path(run)
    from mlflow.artifacts import download_artifacts

    from tasks import tracking

    client = tracking.client()
    try:
        found = client.get_run(run)
    except Exception as exc:
        raise SystemExit(
            f"melos: {run!r} is neither a directory nor a run in the MLflow store {tracking.tracking_uri()} ({exc})"
        ) from None
    if found.data.tags.get(tracking.TAG_STAGE) != "train":
        children = client.search_runs(
            [found.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run}' and tags.`{tracking.TAG_STAGE}` = 'train'",
        )
        if not children:
            raise SystemExit(f"melos: MLflow run {run} has no train stage with a model")
        run = children[0].info.run_id
    path = download_artifacts(run_id=run, artifact_path="model", dst_path=str(dst), tracking_uri=tracking.tracking_uri())
    return Path(path)


def cmd_fill_mask(ns: argparse.Namespace) -> int:
    from mlm_core.checkpoint import load_pretrained
    from mlm_core.evaluate import fill_mask

    with tempfile.TemporaryDirectory(prefix="melos-model-") as tmp:
        try:
            model, tokenizer = load_pretrained(resolve_model_dir(ns.run, Path(tmp)), ns.device)
            results = fill_mask(model, tokenizer, ns.text, ns.top_k, device=ns.device)
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(f"melos: {exc}") from None
    for i, preds in enumerate(results, 1):
        print(f"[MASK] #{i}")
        for rank, (token, prob) in enumerate(preds, 1):
            print(f"  {rank}. {token}\t{prob:.4f}")
    return 0


def cmd_pretrain(ns: argparse.Namespace) -> int:
    try:
        configs = configs_from_args(ns)
    except ValidationError as exc:
        raise SystemExit(f"melos: invalid option: {exc}") from None
    from flows.pretrain import pretrain

    result = pretrain(**configs, workdir=ns.workdir, experiment=ns.experiment, resume=ns.resume)
    if ns.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    m = result["metrics"]
    print()
    print(f"MLflow run:  {result['mlflow_run_id']}")
    print(f"model:       {result['model_dir']}")
    print(f"report:      {result['report']}")
    print(
        f"held-out:    top-1 {m['eval/top1_accuracy']:.4f} (unigram baseline {m['eval/unigram_top1_accuracy']:.4f}), "
        f"top-5 {m['eval/top5_accuracy']:.4f} (baseline {m['eval/unigram_top5_accuracy']:.4f}), "
        f"loss {m['eval/loss']:.3f}, perplexity {m['eval/perplexity']:.1f}"
    )
    for ex in result["fill_mask"]:
        print(f"fill-mask:   {ex['text']} -> " + ", ".join(f"{t} ({p:.3f})" for t, p in ex["predictions"][0]))
    from tasks.tracking import tracking_uri

    uri = tracking_uri()
    print(f"browse:      {'mlflow ui --backend-store-uri ' + uri if uri.startswith('sqlite') else uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "pretrain":
        return cmd_pretrain(ns)
    return cmd_fill_mask(ns)


if __name__ == "__main__":
    sys.exit(main())
