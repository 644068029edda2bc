"""The ``compare`` flow: one prepared dataset, a grid of training settings x seeds, one
child MLflow run per setting and seed under a comparison run, and a table and plots.

The data stages run once (cached as in ``pretrain``). Every setting trains for the same
steps on the same tokens with the same seeds (base seed, base seed + 1, ...), and is scored
with the same fixed evaluation masks, so differences can be read against the seed-to-seed
spread. Settings run one after another here, or, with ``deployment``, as flow runs of a
deployment of ``compare_setting`` (``run_deployment``) that a work pool runs in parallel;
the work directory must then be on storage every worker sees.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from mlm_core.config import DownloadConfig, EvalConfig, RuntimeConfig, TokenizeConfig, TrainConfig, VocabConfig
from mlm_core.download import download_key
from mlm_core.errors import UserError
from mlm_core.io import atomic_dir, fingerprint
from mlm_core.grid import (
    as_params, csv_table, describe, differences_table, kendall_tau, markdown_table, ranking, setting_jobs,
    summarise,
)
from mlm_core.shards import tokenize_key
from mlm_core.vocab import vocab_key
from tasks import tracking
from tasks.download import download_stage
from tasks.evaluate import evaluate_stage
from tasks.finetune import downstream_task
from tasks.tokenize import tokenize_stage
from tasks.train import train_run_dir, train_stage
from tasks.vocab import adopt_vocab_stage, adopted_key, vocab_stage

from .init_from import compare_train_config, init_tokenize_config, resolve_init
from .pretrain import data_stage

TAG_COMPARISON = "melos.comparison"
TAG_SETTING = "melos.setting"
TAG_MODEL_DIR = "melos.model_dir"
TAG_COMPARISON_KEY = "melos.comparison_key"  # the settings of a comparison, for --resume
TAG_RESUMED_FROM = "melos.resumed_from"
CONTROL_LABEL = "random init (control)"
TABLE_METRICS = (
    "eval/top1_accuracy", "eval/top5_accuracy", "eval/wwm_top1_accuracy", "eval/pseudo_perplexity", "eval/loss",
    "eval/unigram_top1_accuracy", "eval/pll_per_char",
)


@flow(name="compare-setting", description="Train and evaluate one setting of a comparison.")
def compare_setting(
    shards: dict, vocab: dict, train: TrainConfig, evaluate: EvalConfig, runtime: RuntimeConfig, workdir: str,
    comparison_run_id: str, label: str, init: dict | None = None, char_level: bool = False,
    downstream: list[str] | None = None, downstream_cfg: dict | None = None, resume: bool = False,
) -> dict:
    """Train ``train`` on the prepared data and evaluate it, in an MLflow run nested under
    ``comparison_run_id`` (tagged with the setting, for the MLflow UI's compare view); then
    fine-tune the model on each ``downstream`` task (``finetune/<task>/f1`` on the same run).
    ``init`` continues a checkpoint (``flows.init_from.resolve_init``); ``char_level`` adds the
    tokenizer-independent ``eval/pll_per_char`` (settings with different tokenizers). ``resume``:
    continue this setting's training from its checkpoints when an interrupted run left some."""
    client = tracking.client()
    parent = client.get_run(comparison_run_id)
    tags = {
        "mlflow.parentRunId": comparison_run_id, tracking.TAG_STAGE: "setting", TAG_COMPARISON: comparison_run_id,
        TAG_SETTING: label, "melos.seed": str(train.seed), tracking.TAG_FLOW_RUN: str(flow_run.id),
        tracking.TAG_FLOW_RUN_NAME: flow_run.name or "",
    }
    run_id = client.create_run(parent.info.experiment_id, run_name=f"{label} seed={train.seed}", tags=tags).info.run_id
    common = {"workdir": workdir, "parent_run_id": run_id}
    try:
        tracking.StageRun(run_id).log_params({"train": train.model_dump(), "evaluate": evaluate.model_dump()})
        resume = resume and (train_run_dir(shards, vocab, train, workdir, init) / "checkpoints").is_dir()
        trained = train_stage(shards=shards, vocab=vocab, cfg=train, runtime=runtime, resume=resume, init=init, **common)
        report = evaluate_stage(shards=shards, vocab=vocab, trained=trained, cfg=evaluate, runtime=runtime, init=init,
                                char_level=char_level, **common)
        tracking.StageRun(run_id).set_tags({TAG_MODEL_DIR: trained["model_dir"]})
        _complete_downstream(run_id, train.seed, downstream or [], downstream_cfg or {}, shards["dir"], runtime)
    except BaseException as exc:  # KILLED when stopped (Ctrl-C, SIGTERM), else FAILED
        tracking.end_run(run_id, tracking.end_status(exc))
        raise
    tracking.end_run(run_id, "FINISHED")
    return {"label": label, "seed": train.seed, "mlflow_run_id": run_id, "metrics": report["metrics"],
            "model_dir": trained["model_dir"]}


def comparison_key(grid, seeds: int, *configs) -> str:
    """What ``--resume`` matches comparisons by: the grid, the seeds and every stage's settings.
    Downstream fine-tuning is left out: resuming with other tasks or settings fine-tunes the
    finished models where they have no score made with them (each run records what its scores
    were made with). Runtime settings (device, threads) change speed only, and are left out too."""
    return fingerprint("compare", as_params(grid), seeds, *(c.model_dump() for c in configs))


class NothingToResume(UserError, FileNotFoundError):
    """``--resume`` found no earlier comparison with the same settings."""


def earlier_comparison(experiment: str, key: str) -> str | None:
    """The latest comparison run of ``experiment`` made with the settings ``key`` names."""
    tracking.check_reachable()
    tracking.ensure_store()
    client = tracking.client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`{TAG_COMPARISON_KEY}` = '{key}' and tags.`{TAG_COMPARISON}` = 'parent'")
    return runs[0].info.run_id if runs else None


def adopt_finished(earlier: str, parent: str) -> dict[tuple[str, int], str]:
    """Move the finished setting runs of the comparison ``earlier`` under ``parent`` (their
    metrics, models and stage runs as they are); returns their run ids by (label, seed)."""
    client = tracking.client()
    exp = client.get_run(earlier).info.experiment_id
    done = {}
    for r in client.search_runs([exp], filter_string=f"tags.`{TAG_COMPARISON}` = '{earlier}'", max_results=5000):
        if r.info.status != "FINISHED":
            continue
        for tag, value in (("mlflow.parentRunId", parent), (TAG_COMPARISON, parent), (TAG_RESUMED_FROM, earlier)):
            client.set_tag(r.info.run_id, tag, value)
        done[(r.data.tags[TAG_SETTING], int(r.data.tags["melos.seed"]))] = r.info.run_id
    client.set_tag(earlier, "melos.resumed_by", parent)
    return done


def _complete_downstream(run_id: str, seed: int, downstream: list[str], cfg: dict, corpus: str, runtime) -> None:
    """Fine-tune a setting run's model on each task it has no score for made with ``cfg``, and
    record the settings of each score (tag ``melos.downstream.<task>``; a score recorded
    without one, by an older Melos, is kept)."""
    from tasks.finetune import task_name

    client = tracking.client()
    run = client.get_run(run_id)
    made_with = fingerprint({k: v for k, v in cfg.items() if k not in ("seed", "seeds", "baseline")})
    for task_ref in downstream:
        name = task_name(task_ref)
        tag = f"melos.downstream.{name}"
        if f"finetune/{name}/f1" in run.data.metrics and run.data.tags.get(tag, made_with) == made_with:
            continue
        downstream_task(model_dir=run.data.tags[TAG_MODEL_DIR], task_ref=task_ref, corpus=corpus,
                        cfg={**cfg, "seeds": 1, "seed": seed, "baseline": "none"}, runtime=runtime, run_id=run_id)
        client.set_tag(run_id, tag, made_with)


def _fan_out(deployment: str, jobs: list[dict[str, Any]], poll_s: float = 2.0) -> None:
    """Start every job as a flow run of ``deployment`` at once, then wait until all end."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    started = [run_deployment(name=deployment, parameters=p, timeout=0) for p in jobs]
    logger.info("started %d flow runs of %s", len(started), deployment)
    pending = {fr.id: p["label"] for fr, p in zip(started, jobs)}
    failed = []
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(poll_s)
            for fr_id in list(pending):
                state = client.read_flow_run(fr_id).state
                if state is not None and state.is_final():
                    label = pending.pop(fr_id)
                    if not state.is_completed():
                        failed.append(f"{label} ({state.name}, flow run {fr_id})")
    if failed:
        raise RuntimeError(f"settings failed on the work pool: {'; '.join(failed)}; see their logs in the Prefect UI")


def collect_results(comparison_run_id: str) -> list[dict]:
    """Each finished setting run of the comparison, read back from MLflow (wherever it ran):
    label, seed, held-out metrics, and the training loss curve of its train stage."""
    client = tracking.client()
    parent = client.get_run(comparison_run_id)
    exp = [parent.info.experiment_id]
    runs = client.search_runs(exp, filter_string=f"tags.`{TAG_COMPARISON}` = '{comparison_run_id}'", max_results=5000,
                              order_by=["attributes.start_time ASC"])
    out = []
    for r in runs:
        if r.info.status != "FINISHED":
            continue
        [train_run] = client.search_runs(
            exp, filter_string=f"tags.mlflow.parentRunId = '{r.info.run_id}' and tags.`{tracking.TAG_STAGE}` = 'train'")
        history = client.get_metric_history(train_run.info.run_id, "train/loss")
        out.append({
            "label": r.data.tags[TAG_SETTING], "seed": int(r.data.tags["melos.seed"]), "mlflow_run_id": r.info.run_id,
            "metrics": {k: v for k, v in r.data.metrics.items() if k.startswith(("eval/", "finetune/"))},
            "model_dir": r.data.tags.get(TAG_MODEL_DIR),
            "loss_history": sorted([m.step, m.value] for m in history),
        })
    return out


@flow(name="compare", description="Compare training settings on one prepared dataset, over several seeds.")
def compare(
    grid: dict[str, list] | list[dict[str, Any]],
    seeds: int = 1,
    download: DownloadConfig = DownloadConfig(),
    tokenize: TokenizeConfig = TokenizeConfig(),
    vocab: VocabConfig = VocabConfig(),
    train: TrainConfig = TrainConfig(),
    evaluate: EvalConfig = EvalConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    workdir: str = "melos-work",
    experiment: str = "melos-compare",
    deployment: str | None = None,
    downstream: list[str] | None = None,
    downstream_cfg: dict | None = None,
    resume: bool = False,
) -> dict:
    """Prepare the data once, train and evaluate every setting x seed, and report.

    Args:
        grid: training setting name -> values to try (every combination is a setting), or a list
            of settings, each a mapping of the fields it changes ({} = the shared settings alone).
        seeds: runs per setting, with seeds train.seed, train.seed + 1, ...
        download: corpus sources. tokenize: sentence split and held-out share. vocab: WordPiece vocabulary.
        train: the settings every run shares (the grid overrides its fields).
        evaluate: the fixed evaluation masks. runtime: device and threads (speed only).
        workdir: stage outputs (shared storage when fanning out).
        experiment: MLflow experiment of the comparison run and its children.
        deployment: 'FLOW/DEPLOYMENT' of compare_setting to fan the settings out to (None: one after another here).
        downstream: tasks to fine-tune every trained model on (a file, aozora-authors, aozora-pos); the
            same architecture from random weights is fine-tuned with each seed as the control row.
        downstream_cfg: fine-tuning settings (epochs, max_steps, learning_rate, batch_size, ...).
        resume: continue the latest earlier comparison with these same settings: its finished runs
            join this comparison as they are (fine-tuned on any ``downstream`` task they lack), an
            interrupted one continues from its checkpoints, the rest train.
    """
    logger = get_run_logger()
    jobs_cfg = setting_jobs(train, grid, seeds)  # bad grids fail before any work
    workdir = str(Path(workdir).resolve())
    key = comparison_key(grid, seeds, download, tokenize, vocab, train, evaluate)
    earlier = earlier_comparison(experiment, key) if resume else None
    if resume and earlier is None:
        raise NothingToResume(f"--resume: no earlier comparison with these settings in experiment {experiment!r}; "
                              "give the interrupted comparison's options, or run without --resume")
    parent = tracking.start_parent(
        experiment, run_name=flow_run.name or "compare",
        tags={tracking.TAG_FLOW_RUN: str(flow_run.id), tracking.TAG_FLOW_RUN_NAME: flow_run.name or "",
              tracking.TAG_STAGE: "compare", TAG_COMPARISON: "parent", TAG_COMPARISON_KEY: key,
              **({TAG_RESUMED_FROM: earlier} if earlier else {})},
    )
    logger.info("comparison run %s: %d settings x %d seeds", parent, len(jobs_cfg) // seeds, seeds)
    inits = _resolve_inits(jobs_cfg, workdir)
    common = {"workdir": workdir, "parent_run_id": parent}
    try:
        done = adopt_finished(earlier, parent) if earlier else {}
        if earlier:
            logger.info("resuming comparison %s: %d of %d runs had finished and join this one as they are",
                        earlier, len(done), len(jobs_cfg))
        tracking.StageRun(parent).log_params(
            {"grid": as_params(grid), "seeds": seeds, "train": train.model_dump(),
             "evaluate": evaluate.model_dump(), "download": download.model_dump(), "workdir": workdir,
             "downstream": downstream or [], "downstream_cfg": downstream_cfg or {}}
        )
        documents = data_stage(download_stage, "download", download_key(download), cfg=download, **common)
        prepared = {}  # starting point -> (shards, vocabulary): each tokenizer's own data stages
        for source, init in inits.items():
            cfg_tok = tokenize if init is None else init_tokenize_config(tokenize, init)
            shards = data_stage(tokenize_stage, "tokenize", tokenize_key(documents["fingerprint"], cfg_tok),
                                documents=documents, cfg=cfg_tok, **common)
            if init is None:
                vocabulary = data_stage(vocab_stage, "vocab", vocab_key(shards["fingerprint"], vocab), shards=shards,
                                        cfg=vocab, **common)
            else:
                vocabulary = data_stage(adopt_vocab_stage, "vocab", adopted_key(shards, init), shards=shards,
                                        init=init, **common)
            prepared[source] = (shards, vocabulary)
        char_level = len({v["fingerprint"] for _, v in prepared.values()}) > 1  # tokenizers differ
        jobs = [
            {"shards": prepared[source][0], "vocab": prepared[source][1],
             "train": cfg if inits[source] is None else compare_train_config(cfg, inits[source]),
             "evaluate": evaluate, "runtime": runtime, "workdir": workdir, "comparison_run_id": parent,
             "label": label, "init": inits[source], "char_level": char_level, "downstream": downstream or [],
             "downstream_cfg": downstream_cfg or {}, "resume": bool(earlier)}
            for label, seed, cfg, source in jobs_cfg if (label, seed) not in done
        ]
        source_of = {label: source for label, _, _, source in jobs_cfg}
        for (label, seed), run_id in done.items():  # tasks added to --downstream since those runs finished
            _complete_downstream(run_id, seed, downstream or [], downstream_cfg or {},
                                 prepared[source_of[label]][0]["dir"], runtime)
        if deployment:
            _fan_out(deployment, [{**j, "train": j["train"].model_dump(), "evaluate": j["evaluate"].model_dump(),
                                   "runtime": j["runtime"].model_dump()} for j in jobs])
        else:
            for j in jobs:
                compare_setting(**j)
        results = collect_results(parent)
        order = {label: i for i, (label, *_) in enumerate(jobs_cfg)}
        results.sort(key=lambda r: (order.get(r["label"], len(order)), r["seed"]))
        first_shards = prepared[jobs_cfg[0][3]][0]  # the control uses the first setting's architecture and data
        controls = _controls(parent, results, downstream or [], downstream_cfg or {}, first_shards, train, seeds,
                             runtime)
        report = _report(parent, results, grid, seeds, train, workdir, char_level, controls)
    except BaseException as exc:  # KILLED when stopped (Ctrl-C, SIGTERM), else FAILED
        tracking.end_run(parent, tracking.end_status(exc))
        raise
    tracking.end_run(parent, "FINISHED")
    return {"mlflow_run_id": parent, "runs": results, "controls": controls, **report}


def _resolve_inits(jobs_cfg: list, workdir: str) -> dict[str | None, dict | None]:
    """Each distinct starting point of the grid, checked and described (None: random weights)."""
    out: dict[str | None, dict | None] = {}
    for *_, source in jobs_cfg:
        if source not in out:
            out[source] = None if source is None else resolve_init(source, workdir)
    return out


def _controls(parent: str, results: list[dict], downstream: list[str], cfg: dict, shards: dict, train: TrainConfig,
              seeds: int, runtime: RuntimeConfig) -> list[dict]:
    """The random-init control of every downstream task: the first setting's architecture from
    random weights, fine-tuned with each seed; as result rows labelled ``CONTROL_LABEL``."""
    model_dir = next((r["model_dir"] for r in results if r.get("model_dir")), None)
    if not downstream or model_dir is None:
        return []
    per_seed: list[dict] = [{} for _ in range(seeds)]
    for task_ref in downstream:
        out = downstream_task(model_dir=model_dir, task_ref=task_ref, corpus=shards["dir"],
                              cfg={**cfg, "seeds": seeds, "seed": train.seed, "baseline": "random"},
                              runtime=runtime, run_id=parent, control=True)
        for i, m in enumerate(out["per_seed"]):
            per_seed[i].update(m)
    return [{"label": CONTROL_LABEL, "seed": train.seed + i, "metrics": m} for i, m in enumerate(per_seed)]


def reading(rows: list[dict], setting_rows: list[dict], mlm: list[str], downstream: list[str]) -> list[str]:
    """Markdown lines on what the table says: each row against the first setting, beyond the
    noise or not, and (with downstream scores) whether the downstream and masked-LM rankings agree."""
    out = []
    if len(rows) > 1:
        out += ["## Against the first setting", "",
                f"Each row's mean minus that of '{rows[0]['setting']}'; **beyond** the noise when the two "
                "mean ± spread intervals do not overlap (a screen, not a significance test), within it otherwise.",
                "", differences_table(rows, mlm + downstream), ""]
    if downstream and mlm and len(setting_rows) > 1:
        out += ["## Do the downstream and masked-LM rankings agree?", ""]
        out += [f"- by `{m}`: {ranking(setting_rows, m)}" for m in mlm + downstream]
        out += [f"- Kendall τ of `{d}` against `{m}`: {kendall_tau(setting_rows, m, d):+.2f}"
                for d in downstream for m in mlm]
        out += ["- τ = 1 is the same order, −1 the reverse; settings whose difference is within the noise may "
                "change places with other seeds", ""]
    return out


def _report(parent: str, results: list[dict], grid: dict | list, seeds: int, train: TrainConfig, workdir: str,
            char_level: bool = False, controls: list[dict] | None = None) -> dict:
    from tasks.compare_plots import accuracy_bars, downstream_bars, loss_curves, pos_bars

    metrics = [m for m in TABLE_METRICS if any(m in r["metrics"] for r in results)]
    metrics += sorted({k for r in results for k in r["metrics"] if k.startswith("finetune/")})
    pos = sorted({k for r in results for k in r["metrics"] if k.startswith("eval/pos/")})
    rows = summarise(results, metrics + pos)
    setting_rows = list(rows)
    if controls:
        rows += summarise(controls, metrics + pos)
    table = markdown_table(rows, metrics)
    steps = train.max_steps if train.max_steps else f"{train.epochs:g} epochs"
    md = "\n".join([
        "# Melos comparison", "",
        f"- **grid**: {describe(grid)}",
        f"- **seeds per setting**: {seeds} (from {train.seed}); **budget per run**: {steps} steps, same data and masks for evaluation",
        ("- values are mean ± sample standard deviation over seeds; a difference smaller than the spreads is noise"
         if seeds > 1 else "- one seed per setting: no spread to tell a difference from noise (--seeds 3 gives one)"),
        *(["- the settings use different tokenizers (vocabularies or word splitters), so the subword scores (top-1, "
           "top-5, loss, pseudo-perplexity) count different units; compare them at the character level with "
           "`pll_per_char`: the pseudo-log-likelihood (word-l2r) of the same held-out sentences divided by their "
           "characters (higher is better), which no tokenizer changes"] if char_level else []),
        *([f"- **downstream**: `finetune/<task>/f1` is the test F1 after fine-tuning each model (macro F1; entity F1 "
           f"for NER); the row '{CONTROL_LABEL}' fine-tunes the same architecture from random weights"]
          if controls else []),
        "", table, "",
        *reading(rows, setting_rows,
                 [m for m in ("eval/top1_accuracy", "eval/pseudo_perplexity", "eval/pll_per_char") if m in metrics],
                 [m for m in metrics if m.startswith("finetune/") and m.endswith("/f1")]),
    ])
    run = tracking.StageRun(parent)
    # kept in the work directory too, so the command can name files a person can open
    out = Path(workdir) / "compare" / parent
    with atomic_dir(out) as tmp:
        (tmp / "comparison.md").write_text(md, encoding="utf-8")
        (tmp / "comparison.csv").write_text(csv_table(rows, metrics + pos), encoding="utf-8")
        loss_curves(results, tmp / "loss_curves.png")
        accuracy_bars(setting_rows, tmp / "accuracy.png")
        pos_bars(setting_rows, tmp / "pos_accuracy.png")
        if any(m.startswith("finetune/") for m in metrics):
            downstream_bars(rows, [m for m in metrics if m.startswith("finetune/") and m.endswith("/f1")],
                            tmp / "downstream.png")
    for f in sorted(out.iterdir()):
        run.log_artifact(f, "comparison")
    url = tracking.run_url(parent)
    create_markdown_artifact(
        markdown=(f"**MLflow comparison run:** `{parent}`" + (f" ([open in MLflow]({url}))" if url else "")
                  + "\n\n" + md + "\nPlots (loss curves, accuracy, per-POS accuracy) are in the MLflow run's "
                  "`comparison/` artifacts."),
        key="melos-comparison", description="Comparison of training settings",
    )
    return {"table": table, "markdown": md, "rows": rows, "dir": str(out)}
