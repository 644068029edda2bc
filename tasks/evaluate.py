"""Prefect task of stage 5: held-out metrics, fill-mask examples, JSON/Markdown report."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mlm_core.checkpoint import load_pretrained
from mlm_core.config import EvalConfig, RuntimeConfig
from mlm_core.evaluate import (
    class_unigram_counts,
    evaluate_heldout,
    fill_mask,
    render_markdown,
    unigram_counts,
    write_report,
)
from mlm_core.pll import pll_per_character
from mlm_core.train import configure_threads, resolve_device

from .common import stage_progress
from .tracking import StageRun, run_url, stage_run
from .train import encoded_split, load_tokenizer


INITIAL = "eval/initial_"


def heldout_texts(shards: dict, cfg: EvalConfig) -> list[str]:
    """A fixed, seeded sample of held-out sentence texts (``pll_sentences`` of them, 64 when 0):
    the same sentences for any tokenizer, as the split hashes the texts."""
    from mlm_core.data import eval_sample
    from mlm_core.io import read_json
    from mlm_core.shards import iter_rows, shard_paths

    from .common import MANIFEST

    paths = shard_paths(Path(shards["dir"]), "heldout", read_json(Path(shards["dir"]) / MANIFEST))
    texts = [t for batch in iter_rows(paths, ["text"]) for t in batch.column(0).to_pylist()]
    chosen = eval_sample(len(texts), cfg.pll_sentences or 64, cfg.seed + 2)
    return texts if chosen is None else [texts[i] for i in chosen]  # the starting checkpoint's scores, before continued pre-training


def before_after(initial: dict, after: dict) -> str:
    """``top-1 0.410 → 0.550, top-5 ..., loss 6.10 → 4.20``: the checkpoint before and after."""
    parts = []
    for name, key, fmt in (("top-1", "top1_accuracy", ".3f"), ("top-5", "top5_accuracy", ".3f"), ("loss", "loss", ".3f")):
        if f"{INITIAL}{key}" in initial and f"eval/{key}" in after:
            parts.append(f"{name} {initial[INITIAL + key]:{fmt}} → {after['eval/' + key]:{fmt}}")
    return ", ".join(parts)


@task(name="evaluate-initial", cache_policy=NO_CACHE, persist_result=False)
def initial_evaluate_stage(
    shards: dict, vocab: dict, init: dict, cfg: EvalConfig, runtime: RuntimeConfig, workdir: str, parent_run_id: str,
) -> dict:
    """Score the starting checkpoint, untouched, on the held-out split with the same fixed masks
    the trained model meets later; logged as ``eval/initial_*``."""
    from mlm_core.hf_import import load_init

    logger = get_run_logger()
    configure_threads(runtime.num_threads)
    device, _ = resolve_device(runtime)
    model, _ = load_init(init["dir"], device)
    max_length = model.config.max_position_embeddings  # as evaluate_stage: the same encoded held-out split
    tokenizer = load_tokenizer(vocab)
    train_corpus = encoded_split(shards, vocab, tokenizer, "train", max_length, workdir)
    heldout = encoded_split(shards, vocab, tokenizer, "heldout", max_length, workdir)
    with stage_run(parent_run_id, "evaluate-initial", {"melos.init_from": init["source"]}) as run:
        run.log_params(cfg.model_dump(), "evaluate")
        with stage_progress("evaluate-initial", "tokens") as progress:
            scores = evaluate_heldout(
                model, tokenizer, heldout, unigram_counts(train_corpus, len(tokenizer)), cfg, device,
                train_class_counts=class_unigram_counts(train_corpus, len(tokenizer)), progress=progress,
            )
        metrics = {INITIAL + k.removeprefix("eval/"): v for k, v in scores.items()}
        run.log_metrics(metrics)
        StageRun(parent_run_id).log_metrics(metrics)
    logger.info("starting checkpoint %s: held-out top-1 %.4f, top-5 %.4f, loss %.4f", init["source"],
                metrics[INITIAL + "top1_accuracy"], metrics[INITIAL + "top5_accuracy"], metrics[INITIAL + "loss"])
    return {"stage": "evaluate-initial", "metrics": metrics, "mlflow_run_id": run.run_id}


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_stage(
    shards: dict, vocab: dict, trained: dict, cfg: EvalConfig, runtime: RuntimeConfig, workdir: str,
    parent_run_id: str, initial: dict | None = None, init: dict | None = None, char_level: bool = False,
) -> dict:
    logger = get_run_logger()
    configure_threads(runtime.num_threads)
    device, _ = resolve_device(runtime)
    model, _ = load_pretrained(trained["model_dir"], device)
    max_length = model.config.max_position_embeddings
    tokenizer = load_tokenizer(vocab)  # the model's own vocab.txt is this file; keep the stage's settings
    train_corpus = encoded_split(shards, vocab, tokenizer, "train", max_length, workdir)
    heldout = encoded_split(shards, vocab, tokenizer, "heldout", max_length, workdir)
    with stage_run(parent_run_id, "evaluate") as run:
        run.log_params(cfg.model_dump(), "evaluate")
        with stage_progress("evaluate", "tokens") as progress:
            metrics = evaluate_heldout(
                model, tokenizer, heldout, unigram_counts(train_corpus, len(tokenizer)), cfg, device,
                train_class_counts=class_unigram_counts(train_corpus, len(tokenizer)), progress=progress,
            )
        if char_level:  # a score that does not depend on the tokenizer (compare across tokenizers)
            metrics.update(pll_per_character(model, tokenizer, heldout_texts(shards, cfg), device))
        examples = [  # words split by the tokenizer's own splitter (the checkpoint's, with --init-from)
            {"text": text, "predictions": fill_mask(model, tokenizer, text, cfg.top_k, None, device)}
            for text in cfg.fill_mask_examples
        ]
        context = {
            "MLflow parent run": parent_run_id,
            "MLflow evaluate run": run.run_id,
            "model": trained["model_dir"],
            "eval mask": (
                f"{cfg.mask_rate:.0%} of held-out tokens, all replaced by [MASK], seed {cfg.seed}, "
                f"{cfg.passes} pass(es) with distinct fixed masks"
            ),
        }
        if init is not None:
            context["continued from"] = init["source"] + (f" (license: {init['license']})" if init.get("license") else "")
        if initial is not None:
            context["held-out, checkpoint before → after"] = before_after(initial["metrics"], metrics)
        out_dir = Path(trained["dir"]) / "eval"
        json_path, md_path = write_report(out_dir, metrics, examples, context)
        run.log_metrics(metrics)
        run.log_artifact(json_path)
        run.log_artifact(md_path)
        parent = StageRun(parent_run_id)  # the parent carries the headline numbers for run comparison
        parent.log_metrics(metrics)
        parent.log_artifact(md_path)
        logger.info(
            "held-out top-1 %.4f (unigram %.4f), top-5 %.4f, loss %.4f, ppl %.2f",
            metrics["eval/top1_accuracy"], metrics["eval/unigram_top1_accuracy"], metrics["eval/top5_accuracy"],
            metrics["eval/loss"], metrics["eval/perplexity"],
        )
        for ex in examples:
            logger.info("fill-mask %s -> %s", ex["text"], ", ".join(t for t, _ in ex["predictions"][0]))
    url = run_url(parent_run_id)
    link = f" ([open in MLflow]({url}))" if url else ""
    create_markdown_artifact(
        markdown=f"**MLflow run id:** `{parent_run_id}`{link}\n\n" + render_markdown(metrics, examples, context),
        key="melos-evaluation",
        description="Held-out masked-LM evaluation of the pretrain flow run",
    )
    return {
        "stage": "evaluate",
        "dir": str(out_dir),
        "metrics": metrics,
        "fill_mask": examples,
        "report": str(md_path),
        "mlflow_run_id": run.run_id,
        "initial_metrics": initial["metrics"] if initial else None,
    }


@task(name="score-corpus", cache_policy=NO_CACHE, persist_result=False)
def score_corpus(shards: dict, model_dir: str, cfg: EvalConfig, runtime: RuntimeConfig, workdir: str,
                 parent_run_id: str) -> dict:
    """A trained model's metrics on every sentence of a tokenized corpus (both splits), with
    the model's own vocabulary; logged to ``parent_run_id`` and written as a report."""
    from mlm_core.data import EncodedCorpus, encode_key, encode_shards
    from mlm_core.io import fingerprint, read_json
    from mlm_core.shards import shard_paths
    from mlm_core.vocab import VOCAB_FILE

    from .common import MANIFEST

    logger = get_run_logger()
    configure_threads(runtime.num_threads)
    device, _ = resolve_device(runtime)
    model, tokenizer = load_pretrained(model_dir, device)
    max_length = model.config.max_position_embeddings
    vocab_fp = fingerprint("model-vocab", (Path(model_dir) / VOCAB_FILE).read_text(encoding="utf-8"))
    manifest = read_json(Path(shards["dir"]) / MANIFEST)
    paths = [p for split in ("train", "heldout") for p in shard_paths(Path(shards["dir"]), split, manifest)]
    key = encode_key(shards["fingerprint"], vocab_fp, "all", max_length)
    corpus = EncodedCorpus(encode_shards(paths, tokenizer, Path(workdir) / "encoded" / key, max_length, key))
    with stage_progress("evaluate", "tokens") as progress:
        metrics = evaluate_heldout(
            model, tokenizer, corpus, unigram_counts(corpus, len(tokenizer)), cfg, device,
            train_class_counts=class_unigram_counts(corpus, len(tokenizer)), progress=progress,
        )
    context = {
        "MLflow run": parent_run_id,
        "model": model_dir,
        "corpus": f"{len(corpus)} sequences / {corpus.num_tokens} tokens (both splits of {shards['dir']})",
        "unigram baselines": "fitted on the evaluated corpus itself",
        "eval mask": (f"{cfg.mask_rate:.0%} of tokens, all replaced by [MASK], seed {cfg.seed}, "
                      f"{cfg.passes} pass(es) with distinct fixed masks"),
    }
    out_dir = Path(workdir) / "evaluations" / parent_run_id
    json_path, md_path = write_report(out_dir, metrics, [], context)
    run = StageRun(parent_run_id)
    run.log_metrics(metrics)
    run.log_artifact(json_path)
    run.log_artifact(md_path)
    logger.info("top-1 %.4f (unigram %.4f) on %d masked tokens", metrics["eval/top1_accuracy"],
                metrics["eval/unigram_top1_accuracy"], metrics["eval/masked_tokens"])
    return {"metrics": metrics, "report": str(md_path)}
