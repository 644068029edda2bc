"""The ``melos`` command: run the pipeline by hand, or ask a trained model to fill a blank.

Options map one-to-one onto the flow's typed configs; their help text and defaults are
read from those configs, so the CLI, the Prefect UI form and the docs never disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mlm_core.config import DownloadConfig, EvalConfig, RuntimeConfig, TokenizeConfig, TrainConfig, VocabConfig


def _count_or_all(text: str) -> int | None:
    """N, or 0 / 'all' for no limit (the config's None, which a command line cannot spell)."""
    if text.strip().lower() in ("all", "0", "none"):
        return None
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, or 'all'")
    return int(text)


# (section, config class, field, flag, extra argparse kwargs)
_OPTIONS: list[tuple[str, type[BaseModel], str, str, dict]] = [
    ("download", DownloadConfig, "sources", "--source", {"action": "append", "metavar": "SRC"}),
    ("download", DownloadConfig, "encoding", "--encoding", {}),
    ("download", DownloadConfig, "timeout_s", "--timeout", {"type": float}),
    ("download", DownloadConfig, "aozora_base_url", "--aozora-base-url", {"metavar": "URL|DIR"}),
    ("download", DownloadConfig, "concurrency", "--download-concurrency", {"type": int}),
    ("download", DownloadConfig, "per_host", "--per-host", {"type": int}),
    ("download", DownloadConfig, "retries", "--download-retries", {"type": int}),
    ("download", DownloadConfig, "max_failed_fraction", "--max-failed-fraction", {"type": float}),
    ("tokenize", TokenizeConfig, "heldout_fraction", "--heldout-fraction", {"type": float}),
    ("tokenize", TokenizeConfig, "max_rows_per_shard", "--max-rows-per-shard", {"type": int}),
    ("tokenize", TokenizeConfig, "workers", "--workers", {"type": int}),
    ("tokenize", TokenizeConfig, "part_chars", "--part-chars", {"type": int}),
    ("tokenize", TokenizeConfig, "dask", "--dask", {"action": "store_true"}),
    ("tokenize", TokenizeConfig, "dask_address", "--dask-address", {"metavar": "tcp://HOST:PORT"}),
    ("tokenize", TokenizeConfig, "word_splitter", "--word-splitter", {"metavar": "mecab:DIC|basic"}),
    ("vocab", VocabConfig, "vocab_size", "--vocab-size", {"type": int}),
    ("vocab", VocabConfig, "min_frequency", "--min-frequency", {"type": int}),
    ("vocab", VocabConfig, "limit_alphabet", "--limit-alphabet", {"type": int}),
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
    ("train", TrainConfig, "mask_rate", "--mask-rate", {"metavar": "RATE|START:END:KIND"}),
    ("train", TrainConfig, "masking", "--masking", {"choices": ["dynamic", "static"]}),
    ("train", TrainConfig, "whole_word", "--whole-word", {"action": "store_true"}),
    ("train", TrainConfig, "mask_token_prob", "--mask-token-prob", {"type": float}),
    ("train", TrainConfig, "random_token_prob", "--random-token-prob", {"type": float}),
    ("train", TrainConfig, "checkpoint_every", "--checkpoint-every", {"type": int}),
    ("evaluate", EvalConfig, "passes", "--eval-passes", {"type": int}),
    ("evaluate", EvalConfig, "max_sentences", "--eval-max-sentences", {"type": _count_or_all, "metavar": "N|all"}),
    ("evaluate", EvalConfig, "pll_sentences", "--eval-pll-sentences", {"type": int}),
    ("evaluate", EvalConfig, "fill_mask_examples", "--example", {"action": "append", "metavar": "TEXT"}),
    ("runtime", RuntimeConfig, "device", "--device", {"choices": ["auto", "cpu", "cuda"]}),
    ("runtime", RuntimeConfig, "precision", "--precision", {"choices": ["auto", "fp32", "bf16"]}),
    ("runtime", RuntimeConfig, "num_threads", "--threads", {"type": int}),
    ("runtime", RuntimeConfig, "compile", "--compile", {"action": "store_true"}),
    ("runtime", RuntimeConfig, "prefetch", "--prefetch", {"type": int}),
    ("runtime", RuntimeConfig, "loader_workers", "--loader-workers", {"type": int}),
    ("runtime", RuntimeConfig, "peak_tflops", "--peak-tflops", {"type": float}),
    ("runtime", RuntimeConfig, "nproc_per_node", "--nproc-per-node", {"type": int}),
    ("runtime", RuntimeConfig, "nnodes", "--nnodes", {"type": int}),
    ("runtime", RuntimeConfig, "rdzv_endpoint", "--rdzv-endpoint", {"metavar": "HOST:PORT"}),
    ("runtime", RuntimeConfig, "rdzv_id", "--rdzv-id", {}),
    ("runtime", RuntimeConfig, "tracking_grace_s", "--tracking-grace", {"type": float, "metavar": "SECONDS"}),
]
_SECTIONS = {
    "download": DownloadConfig, "tokenize": TokenizeConfig, "vocab": VocabConfig,
    "train": TrainConfig, "evaluate": EvalConfig, "runtime": RuntimeConfig,
}
# Option group headings; the stage configs' docstrings serve, except where a newcomer needs plainer words.
_HEADINGS = {
    "runtime": "Hardware: how fast a run goes (changing these never makes a cached stage run again)",
}
TRACKING_URI_HELP = (
    "MLflow store to use, e.g. sqlite:////path/to/mlflow.db or http://127.0.0.1:5000 (default: "
    "$MLFLOW_TRACKING_URI, else ./mlflow.db, else the stores Melos has used before)"
)


def _help(cls: type[BaseModel], field: str, extra: dict) -> str:
    """The config field's description in CLI words: field names become their flags, and a
    repeatable option says that giving it replaces the default rather than adding to it."""
    info = cls.model_fields[field]
    text = info.description
    text = _in_cli_words(cls, text)
    default = info.default_factory() if info.default_factory else info.default
    if extra.get("type") is _count_or_all:
        text = text.replace("None: all", "0 or 'all': every one")
    if default is None and "(None: " in text:
        text = text.replace("(None: ", "(default: ")
    elif extra.get("action") == "append":
        text += f" Repeatable; giving it replaces the default rather than adding to it (default: {', '.join(default)})"
    else:
        text += f" (default: {'not set' if default is None else default})"
    return text.replace("%", "%%")


def _in_cli_words(cls: type[BaseModel], text: str) -> str:
    """``text`` with the config's field names (max_length) spelled as their flags (--max-length)."""
    for f, flag in ((f, flag) for _, c, f, flag, _ in _OPTIONS if c is cls and "_" in f):  # not plain words
        text = re.sub(rf"\b{f}\b", flag, text)
    return text


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps flag names whole when wrapping (``--max-steps``, never ``--max-`` / ``steps``)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def _command(sub, name: str, summary: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with working examples."""
    return sub.add_parser(
        name, help=summary, description=description, formatter_class=_HelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="melos",
        description="Pre-train a Japanese BERT masked language model from scratch or from a published "
        "checkpoint, and fine-tune it, orchestrated by Prefect and tracked in MLflow.",
        epilog="examples:\n"
        "  melos pretrain                                  # train on the embedded 走れメロス corpus\n"
        "  melos runs                                      # list runs with their held-out scores\n"
        '  melos fill-mask "メロスは[MASK]した。" --run latest\n'
        "  melos ui                                        # browse runs in the MLflow UI\n"
        "`melos COMMAND --help` shows each command's options.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of errors (also MELOS_DEBUG=1); may be given after the command too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="run the whole pipeline (download, tokenize, vocab, train, evaluate)",
        description="Run the pretrain flow: download -> tokenize -> vocab -> train -> evaluate. "
        "With no options it trains a small model on the embedded 走れメロス corpus. "
        "Outputs go to --workdir; every stage is logged to MLflow (sqlite:///mlflow.db in the "
        "current directory unless --tracking-uri or MLFLOW_TRACKING_URI says otherwise).",
        epilog="examples:\n"
        "  melos pretrain\n"
        "  melos pretrain --source my_novel.txt --source https://www.aozora.gr.jp/cards/000035/files/1567_ruby_4948.zip\n"
        "  melos pretrain --source aozora:author=35,879 --workers 4\n"
        "  melos pretrain --source 'jsonl:wiki.jsonl?field=text' --dask-address tcp://scheduler:8786\n"
        "  melos pretrain --epochs 20 --mask-rate 0.2 --masking static --seed 1\n"
        "  melos pretrain --resume            # continue an interrupted run with the same settings\n"
        "  melos pretrain --init-from tohoku-nlp/bert-base-japanese-v3 --budget-minutes 30",
        formatter_class=_HelpFormatter,
    )
    _add_config_options(p, _SECTIONS)
    run = p.add_argument_group("run")
    run.add_argument(
        "--init-from", metavar="SOURCE", default=None,
        help="continue pre-training this BERT instead of starting from random weights: a Hugging Face model "
        "directory, a hub id in the local Hugging Face cache (downloaded unless HF_HUB_OFFLINE is set), a Melos "
        "model directory, or run:<id>|latest. Its tokenizer and vocabulary are used and its size kept; unless "
        "given, --lr becomes 5e-05, --epochs 3, --dropout the checkpoint's",
    )
    run.add_argument("--workdir", default="melos-work", help="directory for all stage outputs (default: melos-work)")
    run.add_argument("--experiment", default="melos", help="MLflow experiment name (default: melos)")
    run.add_argument("--resume", action="store_true", help="continue the last run with the same settings from its latest checkpoint")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--tracking-uri", metavar="URI", help="MLflow store to log to (default: $MLFLOW_TRACKING_URI, "
                     "else sqlite:///mlflow.db in the current directory)")
    run.add_argument(
        "--on-busy", choices=["wait", "fail"], default="wait",
        help="when a live run with the same settings is training in --workdir: wait for it (logging who "
        "holds it), or fail at once naming its process and MLflow run id (default: wait)",
    )
    run.add_argument(
        "--register-as", metavar="NAME", default=None,
        help="register the model in the MLflow Model Registry under NAME; alias 'champion' moves to it "
        "only if its held-out top-1 accuracy beats the current champion's",
    )

    f = _command(
        sub, "fill-mask", "predict the [MASK] tokens of a sentence with a trained model",
        "Print the top-k predictions for each [MASK] in TEXT. A run id is looked up in --tracking-uri, else "
        "./mlflow.db, else the stores Melos has used before, so it works from any directory.",
        ['melos fill-mask "メロスは[MASK]した。" --run latest',
         'melos fill-mask "メロスは[MASK]した。" --run <run id from `melos runs`>',
         'melos fill-mask "メロスは[MASK]した。" --run melos-work/train/<key>/model'],
    )
    f.add_argument("text", help="a sentence containing [MASK]")
    _add_model_source(f)
    f.add_argument("--top-k", type=int, default=5, help="predictions per [MASK] (default: 5)")
    f.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="'auto' picks CUDA when present (default: auto)"
    )
    f.add_argument("--tracking-uri", metavar="URI", help=TRACKING_URI_HELP)

    r = _command(
        sub, "runs", "list recent pretrain runs with their held-out scores",
        "List pretrain runs, newest first: id, name, start, status, corpus, model size (layers x width), "
        "masking, held-out top-1/top-5 accuracy with the unigram baseline in brackets, and wall time. Reads "
        "--tracking-uri, else ./mlflow.db and the stores Melos has used before.",
        ["melos runs", "melos runs --limit 5 --status finished --experiment melos", "melos runs --json"],
    )
    r.add_argument("--limit", type=_positive_int, default=20, metavar="N", help="show at most N runs (default: 20)")
    r.add_argument("--experiment", metavar="NAME", help="only runs of this MLflow experiment (default: all)")
    r.add_argument(
        "--status", type=str.lower, choices=["running", "scheduled", "finished", "failed", "killed"],
        help="only runs in this state (default: all)",
    )
    r.add_argument("--json", action="store_true", help="print the runs as a JSON list")
    r.add_argument("--tracking-uri", metavar="URI", help=TRACKING_URI_HELP)

    u = _command(
        sub, "ui", "open the MLflow UI (and with --prefect the Prefect UI) on Melos's runs",
        "Start the MLflow UI on the store Melos uses (--tracking-uri, else ./mlflow.db, else the store Melos "
        "used last) and print its URL; with --prefect start the Prefect UI too. Ctrl-C stops everything it started.",
        ["melos ui", "melos ui --port 5001 --prefect"],
    )
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    u.add_argument("--port", type=int, default=5000, metavar="N", help="MLflow UI port (default: 5000)")
    u.add_argument("--prefect", action="store_true", help="also start the Prefect UI (a `prefect server`)")
    u.add_argument("--prefect-port", type=int, default=4200, metavar="N", help="Prefect UI port (default: 4200)")
    u.add_argument("--tracking-uri", metavar="URI", help=TRACKING_URI_HELP)
    u.add_argument("--access-log", action="store_true", help="show the MLflow UI's log line per HTTP request")

    v = _command(
        sub, "evaluate", "score a trained model on any corpus (logged as its own MLflow run)",
        "Run the download and tokenize stages on the corpus given by --source (cached like any other run), "
        "encode all its sentences with the model's own vocabulary, and score the model with the fixed "
        "evaluation masks: masked-token and whole-word accuracy, pseudo-perplexity, accuracy per part of "
        "speech. The unigram baselines are fitted on that corpus. The metrics go to a new MLflow run tagged "
        "melos.model_run_id with the model's run, under the eval/... names `melos pretrain` logs.",
        ["melos evaluate --run latest --source aozora:author=879",
         "melos evaluate --run <run id> --source other_author.zip --json",
         "melos evaluate --run melos-work/train/<key>/model --source my_novel.txt --eval-pll-sentences 200"],
    )
    v.add_argument("--run", required=True,
                   help="'latest', an MLflow run id (a pretrain run or its train stage run), or a model directory")
    _add_config_options(v, ("download", "tokenize", "evaluate", "runtime"))
    _add_run_options(v, "melos", "print the metrics as JSON (eval/... names)")
    # here the corpus is the point, so every held-out sentence is scored unless a sample is asked for
    [sample] = [a for a in v._actions if a.dest == "evaluate.max_sentences"]
    sample.help = sample.help.replace(f"(default: {EvalConfig.model_fields['max_sentences'].default})",
                                      "(default: every sentence)")

    c = _command(
        sub, "compare", "compare training settings over seeds on one prepared dataset (table + plots in MLflow)",
        "Prepare the data once (cached), then train and evaluate every combination of the --grid values, each "
        "--seeds times with the same seeds, the same steps and the same evaluation masks. Each run is an MLflow "
        "child run of one comparison run, which gets a table (Markdown and CSV) and PNG plots; the table, mean ± "
        "spread over seeds, is printed at the end. Every `melos pretrain` option sets what all runs share.",
        ["melos compare --grid mask-rate=0.15,0.3,0.4 --seeds 3 --max-steps 300",
         "melos compare --grid mask-rate=0.3:0.15:linear,0.15 --grid masking=static,dynamic --max-steps 200",
         "melos compare --grid whole-word=false,true --source aozora:author=35 --max-steps 500",
         "melos compare --grid-file grid.yaml --seeds 2 --deployment compare-setting/melos-compare"],
    )
    c.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="a training setting, named as its option without the dashes (mask-rate, masking, "
                   "whole-word, hidden-size, ...; --layers is num-layers) or as its TrainConfig field, and the values "
                   "to try; repeatable: every combination is a setting. init-from=none,SOURCE compares starting points "
                   "(random weights, a checkpoint as --init-from takes it)")
    c.add_argument("--grid-file", metavar="YAML", help="a YAML mapping FIELD: [V1, V2, ...] (instead of or with --grid), or a YAML list of "
                        "settings tried one by one, e.g. [{}, {mask-rate: 0.3}, {whole-word: true}]")
    c.add_argument("--seeds", type=_positive_int, default=1, metavar="N",
                   help="runs per setting, seeds --seed, --seed + 1, ... (default: 1)")
    c.add_argument("--deployment", metavar="FLOW/NAME",
                   help="fan the runs out as flow runs of this deployment of the compare-setting flow "
                   "(default: run them one after another here)")
    c.add_argument("--resume", action="store_true",
                   help="continue the latest comparison with these same options (one that was stopped or failed): "
                   "its finished runs join the new comparison run as they are, an interrupted one continues from "
                   "its last checkpoint, the rest train")
    from flows import finetune_cli

    finetune_cli.add_downstream_options(c)
    _add_config_options(c, _SECTIONS)
    _add_run_options(c, "melos-compare", "print the result rows as JSON")

    e = _command(
        sub, "export", "write a trained model in Hugging Face format (with a model card)",
        "Write config.json, model.safetensors, vocab.txt, tokenizer settings and a model card README.md to "
        "OUT, loadable with transformers' BertForMaskedLM and BertJapaneseTokenizer. OUT must not exist or be "
        "empty; it is written atomically.",
        ["melos export --run latest --format hf my-bert",
         "melos export --model models:/melos-nightly@champion --format hf my-bert"],
    )
    e.add_argument("out", metavar="OUT", help="directory to write")
    _add_model_source(e)
    e.add_argument("--format", choices=["hf"], required=True, help="export format: hf (Hugging Face transformers)")
    e.add_argument("--tracking-uri", metavar="URI", help=TRACKING_URI_HELP)

    from flows import finetune_cli

    finetune_cli.add_command(sub, _command, _add_run_options, _positive_int)

    from flows import stack

    stack.add_parser(sub)
    return parser


def _add_config_options(p: argparse.ArgumentParser, sections) -> None:
    """The ``_OPTIONS`` of the given config sections, one argument group per section."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, cls, field, flag, extra in _OPTIONS:
        if section not in sections:
            continue
        heading = _HEADINGS.get(section) or cls.__doc__.splitlines()[0].rstrip(".")
        group = groups.setdefault(section, p.add_argument_group(heading))
        if "metavar" not in extra and "choices" not in extra and extra.get("action") != "store_true":
            extra = {**extra, "metavar": {int: "N", float: "X"}.get(extra.get("type"), "NAME")}
        group.add_argument(
            flag, dest=f"{section}.{field}", default=argparse.SUPPRESS, help=_help(cls, field, extra), **extra
        )


def _add_run_options(p: argparse.ArgumentParser, experiment: str, json_help: str) -> None:
    """--workdir, --experiment, --json and --tracking-uri of a command that runs a flow."""
    p.add_argument("--workdir", default="melos-work", help="directory for stage outputs (default: melos-work)")
    p.add_argument("--experiment", default=experiment, help=f"MLflow experiment name (default: {experiment})")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--tracking-uri", metavar="URI", help=TRACKING_URI_HELP)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--run",
        help="'latest' (the newest finished `melos pretrain` run), an MLflow run id (a pretrain run or its "
        "train stage run), or a model/checkpoint directory",
    )
    source.add_argument(
        "--model", metavar="URI",
        help="an MLflow model URI: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model",
    )


def _one_line(exc: ValidationError) -> str:
    """Pydantic's multi-line report as one line per the CLI's promise, naming the flag."""
    flags = {(section, field): flag for section, _, field, flag, _ in _OPTIONS}
    section = next((name for name, cls in _SECTIONS.items() if cls.__name__ == exc.title), exc.title)
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        name = flags.get((section, field), f"--{field.replace('_', '-')}" if field else section)
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{name}: {_in_cli_words(_SECTIONS[section], msg) if section in _SECTIONS else msg}")
    return "; ".join(parts)


def configs_from_args(ns: argparse.Namespace) -> dict[str, BaseModel]:
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in vars(ns).items():
        if "." in key:
            section, field = key.split(".", 1)
            values[section][field] = value
    return {section: cls(**values[section]) for section, cls in _SECTIONS.items()}


def resolve_model_dir(run: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """A local directory as is; an MLflow run id or ``latest`` -> its train run's ``model`` artifacts."""
    if Path(run).is_dir():
        return Path(run)
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    from flows.runs import RunNotFound, resolve_run
    from tasks import tracking

    try:
        store, found = resolve_run(run, tracking_uri)
    except RunNotFound as exc:
        raise SystemExit(f"melos: {run!r} is not a directory, and {exc}") from None
    run = found.info.run_id
    client = MlflowClient(store)
    if found.data.tags.get(tracking.TAG_STAGE) != "train":
        children = client.search_runs(
            [found.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run}' and tags.`{tracking.TAG_STAGE}` = 'train'",
        )
        if not children:
            raise SystemExit(f"melos: MLflow run {run} has no train stage with a model")
        run = children[0].info.run_id
    path = download_artifacts(run_id=run, artifact_path="model", dst_path=str(dst), tracking_uri=store)
    return Path(path)


def model_dir_from_args(ns: argparse.Namespace, dst: Path) -> Path:
    """--model URI or --run RUN -> a local Melos model directory (SystemExit on failure)."""
    if ns.tracking_uri:  # models:/ and runs:/ URIs are read from the store named on the command line
        os.environ["MLFLOW_TRACKING_URI"] = ns.tracking_uri
    try:
        if ns.model:
            return _download_model_from_stores(ns.model, dst)
        return resolve_model_dir(ns.run, dst, ns.tracking_uri)
    except LookupError as exc:
        raise SystemExit(f"melos: {exc}") from None
    except Exception as exc:  # e.g. a run whose model artifacts are missing
        first = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0]
        raise SystemExit(f"melos: no model for {ns.run or ns.model}: {first}") from None


def _download_model_from_stores(uri: str, dst: Path) -> Path:
    """A models:/ or runs:/ URI looked up as a run id is: in the store named (--tracking-uri,
    MLFLOW_TRACKING_URI), else in ./mlflow.db and the stores Melos remembers, opening only
    stores that exist (looking never creates one)."""
    from flows.runs import open_stores
    from tasks.model_source import ModelNotInStore, download_model

    if os.environ.get("MLFLOW_TRACKING_URI") or not uri.startswith(("models:/", "runs:/")):
        return download_model(uri, dst)
    opened, searched = open_stores()
    for store, _client in opened:
        try:
            return download_model(uri, dst, store)
        except ModelNotInStore:
            continue
    raise LookupError(f"no model at {uri} in the stores searched: {'; '.join(searched) or 'none'}. "
                      "Give --tracking-uri URI (or set MLFLOW_TRACKING_URI) to look in another store")


def cmd_fill_mask(ns: argparse.Namespace) -> int:
    from mlm_core.checkpoint import load_pretrained
    from mlm_core.evaluate import fill_mask
    from mlm_core.train import resolve_device

    with tempfile.TemporaryDirectory(prefix="melos-model-") as tmp:
        try:
            device, _ = resolve_device(RuntimeConfig(device=ns.device))
            model, tokenizer = load_pretrained(model_dir_from_args(ns, Path(tmp)), device)
            results = fill_mask(model, tokenizer, ns.text, ns.top_k, device=device)
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(f"melos: {exc}") from None
    for i, preds in enumerate(results, 1):
        print(f"[MASK] #{i}")
        for rank, (token, prob) in enumerate(preds, 1):
            print(f"  {rank}. {token}\t{prob:.4f}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from mlm_core.hf_export import export_hf
    from tasks.model_source import card_for_run, card_next_to

    with tempfile.TemporaryDirectory(prefix="melos-export-") as tmp:
        model_dir = model_dir_from_args(ns, Path(tmp) / "model")
        card = card_next_to(model_dir)
        if card is None and ns.run and not Path(ns.run).is_dir():
            from flows.runs import resolve_run

            store, run = resolve_run(ns.run, ns.tracking_uri)  # found already by model_dir_from_args
            card = card_for_run(run.info.run_id, Path(tmp) / "card", store)
        try:
            out = export_hf(model_dir, ns.out, card)
        except (ValueError, FileNotFoundError, FileExistsError) as exc:
            raise SystemExit(f"melos: {exc}") from None
    print(f"exported {ns.format} model to {out}")
    if card is None:
        print("note: no pipeline record found for this model; its card lacks corpus, metrics and run ids")
    return 0


class _StoppedExit(int):
    """The exit status of a command stopped by a signal (128 + its number)."""


def _exit_now(rc: int) -> None:
    """End a stopped command at once. Its runs are marked, its checkpoint written and its
    servers stopped by then; what is left is the interpreter's own shutdown, which took 5-9 s
    after a training run on a loaded 2-core machine (with no Python frame running: native
    teardown), pushing a Ctrl-C past 10 s. Only on a stop: ``main()`` called in-process
    otherwise returns as before."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc))


def _run_flow(flow_fn, hint: str, **params):
    """Call a flow with Melos' own temporary Prefect server (unless PREFECT_API_URL names one)
    and SIGTERM turned into an exception, so a stopped command marks its MLflow runs KILLED and
    leaves no process behind. Returns the flow's result, or the exit status when stopped."""
    from flows.errors import quiet_prefect_console
    from flows.server import prefect_server
    from tasks.children import Stopped, stop_on_sigterm

    quiet_prefect_console()
    try:
        with stop_on_sigterm(), prefect_server(log_dir=Path(params.get("workdir") or ".") / "logs"):
            return flow_fn(**params)
    except KeyboardInterrupt as exc:
        signame = signal.Signals(exc.signum).name if isinstance(exc, Stopped) else "SIGINT"
        print(f"melos: stopped by {signame}; checkpoints written so far are kept and the MLflow runs are marked "
              f"KILLED; {hint}", file=sys.stderr)
        return _StoppedExit(128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT))


def cmd_pretrain(ns: argparse.Namespace) -> int:
    try:
        configs = configs_from_args(ns)
    except ValidationError as exc:
        raise SystemExit(f"melos: invalid option: {_one_line(exc)}") from None
    if ns.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = ns.tracking_uri
    from flows.checks import check_register_as, check_resume

    check_register_as(ns.register_as)
    if ns.resume:
        check_resume(ns.workdir)
    from mlm_core.download import SourceError, check_sources

    try:  # before any server starts: a missing file should not cost a Prefect start-up
        check_sources(configs["download"])
    except SourceError as exc:
        raise SystemExit(f"melos: {exc}") from None
    if ns.init_from:  # checked (and the continued pre-training defaults applied) before any server starts
        from flows.init_from import apply_to_configs

        try:
            configs = apply_to_configs(configs, ns.init_from, ns.workdir, ns.tracking_uri)
        except ValueError as exc:
            raise SystemExit(f"melos: {exc}") from None
    from flows.pretrain import pretrain
    from tasks.locks import RunBusyError
    from tasks.tracking import TrackingOutage

    try:
        result = _run_flow(pretrain, "run the same command with --resume to continue",
                           **configs, workdir=ns.workdir, experiment=ns.experiment, resume=ns.resume,
                           register_as=ns.register_as, on_busy=ns.on_busy, init_from=ns.init_from)
    except (SourceError, RunBusyError, TrackingOutage) as exc:  # the traceback is in the flow run's log already; one line here
        raise SystemExit(f"melos: {exc}") from None
    if isinstance(result, _StoppedExit):
        return result
    if ns.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    m = result["metrics"]
    print()
    print(f"MLflow run:  {result['mlflow_run_id']}")
    print(f"model:       {result['model_dir']}")
    print(f"report:      {result['report']}")
    if result.get("profile"):
        print(f"profile:     {result['profile']['why']}")
    t = result.get("train") or {}
    if t.get("train/budget_used") is not None:
        budget_s = t["budget_minutes"] * 60
        print(f"budget:      {t['budget_minutes']:g} min bought {t['train/steps']:.0f} steps, "
              f"{t['train/tokens_seen'] / 1e6:.2f}M tokens; {t['train/step_seconds']:.0f} s of its {budget_s:.0f} s "
              f"({t['train/step_seconds'] / budget_s:.0%}) went to steps (data stages and evaluation are outside it)")
    if result.get("initial_metrics"):
        from tasks.evaluate import before_after

        print(f"continued:   {result['init_from']}: held-out {before_after(result['initial_metrics'], m)}")
    print(
        f"held-out:    top-1 {m['eval/top1_accuracy']:.4f} (unigram baseline {m['eval/unigram_top1_accuracy']:.4f}), "
        f"top-5 {m['eval/top5_accuracy']:.4f} (baseline {m['eval/unigram_top5_accuracy']:.4f}), "
        f"loss {m['eval/loss']:.3f}, perplexity {m['eval/perplexity']:.1f}"
    )
    for ex in result["fill_mask"]:
        print(f"fill-mask:   {ex['text']} -> " + ", ".join(f"{t} ({p:.3f})" for t, p in ex["predictions"][0]))
    print(f"MLflow Model: {result['model_uri']}")
    if result.get("registered"):
        r = result["registered"]
        print(f"registered:  {r['name']} version {r['version']}, "
              f"{'now @champion' if r['promoted'] else 'not promoted'}: {r['reason']}")
    from tasks.tracking import tracking_uri

    uri = tracking_uri()
    print(f"browse:      {uri if uri.startswith(('http://', 'https://')) else melos_executable() + ' ui'}")
    return 0


def melos_executable() -> str:
    """How to call ``melos`` again, spelled so it works outside an activated virtualenv."""
    exe = Path(sys.executable).with_name("melos")
    return str(exe) if exe.is_file() else f"{sys.executable} -m flows.cli"


def cmd_evaluate(ns: argparse.Namespace) -> int:
    try:
        configs = configs_from_args(ns)
    except ValidationError as exc:
        raise SystemExit(f"melos: invalid option: {_one_line(exc)}") from None
    evaluate = configs["evaluate"]
    if "evaluate.max_sentences" not in vars(ns):  # all of the corpus unless a sample is asked for
        evaluate = evaluate.model_copy(update={"max_sentences": None})
    from mlm_core.download import SourceError, check_sources

    try:
        check_sources(configs["download"])
    except SourceError as exc:
        raise SystemExit(f"melos: {exc}") from None
    model_run_id = None
    if Path(ns.run).is_dir():
        model_dir = Path(ns.run).resolve()
        if ns.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = ns.tracking_uri
    else:
        from flows.runs import RunNotFound, resolve_run

        try:
            store, found = resolve_run(ns.run, ns.tracking_uri)
        except RunNotFound as exc:
            raise SystemExit(f"melos: {ns.run!r} is not a directory, and {exc}") from None
        model_run_id = found.info.run_id
        os.environ["MLFLOW_TRACKING_URI"] = store  # the evaluation is logged next to the model's run
        model_dir = resolve_model_dir(model_run_id, Path(ns.workdir).resolve() / "models" / model_run_id, store)
    from flows.evaluate_corpus import evaluate_corpus

    try:
        result = _run_flow(
            evaluate_corpus, "run the same command again (finished stages are cached)",
            model_dir=str(model_dir), model_run_id=model_run_id, download=configs["download"],
            tokenize=configs["tokenize"], evaluate=evaluate, runtime=configs["runtime"], workdir=ns.workdir,
            experiment=ns.experiment,
        )
    except (SourceError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"melos: {exc}") from None
    if isinstance(result, _StoppedExit):
        return result
    if ns.json:  # as pretrain's: the run ids beside the metrics
        print(json.dumps({"mlflow_run_id": result["mlflow_run_id"], "model_run_id": model_run_id,
                          "model_dir": str(model_dir), "report": result["report"], "metrics": result["metrics"]},
                         ensure_ascii=False, indent=2))
        return 0
    m = result["metrics"]
    print(f"MLflow run:  {result['mlflow_run_id']} (model run {model_run_id or model_dir})")
    print(f"report:      {result['report']}")
    for key in sorted(k for k in m if not k.startswith("eval/pos/")):
        print(f"{key:32s} {m[key]:.4f}" if isinstance(m[key], float) else f"{key:32s} {m[key]}")
    return 0


def grid_from_args(ns: argparse.Namespace) -> dict[str, list] | list[dict]:
    """--grid-file first, then --grid options (a --grid FIELD replaces the file's). A file
    holding a list gives the settings one by one and takes no --grid."""
    from mlm_core.grid import check_grid, parse_grid_arg

    grid: dict[str, list] = {}
    if ns.grid_file:
        import yaml

        try:
            loaded = yaml.safe_load(Path(ns.grid_file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"--grid-file {ns.grid_file}: {exc}") from None
        if isinstance(loaded, list):
            if ns.grid:
                raise ValueError(f"--grid-file {ns.grid_file} lists its settings one by one; add a setting "
                                 f"to the file instead of --grid {ns.grid[0]}")
            try:
                return check_grid(loaded)
            except ValueError as exc:
                raise ValueError(f"--grid-file {ns.grid_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--grid-file {ns.grid_file}: expected a mapping FIELD: [V1, V2] or a list of "
                             f"settings, got {type(loaded).__name__}")
        grid.update({str(k): v if isinstance(v, list) else [v] for k, v in loaded.items()})
    for text in ns.grid:
        field, values = parse_grid_arg(text)
        grid[field] = values
    return check_grid(grid)


def cmd_compare(ns: argparse.Namespace) -> int:
    from flows import finetune_cli
    from mlm_core.grid import setting_configs

    try:
        configs = configs_from_args(ns)
        grid = grid_from_args(ns)
        setting_configs(configs["train"], grid, ns.seeds)  # every setting valid before anything starts
        from flows.init_from import check_grid_sources

        check_grid_sources(configs["train"], grid, ns.workdir, ns.tracking_uri)  # --grid init-from=none,DIR
    except ValidationError as exc:
        raise SystemExit(f"melos: invalid option: {_one_line(exc)}") from None
    except ValueError as exc:
        raise SystemExit(f"melos: {exc}") from None
    if ns.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = ns.tracking_uri
    from mlm_core.download import SourceError, check_sources

    try:
        check_sources(configs["download"])
    except SourceError as exc:
        raise SystemExit(f"melos: {exc}") from None
    from flows.compare import compare

    result = _run_flow(compare, "run the same command with --resume to keep the finished runs",
                       grid=grid, seeds=ns.seeds, **configs, workdir=ns.workdir, experiment=ns.experiment,
                       deployment=ns.deployment, resume=ns.resume, **finetune_cli.downstream_params(ns))
    if isinstance(result, _StoppedExit):
        return result
    if ns.json:
        print(json.dumps({"mlflow_run_id": result["mlflow_run_id"], "rows": result["rows"]}, ensure_ascii=False, indent=2))
        return 0
    print()
    print(result["markdown"])
    print(f"MLflow comparison run: {result['mlflow_run_id']} (table and plots under its comparison/ artifacts)")
    if result.get("dir"):
        print(f"table and plots:       {result['dir']}/ (comparison.md, comparison.csv, loss_curves.png, "
              "accuracy.png, pos_accuracy.png)")
    return 0


def cmd_runs(ns: argparse.Namespace) -> int:
    from flows.runs import format_table, list_runs

    rows, searched = list_runs(ns.tracking_uri, ns.experiment, ns.status, ns.limit)
    if ns.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    elif rows:
        print(format_table(rows))
    else:
        print(f"no pretrain runs in: {'; '.join(searched)}", file=sys.stderr)
    return 0


def cmd_ui(ns: argparse.Namespace) -> int:
    from flows.runs import RunNotFound, ui_store
    from flows.ui import serve

    try:
        store, experiment_id = ui_store(ns.tracking_uri)
    except RunNotFound as exc:
        raise SystemExit(f"melos: {exc}") from None
    return serve(store, ns.host, ns.port, ns.prefect_port if ns.prefect else None, experiment_id, ns.access_log)


def cmd_stack(ns: argparse.Namespace) -> int:
    from flows.stack import main as stack_main

    return stack_main(ns)


def main(argv: list[str] | None = None) -> int:
    from flows.errors import report
    from flows.server import quiet_defaults

    quiet_defaults()  # before Prefect or MLflow is imported: they read these once
    # MLflow's own artifact progress bars would stand between a command and its answer.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # anywhere on the line, as `melos pretrain ... --debug`
        argv = [a for a in argv if a != "--debug"]
        os.environ["MELOS_DEBUG"] = "1"
    ns = build_parser().parse_args(argv)
    commands = {
        "pretrain": cmd_pretrain, "fill-mask": cmd_fill_mask, "runs": cmd_runs, "ui": cmd_ui,
        "export": cmd_export, "evaluate": cmd_evaluate, "compare": cmd_compare, "stack": cmd_stack,
    }
    try:
        if ns.command == "finetune":
            from flows.finetune_cli import cmd_finetune

            rc = cmd_finetune(ns)
        else:
            rc = commands[ns.command](ns)
        if isinstance(rc, _StoppedExit):
            _exit_now(rc)
        return rc
    except KeyboardInterrupt:  # Ctrl-C outside a flow (looking up a run, downloading a model)
        print("melos: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:  # a UserError -> one line; anything else -> traceback and how to report it
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
