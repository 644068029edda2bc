"""Comparison grids: ``FIELD=V1,V2`` specs (or a YAML mapping) -> the TrainConfig of each
setting and seed, and the mean ± spread of their metrics.

Pure functions: no Prefect, no MLflow, no plotting.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from .config import TrainConfig

# FIELD -> values (a full factorial grid), or settings listed one by one.
Grid = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]

# What a grid may not vary: compute must be the same for every setting, seeds come from --seeds.
NOT_GRIDDABLE = ("seed", "max_steps", "epochs", "budget_minutes", "checkpoint_every", "keep_checkpoints", "log_every")


def parse_grid_arg(text: str) -> tuple[str, list[str]]:
    """``mask_rate=0.15,0.3`` -> ("mask_rate", ["0.15", "0.3"]), with a one-line error."""
    field, sep, values = text.partition("=")
    field = field.strip().replace("-", "_")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not field or not items:
        raise ValueError(f"--grid {text!r} is not FIELD=V1,V2,...; e.g. --grid mask_rate=0.15,0.3,0.4")
    return field, items


# Not a training setting but the starting point: "none" (random weights) or an --init-from SOURCE.
INIT_FIELD = "init_from"


def init_value(value: Any) -> str | None:
    """An ``init_from`` grid value: None for from-scratch ("none", empty), else the SOURCE."""
    text = "" if value is None else str(value).strip()
    return None if text.lower() in ("", "none", "null", "scratch") else text


def _check_field(field: str) -> None:
    if field == INIT_FIELD:
        return
    if field not in TrainConfig.model_fields:
        raise ValueError(
            f"--grid {field}: not a training setting; use one of {', '.join(sorted(TrainConfig.model_fields))}"
        )
    if field in NOT_GRIDDABLE:
        raise ValueError(
            f"--grid {field}: every setting gets the same steps and seeds; set it for all runs "
            f"(e.g. --max-steps, --seeds) instead"
        )


def check_grid(grid: Grid) -> dict[str, list[Any]] | list[dict[str, Any]]:
    """A mapping FIELD -> values (every combination is a setting), or a list of settings given
    one by one (``[{}, {mask_rate: 0.3}, {whole_word: true}]``: ``{}`` is the shared settings
    alone). Field names must be TrainConfig's; no compute-changing field."""
    if not grid:
        raise ValueError("the grid is empty: give at least one --grid FIELD=V1,V2 (or a --grid-file)")
    if not isinstance(grid, Mapping):
        listed = []
        for item in grid:
            if not isinstance(item, Mapping):
                raise ValueError(f"a listed setting must be a mapping FIELD: VALUE, got {item!r}")
            setting = {str(k).replace("-", "_"): v for k, v in item.items()}  # mask-rate as the flag spells it
            for field in setting:
                _check_field(field)
            listed.append(setting)
        labels = [label(s) for s in listed]
        if len(set(labels)) != len(labels):
            raise ValueError(f"the listed settings repeat one: {', '.join(labels)}")
        return listed
    out = {}
    for field, values in grid.items():
        field = str(field).replace("-", "_")
        _check_field(field)
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ValueError(f"--grid {field}: give at least one value")
        out[field] = values
    return out


def describe(grid: Grid) -> str:
    """One line for reports: ``mask_rate = [0.15, 0.3]`` or the listed settings."""
    if isinstance(grid, Mapping):
        return ", ".join(f"{k} = {list(v)}" for k, v in grid.items())
    return "settings " + "; ".join(label(s) for s in grid)


def as_params(grid: Grid) -> dict[str, list[str]] | list[dict[str, str]]:
    """The grid with values as strings, for MLflow params."""
    if isinstance(grid, Mapping):
        return {k: list(map(str, v)) for k, v in grid.items()}
    return [{k: str(v) for k, v in s.items()} for s in grid]


