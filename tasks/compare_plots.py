"""PNG plots of a comparison (matplotlib, headless): loss curves, held-out accuracy per
setting with its seed spread, accuracy per part of speech."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlm_core.evaluate import POS_NAMES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: Path, title: str, ylabel: str, legend_size: int = 8) -> Path:
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_curves(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Training loss against step, one line per run, one colour per setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colours: dict[str, Any] = {}
    for r in results:
        steps = [p[0] for p in r["loss_history"]]
        losses = [p[1] for p in r["loss_history"]]
        colour = colours.setdefault(r["label"], f"C{len(colours) % 10}")
        ax.plot(steps, losses, color=colour, alpha=0.8, linewidth=1,
                label=r["label"] if r["label"] not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xlabel("optimizer step")
    return _finish(plt, fig, ax, path, "Training loss per setting (one line per seed)", "training loss (masked tokens)")


def accuracy_bars(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Held-out top-1 accuracy (fixed 15% token mask, and whole-word) per setting, mean ±
    seed spread, with the unigram baseline as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 5))
    x = range(len(rows))
    width = 0.38
    ax.bar([i - width / 2 for i in x], [r["eval/top1_accuracy"] for r in rows], width,
           yerr=[r["eval/top1_accuracy:spread"] for r in rows], capsize=4, label="top-1, 15% token mask")
    if all(r.get("eval/wwm_top1_accuracy") == r.get("eval/wwm_top1_accuracy") for r in rows):  # no NaN
        ax.bar([i + width / 2 for i in x], [r["eval/wwm_top1_accuracy"] for r in rows], width,
               yerr=[r["eval/wwm_top1_accuracy:spread"] for r in rows], capsize=4, label="top-1, whole-word mask")
    base = rows[0]["eval/unigram_top1_accuracy"] if rows else 0.0
    ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="unigram baseline (token mask)")
    ax.set_xticks(list(x), [r["setting"] for r in rows], rotation=20, ha="right", fontsize=8)
    return _finish(plt, fig, ax, path, "Held-out accuracy per setting (mean ± spread over seeds)",
                   "held-out top-1 accuracy")


def pos_bars(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Top-1 accuracy per part of speech (English class names), one bar group per class."""
    plt = _pyplot()
    classes = [name for _, name in POS_NAMES if all(f"eval/pos/{name}/top1_accuracy" in r for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(classes) * max(1, len(rows)) / 2), 5))
    width = 0.8 / max(1, len(rows))
    for j, r in enumerate(rows):
        ax.bar([i + j * width for i in range(len(classes))], [r[f"eval/pos/{c}/top1_accuracy"] for c in classes],
               width, label=r["setting"])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes, rotation=30, ha="right", fontsize=8)
    return _finish(plt, fig, ax, path, "Accuracy per part of speech (mean over seeds)", "held-out top-1 accuracy", 7)


def downstream_bars(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: Path) -> Path:
    """Downstream test F1 per setting (the random-init control included), one bar group per task,
    mean ± seed spread."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * max(1, len(metrics))), 5))
    width = 0.8 / max(1, len(rows))
    for j, r in enumerate(rows):
        ax.bar([i + j * width for i in range(len(metrics))], [r[m] for m in metrics], width,
               yerr=[r[f"{m}:spread"] for m in metrics], capsize=3, label=r["setting"])
    names = [m.removeprefix("finetune/").removesuffix("/f1") for m in metrics]
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], names, fontsize=8)
    return _finish(plt, fig, ax, path, "Downstream test F1 after fine-tuning (mean ± spread over seeds)",
                   "test F1", 7)
