"""``melos finetune``: the subcommand's options and its command (cli.py registers both)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXAMPLES = [
    "melos finetune --run latest --task aozora-authors --seeds 3",
    "melos finetune --run latest --task aozora-pos --seeds 2 --epochs 2",
    "melos finetune --run <run id> --task reviews.jsonl --json",
    "melos finetune --run melos-work/train/<key>/model --task ner_train.conll --test ner_test.conll",
    "melos finetune --run models:/melos-nightly@champion --task pairs.csv --baseline none",
]


def add_command(sub, command, add_run_options, positive_int) -> None:
    p = command(
        sub, "finetune", "fine-tune a model on a labelled task, against the same model from random weights",
        "Fine-tune a pre-trained model on sequence classification (JSONL/CSV/Parquet with text, text_b, label) "
        "or NER (CoNLL IOB2), or on a built-in task from the pre-training corpus: aozora-authors (which author "
        "wrote a sentence, split by work) or aozora-pos (UniDic part of speech of each word, split by work). "
        "Each seed also trains the same architecture from random weights with the same settings "
        "(--baseline random), so the result reads as the gain of pre-training. Logged as an MLflow run tagged "
        "with the model's run.",
        EXAMPLES,
    )
    p.add_argument("--run", required=True, metavar="RUN",
                   help="the model: a run id, 'latest', a model directory, models:/NAME@ALIAS, runs:/ID/model, "
                        "or a Hugging Face BERT directory")
    p.add_argument("--task", required=True, metavar="FILE|NAME",
                   help="a labelled file, or a built-in task: aozora-authors, aozora-pos")
    p.add_argument("--task-type", choices=("classification", "ner"),
                   help="the file's task (default: from its suffix: .jsonl/.csv/.parquet classification, "
                        ".conll/.iob/.txt ner)")
    p.add_argument("--dev", metavar="FILE", help="dev file (default: split from --task)")
    p.add_argument("--test", metavar="FILE", help="test file (default: a seeded split of --task; 5-fold "
                                                  "cross-validation below 1000 examples)")
    p.add_argument("--corpus", metavar="DIR", help="built-in tasks: the pre-training work directory (default: "
                                                   "found from the model)")
    p.add_argument("--text-column", default="text", help="table column of the text (default: text)")
    p.add_argument("--text-b-column", default="text_b", help="table column of the second text of a pair "
                                                             "(default: text_b; absent: single sentences)")
    p.add_argument("--label-column", default="label", help="table column of the label (default: label)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per arm; spreads are over them (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed, and the seed of the data split (default: 0)")
    p.add_argument("--baseline", choices=("random", "none"), default="random",
                   help="train the random-init control too (default: random)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training split (default: 3)")
    p.add_argument("--max-steps", type=positive_int, help="cap on steps per training run (default: not set)")
    p.add_argument("--minutes", type=float, help="time budget per training run (default: not set)")
    p.add_argument("--learning-rate", type=float, default=3e-4, help="AdamW peak learning rate (default: 3e-4)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences per batch, as a token budget; sequences are packed (default: 32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default: auto)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    add_run_options(p, "melos", "print the metrics (finetune/<task>/f1, .../random_f1, .../gain, ...) as JSON")


def add_downstream_options(p: argparse.ArgumentParser) -> None:
    """``melos compare --downstream TASK`` and the fine-tuning settings it uses."""
    g = p.add_argument_group("downstream fine-tuning (after each setting trains)")
    g.add_argument("--downstream", action="append", metavar="TASK", default=[],
                   help="fine-tune every trained model on TASK (aozora-authors, aozora-pos, or a labelled file) and "
                        "put its test F1 with the spread in the table, beside a random-init control row; repeatable")
    g.add_argument("--downstream-epochs", type=float, default=3.0, metavar="X",
                   help="fine-tuning passes over the task's training split (default: 3)")
    g.add_argument("--downstream-max-steps", type=int, metavar="N", help="cap on fine-tuning steps (default: not set)")
    g.add_argument("--downstream-learning-rate", type=float, default=3e-4, metavar="X",
                   help="fine-tuning peak learning rate (default: 3e-4)")
    g.add_argument("--downstream-batch-size", type=int, default=32, metavar="N",
                   help="fine-tuning sequences per batch (default: 32)")


def downstream_params(ns: argparse.Namespace) -> dict:
    """The compare flow's downstream parameters; a file task that does not exist stops here."""
    from mlm_core.finetune_data import BUILTIN_TASKS

    for task_ref in ns.downstream:
        if task_ref not in BUILTIN_TASKS and not Path(task_ref).is_file():
            raise SystemExit(f"melos: --downstream {task_ref}: no such file, and not a built-in task "
                             f"({', '.join(BUILTIN_TASKS)})")
    if not ns.downstream:
        return {}
    return {"downstream": list(ns.downstream),
            "downstream_cfg": {"epochs": ns.downstream_epochs, "max_steps": ns.downstream_max_steps,
                               "learning_rate": ns.downstream_learning_rate, "batch_size": ns.downstream_batch_size}}