def settings(grid: Grid) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order given (a list: its settings)."""
    if not isinstance(grid, Mapping):
        return [dict(s) for s in grid]
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def label(setting: Mapping[str, Any]) -> str:
    """``mask_rate=0.3 masking=static``; ``baseline`` for the shared settings alone."""
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "baseline"


def setting_configs(base: TrainConfig, grid: Grid, seeds: int) -> list[tuple[str, int, TrainConfig]]:
    """(label, seed, config) of each setting x seed; seeds are base.seed, base.seed + 1, ...
    so every setting sees the same seeds. Invalid values fail here, before any training."""
    return [(name, seed, cfg) for name, seed, cfg, _ in setting_jobs(base, grid, seeds)]


def setting_jobs(base: TrainConfig, grid: Grid, seeds: int) -> list[tuple[str, int, TrainConfig, str | None]]:
    """``setting_configs`` with each setting's starting point (``init_from``: None = random weights)."""
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if base.budget_minutes is not None:
        raise ValueError(
            "compare gives every setting the same number of steps: use --max-steps or --epochs, not --budget-minutes"
        )
    out = []
    for setting in settings(check_grid(grid)):
        init = init_value(setting.get(INIT_FIELD))
        train_setting = {k: v for k, v in setting.items() if k != INIT_FIELD}
        for s in range(seeds):
            values = {**base.model_dump(), **train_setting, "seed": base.seed + s}
            try:
                cfg = TrainConfig(**values)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"setting {label(setting)}: {first['msg'].removeprefix('Value error, ')}") from None
            out.append((label(setting), base.seed + s, cfg, init))
    return out


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(results: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Rows per setting label (first-seen order): runs, then mean and spread of each metric."""
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    rows = []
    for name, runs in by_label.items():
        row: dict[str, Any] = {"setting": name, "runs": len(runs)}
        for m in metrics:
            row[m], row[f"{m}:spread"] = mean_spread([r["metrics"].get(m, math.nan) for r in runs])
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    head = ["setting", "runs", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["setting"]), str(row["runs"])]
        # one run has no spread: say n=1 rather than a "± 0.0000" that reads as certainty
        cells += ["–" if math.isnan(row[m]) else f"{row[m]:.4f} ± {row[f'{m}:spread']:.4f}" if row["runs"] > 1
                  else f"{row[m]:.4f} (n=1)" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["setting", "runs", *(x for m in metrics for x in (m, f"{m}_spread"))])
    for row in rows:
        writer.writerow([row["setting"], row["runs"], *(f"{row[x]:.6g}" for m in metrics for x in (m, f"{m}:spread"))])
    return buf.getvalue()


# ----------------------------------------------------------------------------- reading a comparison

LOWER_IS_BETTER = ("eval/pseudo_perplexity", "eval/loss")


def beyond_noise(a: Mapping[str, Any], b: Mapping[str, Any], metric: str) -> bool | None:
    """Whether two summary rows differ in ``metric`` by more than their spreads together (their
    mean ± spread intervals do not overlap, the rule ``melos finetune`` uses for its gain);
    None when either side has a single run or no value (nothing to judge the noise by)."""
    values = (a.get(metric, math.nan), b.get(metric, math.nan))
    if a["runs"] < 2 or b["runs"] < 2 or any(math.isnan(v) for v in values):
        return None
    return abs(values[0] - values[1]) > a[f"{metric}:spread"] + b[f"{metric}:spread"]


def differences_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """Markdown: every later row against the first (the baseline), per metric the difference of
    the means, marked **beyond** the noise or within it (``beyond_noise``)."""
    base = rows[0]
    lines = ["| setting | " + " | ".join(f"Δ {m}" for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for row in rows[1:]:
        cells = []
        for m in metrics:
            diff = row.get(m, math.nan) - base.get(m, math.nan)
            verdict = beyond_noise(row, base, m)
            cells.append("–" if math.isnan(diff) else f"{diff:+.4f} " + (
                "(n=1)" if verdict is None else "**beyond**" if verdict else "within"))
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sign(metric: str, x: float, y: float) -> int:
    """1 when ``x`` is the better value of ``metric``, -1 when ``y`` is, 0 on a tie."""
    if x == y:
        return 0
    return 1 if (x < y) == (metric in LOWER_IS_BETTER) else -1


def ranking(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    """The settings from best to worst by the mean of ``metric``: "a > b = c" (rows without it left out)."""
    scored = sorted((r for r in rows if not math.isnan(r.get(metric, math.nan))), key=lambda r: r[metric],
                    reverse=metric not in LOWER_IS_BETTER)
    text = ""
    for prev, row in zip([None, *scored], scored):
        if prev is not None:
            text += " = " if _sign(metric, prev[metric], row[metric]) == 0 else " > "
        text += str(row["setting"])
    return text


def kendall_tau(rows: Sequence[Mapping[str, Any]], metric_a: str, metric_b: str) -> float:
    """Rank agreement of the settings' means of two metrics (each the right way round): 1 the same
    order, -1 reversed, ~0 unrelated (Kendall's tau-a: a pair tied in either counts 0)."""
    both = [r for r in rows if not math.isnan(r.get(metric_a, math.nan)) and not math.isnan(r.get(metric_b, math.nan))]
    pairs = [(x, y) for i, x in enumerate(both) for y in both[i + 1:]]
    if not pairs:
        return math.nan
    return sum(_sign(metric_a, x[metric_a], y[metric_a]) * _sign(metric_b, x[metric_b], y[metric_b])
               for x, y in pairs) / len(pairs)
