"""The MLflow stores Melos has written to, remembered so a run id is found from anywhere.

A small JSON file, ``stores.json`` in Melos's config directory (``$MELOS_CONFIG_DIR``, else
``$XDG_CONFIG_HOME/melos``, else ``~/.config/melos``), lists store URIs, most recent first.
SQLite URIs are kept absolute, so ``sqlite:///mlflow.db`` written from one directory is
still the same file when read from another. Writes are atomic; a broken file is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlm_core.io import atomic_write_json

MAX_REMEMBERED = 50
_SQLITE = "sqlite:///"


def config_dir() -> Path:
    if os.environ.get("MELOS_CONFIG_DIR"):
        return Path(os.environ["MELOS_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "melos"


def registry_path() -> Path:
    return config_dir() / "stores.json"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), else None."""
    if not uri.startswith(_SQLITE):
        return None
    return Path(uri[len(_SQLITE):].split("?", 1)[0])


def absolute_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/dir/mlflow.db``; other URIs unchanged."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute() or str(path) == ":memory:":
        return uri
    return _SQLITE + str(path.resolve())


def remembered() -> list[str]:
    try:
        stores = json.loads(registry_path().read_text(encoding="utf-8")).get("stores", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [s for s in stores if isinstance(s, str)]


def remember(uri: str) -> None:
    """Put ``uri`` first in the registry. Never fails the caller: the registry is a convenience."""
    uri = absolute_uri(uri)
    stores = [uri] + [s for s in remembered() if s != uri]
    try:
        atomic_write_json(registry_path(), {"stores": stores[:MAX_REMEMBERED]})
    except OSError:
        pass