def resolve(ns: argparse.Namespace) -> tuple[str, str | None, list[str] | None, str | None]:
    """(model dir, model run id, the model's training documents, corpus hint) of --run."""
    from flows.cli import resolve_model_dir
    from tasks.model_source import URI_SCHEMES, card_for_run, card_next_to, download_model

    ref = ns.run
    if ns.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = ns.tracking_uri
    if Path(ref).is_dir():
        path = Path(ref).resolve()
        card = card_next_to(path)
        return str(path), None, _doc_ids(card), None
    dst = Path(ns.workdir).resolve() / "models"
    if ref.startswith(URI_SCHEMES):
        try:
            path = download_model(ref, dst / ref.replace(":/", "_").replace("/", "_").replace("@", "_"))
        except LookupError as exc:
            raise SystemExit(f"melos: {exc}") from None
        return str(path), None, _doc_ids(card_next_to(path)), None
    from flows.runs import RunNotFound, resolve_run

    try:
        store, found = resolve_run(ref, ns.tracking_uri)
    except RunNotFound as exc:
        raise SystemExit(f"melos: {ref!r} is not a directory, and {exc}") from None
    run_id = found.info.run_id
    os.environ["MLFLOW_TRACKING_URI"] = store  # the fine-tuning is logged next to the model's run
    try:
        path = resolve_model_dir(run_id, dst / run_id, store)
    except SystemExit:
        raise
    except Exception as exc:
        first = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0]
        raise SystemExit(f"melos: no model for {ref}: {first}") from None
    card = card_for_run(run_id, dst / run_id / "card", store)
    return str(Path(path).resolve()), run_id, _doc_ids(card), found.data.tags.get("melos.run_dir")


def _doc_ids(card: dict | None) -> list[str] | None:
    docs = (card or {}).get("documents")
    return [d["doc_id"] for d in docs] if docs else None


def cmd_finetune(ns: argparse.Namespace) -> int:
    from flows.cli import _run_flow, _StoppedExit
    from mlm_core.config import RuntimeConfig
    from mlm_core.finetune_data import BUILTIN_TASKS, TaskDataError
    from tasks.finetune import ModelLoadError

    if ns.task not in BUILTIN_TASKS and not Path(ns.task).is_file():
        raise SystemExit(f"melos: --task {ns.task}: no such file, and not a built-in task ({', '.join(BUILTIN_TASKS)})")
    for flag, value in (("--dev", ns.dev), ("--test", ns.test)):
        if value is not None and not Path(value).is_file():
            raise SystemExit(f"melos: {flag} {value}: no such file")
    columns = {"text_column": ns.text_column, "text_b_column": ns.text_b_column, "label_column": ns.label_column}
    from tasks.finetune import check_model_dir, load_task

    model_dir, run_id, doc_ids, run_dir = resolve(ns)
    corpus = ns.corpus or run_dir
    try:  # before any server starts and any MLflow run opens: bad input costs nothing
        check_model_dir(model_dir)
        if ns.task not in BUILTIN_TASKS:
            load_task(ns.task, ns.task_type, ns.dev, ns.test, None, model_dir, None, ns.seed, columns)
    except (TaskDataError, ModelLoadError) as exc:
        raise SystemExit(f"melos: {exc}") from None
    from flows.finetune import finetune_flow

    try:
        result = _run_flow(
            finetune_flow, "run the same command again",
            model_dir=model_dir, task=ns.task, task_type=ns.task_type, dev=ns.dev, test=ns.test, corpus=corpus,
            model_run_id=run_id, doc_ids=doc_ids, seeds=ns.seeds, baseline=ns.baseline, epochs=ns.epochs,
            max_steps=ns.max_steps, minutes=ns.minutes, learning_rate=ns.learning_rate, batch_size=ns.batch_size,
            seed=ns.seed, columns=columns,
            runtime=RuntimeConfig(device=ns.device, num_threads=ns.threads, compile=ns.compile),
            workdir=ns.workdir, experiment=ns.experiment,
        )
    except (TaskDataError, ModelLoadError, FileNotFoundError) as exc:
        raise SystemExit(f"melos: {str(exc).splitlines()[0]}") from None
    if isinstance(result, _StoppedExit):
        return result
    if ns.json:
        print(json.dumps({"mlflow_run_id": result["mlflow_run_id"], "model_run_id": result["model_run_id"],
                          "model_dir": result["model_dir"], "hf_dir": result["hf_dir"], "model_uri": result["model_uri"],
                          **result["metrics"]},
                         ensure_ascii=False, indent=2))
        return 0
    print(summary_text(result))
    return 0


def summary_text(result: dict) -> str:
    s, name = result["summary"], result["task"]
    lines = [f"MLflow run:  {result['mlflow_run_id']}", f"task:        {name} ({result['kind']}, split "
             f"{result['split'].get('method')}: train {result['split'].get('train')}, test {result['split'].get('test')})"]
    metric = "entity F1" if result["kind"] == "ner" else "macro F1"
    lines.append(f"pre-trained: {metric} {s['f1']:.4f} ± {s['f1_std']:.4f}, accuracy {s['accuracy']:.4f} "
                 f"± {s['accuracy_std']:.4f} ({s['seeds']} seeds)")
    if "random_f1" in s:
        lines.append(f"random init: {metric} {s['random_f1']:.4f} ± {s['random_f1_std']:.4f}, accuracy "
                     f"{s['random_accuracy']:.4f} ± {s['random_accuracy_std']:.4f}")
        lines.append(f"gain:        {s['gain']:+.4f} ({'beyond' if s['separated'] else 'within'} the seed spread)")
    if result.get("truncated"):
        lines.append(f"note:        {result['truncated']} example(s) were longer than the model's positions and "
                     "were truncated")
    lines.append(f"model:       {result['model_dir']}")
    lines.append(f"HF export:   {result['hf_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
