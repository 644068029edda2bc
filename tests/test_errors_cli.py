"""Errors a person can act on: every failure a user can cause ends with exit != 0 and ONE
`melos: ...` line naming the input (flag or file) and the fix, with no traceback on the
terminal; `--debug` shows the traceback. Mistakes that need no data are found before any
server or stage starts (nothing is created); the others, found by the flow, still end in one
line, Prefect's traceback logs kept off the terminal (the shared test server gets them).

Early checks run `main()` in this process (no server can start: nothing is created, which is
asserted); the in-flow cases run `melos` as a process against the session's Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from mlm_core.config import DownloadConfig
from mlm_core.download import SourceError, download_corpus
from mlm_core.errors import UserError


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _parquet(path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["メロスは激怒した。"]}), path)
    return str(path)


# (name, files to make -> args, what the line must name)
EARLY = {
    "tokens-per-batch below max length": (lambda d: ["pretrain", "--tokens-per-batch", "3"], "--tokens-per-batch"),
    "register-as with a slash": (lambda d: ["pretrain", "--register-as", "bad/name"], "--register-as"),
    "resume with nothing to resume": (lambda d: ["pretrain", "--resume"], "--resume"),
    "empty .txt": (lambda d: ["pretrain", "--source", _write(d / "empty.txt", b"")], "empty.txt"),
    "non-ZIP .zip": (lambda d: ["pretrain", "--source", _write(d / "page.zip", b"<html>not found</html>")], "page.zip"),
    "JSONL line not JSON": (lambda d: ["pretrain", "--source", "jsonl:" + _jsonl(d / "bad.jsonl", ["{oops"])], "bad.jsonl"),
    "JSONL without the field": (
        lambda d: ["pretrain", "--source", "jsonl:" + _jsonl(d / "nofield.jsonl", [json.dumps({"body": "x"})])],
        "nofield.jsonl",
    ),
    "JSONL not UTF-8": (lambda d: ["pretrain", "--source", "jsonl:" + _write(d / "sjis.jsonl", "{}\n".encode() + bytes([0x82, 0xa0, 0xff]))],
                        "sjis.jsonl"),
    "Parquet without the column": (lambda d: ["pretrain", "--source", "parquet:" + _parquet(d / "t.parquet")],
                                   "t.parquet"),
    "evaluate a missing source": (lambda d: ["evaluate", "--run", "latest", "--source", str(d / "nope.txt")],
                                  "nope.txt"),
}


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", EARLY)
def test_mistakes_found_before_anything_starts_end_in_one_line(case, tmp_path, monkeypatch, capsys):
    make, named = EARLY[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MELOS_DEBUG", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = make(tmp_path)
    try:
        rc = main([*args, "--workdir", str(tmp_path / "work")])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (print(exc.code, file=sys.stderr) or 1)
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert rc not in (0, None), out
    assert len(lines) == 1 and lines[0].startswith("melos: "), out.err
    assert named in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out
    # nothing started: no work directory (the server's log lives there), no store
    assert not (tmp_path / "work").exists() and not (tmp_path / "mlflow.db").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MELOS_DEBUG", raising=False)
    try:
        rc = main(["pretrain", "--resume", "--workdir", str(tmp_path / "work"), "--debug"])
    finally:
        os.environ.pop("MELOS_DEBUG", None)  # main sets it for the process
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" in err and "UserError" in err
    assert err.strip().splitlines()[-1].startswith("melos: --resume")


def test_an_internal_error_keeps_its_traceback_and_says_how_to_report_it(tmp_path, monkeypatch, capsys):
    import flows.cli as cli

    def broken(ns):
        raise KeyError("nobody expected this")

    monkeypatch.setattr(cli, "cmd_runs", broken)
    rc = main(["runs"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" in err and "KeyError" in err
    assert "bug in Melos" in err.strip().splitlines()[-1]


def test_source_failures_found_while_reading_are_user_errors_naming_the_file(tmp_path):
    from tests.test_sources import write_site

    (tmp_path / "sjis.txt").write_bytes(bytes([0x82, 0xa0, 0xff, 0xfe, 0x81]) * 50)  # neither UTF-8 nor cp932
    write_site(tmp_path / "site")
    cases = {
        "sjis.txt": DownloadConfig(sources=[str(tmp_path / "sjis.txt")]),
        "99999999": DownloadConfig(sources=["aozora:author=99999999"], aozora_base_url=str(tmp_path / "site")),
        "melos-test.invalid": DownloadConfig(sources=["http://melos-test.invalid/x.zip"], retries=3,
                                             retry_backoff_s=5.0),
    }
    for i, (named, cfg) in enumerate(cases.items()):
        t0 = time.monotonic()
        with pytest.raises(SourceError) as raised:
            download_corpus(cfg, tmp_path / f"out{i}", tmp_path / "raw")
        assert isinstance(raised.value, UserError)
        assert named in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
        assert time.monotonic() - t0 < 5, "a DNS failure was retried"  # 3 retries would sleep 5 + 10 + 20 s
    assert "cannot resolve the host 'melos-test.invalid'" in str(raised.value)


def _prefect_api() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_a_mistake_found_by_the_flow_ends_in_one_line_without_prefect_tracebacks(prefect_harness, tmp_path):
    """One pipeline start (the costly part) for the mechanism: a UserError raised in a task
    reaches the terminal as one line. Which failures are UserErrors, with which message, is
    checked above without a flow, each in milliseconds."""
    source = "jsonl:" + _jsonl(tmp_path / "late.jsonl", [json.dumps({"text": "メロスは激怒した。"}), "{oops"])
    named = "late.jsonl"
    env = {**os.environ, "PREFECT_API_URL": _prefect_api(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    env.pop("MELOS_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "pretrain", "--source", source, "--workdir",
                           str(tmp_path / "work"), "--threads", "1"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("melos: ") and named in lines[-1], done.stderr[-3000:]
    assert [line for line in lines if line.startswith("melos: ")] == lines[-1:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert not [line for line in lines[:-1] if "| ERROR" in line], done.stderr[-3000:]
