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


def check_grid(grid: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    """Field names must be TrainConfig's; at least one value each; no compute-changing field."""
    if not grid:
        raise ValueError("the grid is empty: give at least one --grid FIELD=V1,V2 (or a --grid-file)")
    fields = TrainConfig.model_fields
    out = {}
    for field, values in grid.items():
        if field not in fields:
            raise ValueError(
                f"--grid {field}: not a training setting; use one of {', '.join(sorted(fields))}"
            )
        if field in NOT_GRIDDABLE:
            raise ValueError(
                f"--grid {field}: every setting gets the same steps and seeds; set it for all runs "
                f"(e.g. --max-steps, --seeds) instead"
            )
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ValueError(f"--grid {field}: give at least one value")
        out[field] = values
    return out


def settings(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order given."""
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def label(setting: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def setting_configs(base: TrainConfig, grid: Mapping[str, Sequence[Any]], seeds: int) -> list[tuple[str, int, TrainConfig]]:
    """(label, seed, config) of each setting x seed; seeds are base.seed, base.seed + 1, ...
    so every setting sees the same seeds. Invalid values fail here, before any training."""
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if base.budget_minutes is not None:
        raise ValueError(
            "compare gives every setting the same number of steps: use --max-steps or --epochs, not --budget-minutes"
        )
    out = []
    for setting in settings(check_grid(grid)):
        for s in range(seeds):
            values = {**base.model_dump(), **setting, "seed": base.seed + s}
            try:
                cfg = TrainConfig(**values)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"setting {label(setting)}: {first['msg']}") from None
            out.append((label(setting), base.seed + s, cfg))
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
        cells += [f"{row[m]:.4f} ± {row[f'{m}:spread']:.4f}" for m in metrics]
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
