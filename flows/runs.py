"""Find Melos's MLflow runs wherever the user stands, and list them.

Where to look, in order: the store named by ``--tracking-uri`` / ``MLFLOW_TRACKING_URI``
(and only there, when one is named); else the ``mlflow.db`` of the current directory, then
every store Melos has written to before (``tasks.stores``). Looking never creates a store:
a SQLite file that does not exist is skipped before MLflow opens it (opening would create
an empty database), and a remembered server that does not answer is skipped.

    store_uri, run = resolve_run("latest")      # or a run id
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from tasks import stores, tracking

LATEST = "latest"
_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


class RunNotFound(LookupError):
    """No store holds the run; the message lists the stores searched."""


def candidate_stores(tracking_uri: str | None = None) -> list[str]:
    """The store URIs to search, in order. A store the user names is the only one."""
    named = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if named:
        return [stores.absolute_uri(named)]
    found = [stores.absolute_uri(tracking.DEFAULT_TRACKING_URI)] + stores.remembered()
    return list(dict.fromkeys(found))


def _reachable(uri: str) -> str | None:
    """None when the store can be opened without creating anything, else why not."""
    path = stores.sqlite_path(uri)
    if path is not None:
        return None if path.is_file() else "no such file"
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            httpx.get(f"{uri.rstrip('/')}/health", timeout=3.0)
        except httpx.HTTPError:
            return "not answering"
    return None


def open_stores(tracking_uri: str | None = None) -> tuple[list[tuple[str, Any]], list[str]]:
    """([(uri, MlflowClient)] for the stores that exist, [one 'uri (why)' per store searched])."""
    from mlflow.tracking import MlflowClient

    opened, searched = [], []
    for uri in candidate_stores(tracking_uri):
        why = _reachable(uri)
        if why is None:
            opened.append((uri, MlflowClient(uri)))
        searched.append(uri if why is None else f"{uri} ({why})")
    return opened, searched


def _not_found(what: str, searched: list[str]) -> RunNotFound:
    return RunNotFound(
        f"{what} in the stores searched: {'; '.join(searched)}. "
        "Give --tracking-uri URI (or set MLFLOW_TRACKING_URI) to look in another store"
    )


def is_pretrain_parent(run) -> bool:
    tags = run.data.tags
    return tracking.TAG_FLOW_RUN in tags and "mlflow.parentRunId" not in tags and tracking.TAG_STAGE not in tags


def iter_parent_runs(client, experiment: str | None = None, status: str | None = None) -> Iterator:
    """Pretrain parent runs of one store, newest first."""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        exp_ids = [exp.experiment_id] if exp else []
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return
    filter_string = f"attributes.status = '{status}'" if status else ""
    token = None
    while True:
        page = client.search_runs(
            exp_ids, filter_string, max_results=500, order_by=["attributes.start_time DESC"], page_token=token
        )
        yield from (r for r in page if is_pretrain_parent(r))
        token = page.token
        if not token:
            return


def resolve_run(ref: str, tracking_uri: str | None = None) -> tuple[str, Any]:
    """``ref`` (a run id, or ``latest``: the newest finished pretrain run) -> (store URI, Run)."""
    opened, searched = open_stores(tracking_uri)
    if ref == LATEST:
        newest = None
        for uri, client in opened:
            run = next(iter_parent_runs(client, status="FINISHED"), None)
            if run is not None and (newest is None or run.info.start_time > newest[1].info.start_time):
                newest = (uri, run)
        if newest is None:
            raise _not_found("no finished pretrain run", searched)
        return newest
    from mlflow.exceptions import MlflowException

    for uri, client in opened:
        try:
            return uri, client.get_run(ref)
        except MlflowException:
            continue
    raise _not_found(f"no run {ref!r}", searched)


def list_runs(
    tracking_uri: str | None = None, experiment: str | None = None, status: str | None = None, limit: int = 20
) -> tuple[list[dict], list[str]]:
    """The newest pretrain runs across the stores as plain rows, and the stores searched."""
    if status is not None and status.upper() not in _STATUSES:
        raise ValueError(f"unknown status {status!r}; use one of {', '.join(s.lower() for s in _STATUSES)}")
    opened, searched = open_stores(tracking_uri)
    rows = []
    for uri, client in opened:
        names = {}
        for i, run in enumerate(iter_parent_runs(client, experiment, status.upper() if status else None)):
            if i >= limit:
                break
            exp_id = run.info.experiment_id
            if exp_id not in names:
                names[exp_id] = client.get_experiment(exp_id).name
            rows.append(run_row(run, names[exp_id], uri))
    rows.sort(key=lambda r: r["start_time_ms"], reverse=True)
    return rows[:limit], searched


def run_row(run, experiment: str, store: str) -> dict:
    p, m, info = run.data.params, run.data.metrics, run.info
    try:
        sources = json.loads(p.get("download.sources", "[]"))
    except ValueError:
        sources = p["download.sources"]
    if not isinstance(sources, list):
        sources = [str(sources)]
    end = info.end_time or None
    return {
        "run_id": info.run_id,
        "name": info.run_name,
        "experiment": experiment,
        "store": store,
        "status": info.status,
        "start_time_ms": info.start_time,
        "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(info.start_time / 1000)),
        "wall_s": round((end - info.start_time) / 1000, 1) if end else None,
        "corpus": [s.rsplit("/", 1)[-1] for s in sources],
        "layers": _int(p.get("train.num_layers")),
        "hidden_size": _int(p.get("train.hidden_size")),
        "heads": _int(p.get("train.num_heads")),
        "masking": p.get("train.masking"),
        "mask_rate": _rate(p.get("train.mask_rate")),
        "top1": m.get("eval/top1_accuracy"),
        "top5": m.get("eval/top5_accuracy"),
        "unigram_top1": m.get("eval/unigram_top1_accuracy"),
        "unigram_top5": m.get("eval/unigram_top5_accuracy"),
        "init_from": p.get("init_from"),
        "budget_minutes": _float(p.get("train.budget_minutes")),
        "profile": run.data.tags.get(tracking.TAG_PROFILE),
        "tokens_seen": m.get("train/tokens_seen"),
        "initial_top1": m.get("eval/initial_top1_accuracy"),
        "initial_top5": m.get("eval/initial_top5_accuracy"),
    }


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "", "null") else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "", "null") else None


def _rate(value: str | None) -> float | str | None:
    """A constant mask rate as a float; a schedule (``0.3:0.15:linear``) as its text."""
    try:
        return _float(value)
    except ValueError:
        return value


def _rate_text(rate: float | str) -> str:
    return f"{rate:.0%}" if isinstance(rate, float) else str(rate)


def format_table(rows: list[dict]) -> str:
    header = ["RUN ID", "NAME", "STARTED", "STATUS", "CORPUS", "MODEL", "MASKING", "BUDGET", "TOP-1 (UNIGRAM)",
              "TOP-5 (UNIGRAM)", "WALL"]
    lines = [header] + [
        [
            r["run_id"], r["name"] or "", r["started"], r["status"], ", ".join(r["corpus"]) or "-",
            (f"{r['layers']}L x {r['hidden_size']}" if r["layers"] and r["hidden_size"] else "-")
            + (f" from {r['init_from']}" if r.get("init_from") else ""),
            f"{r['masking']} {_rate_text(r['mask_rate'])}" if r["masking"] and r["mask_rate"] is not None else "-",
            _budget(r),
            _vs(r["top1"], r["unigram_top1"], r.get("initial_top1")),
            _vs(r["top5"], r["unigram_top5"], r.get("initial_top5")), _duration(r["wall_s"]),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _budget(r: dict) -> str:
    """``10 min, cpu-10min, 10.6M tokens``: a --budget-minutes run's budget, profile and what it bought."""
    if not r.get("budget_minutes"):
        return "-"
    parts = [f"{r['budget_minutes']:g} min"] + ([r["profile"]] if r.get("profile") else [])
    if r.get("tokens_seen"):
        parts.append(f"{r['tokens_seen'] / 1e6:.1f}M tokens")
    return ", ".join(parts)


def _vs(value: float | None, baseline: float | None, initial: float | None = None) -> str:
    """``0.550 (0.120)``; a run continued from a checkpoint shows where it started: ``0.410 → 0.550 (0.120)``."""
    if value is None:
        return "-"
    text = f"{initial:.3f} → {value:.3f}" if initial is not None else f"{value:.3f}"
    return f"{text} ({baseline:.3f})" if baseline is not None else text


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def ui_store(tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(the store ``melos ui`` shows: the named one, else this directory's, else the last one used;
    the experiment of its newest pretrain run, None when it has none)."""
    opened, searched = open_stores(tracking_uri)
    if not opened:
        raise _not_found("no MLflow store", searched)
    uri, client = opened[0]
    newest = next(iter_parent_runs(client), None)
    return uri, newest.info.experiment_id if newest else None

