"""Noise and stray state (issue 18, section 3): looking never creates a store, registry URIs
are found like run ids, and the small rough edges a first hour runs into."""

from __future__ import annotations

import argparse

import pytest


def test_registry_uri_is_found_in_a_remembered_store_from_another_directory(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.cli import model_dir_from_args
    from tasks import stores

    # a store elsewhere, remembered as Melos remembers the stores it wrote to, holding a registered model
    store_dir = tmp_path / "project"
    store_dir.mkdir()
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    model = store_dir / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("melos-lookup")
    version = client.create_model_version("melos-lookup", str(model))
    client.set_registered_model_alias("melos-lookup", "champion", version.version)
    monkeypatch.setenv("MELOS_CONFIG_DIR", str(tmp_path / "config"))
    stores.remember(uri)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ns = argparse.Namespace(model="models:/melos-lookup@champion", run=None, tracking_uri=None)
    found = model_dir_from_args(ns, tmp_path / "dl")
    assert (found / "model.pt").read_bytes() == b"weights"
    with pytest.raises(SystemExit) as missing:
        model_dir_from_args(argparse.Namespace(model="models:/no-such@champion", run=None, tracking_uri=None),
                            tmp_path / "dl2")
    assert "no model at models:/no-such@champion in the stores searched" in str(missing.value.code)
    assert str(store_dir / "mlflow.db") in str(missing.value.code)
    assert list(elsewhere.iterdir()) == []  # no mlflow.db (nor mlruns/) made here by looking


def test_ui_takes_a_free_port_when_its_port_is_in_use(capsys):
    import socket

    from flows.ui import free_port_for

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = free_port_for("MLflow UI", "127.0.0.1", port)
    assert other != port
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"melos: port {port} on 127.0.0.1 is in use") and str(other) in line
    assert free_port_for("MLflow UI", "127.0.0.1", other) == other  # a free port is kept, silently
    assert capsys.readouterr().err == ""


def test_progress_line_does_not_repeat_a_stale_eta(monkeypatch):
    from mlm_core import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    lines: list[str] = []
    p = progress.Progress("download", "files", log=lines.append, log_every_s=10.0, tty=False)
    now[0] = 110.0
    p(1, 4)  # one file in 10 s: three more, about 30 s
    assert lines[-1].endswith("ETA 30s"), lines
    now[0] = 180.0
    p(1, 4)  # nothing finished for 70 s: an ETA of 30 s (or of anything) would be stale
    assert "ETA" not in lines[-1] and "none finished in the last 1m10s" in lines[-1], lines
    now[0] = 190.0
    p(4, 4)
    p.close()
    assert lines[-1].endswith("done"), lines
