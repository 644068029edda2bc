"""Noise and stray state (issue 18, section 3): looking never creates a store, registry URIs
are found like run ids, and the small rough edges a first hour runs into."""

from __future__ import annotations

import argparse
from pathlib import Path

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
