"""A test hook: hold a process at a named point, so that a test can SIGKILL it exactly there
or let another process run meanwhile.

Off unless ``MELOS_TEST_PAUSE_AT`` is set. ``MELOS_TEST_PAUSE_AT=checkpoint`` (or
``checkpoint#2`` for the second time the point is reached in this process) makes the process
write its pid to the file named by ``MELOS_TEST_PAUSE_MARKER`` when it gets there, then wait
while that file exists: the test kills the process, or deletes the marker to let it go on.
The points (see ``POINTS``) sit where a crash hurts most, mostly inside a stage's temporary
output before it is renamed into place. Used by tests/test_kill_anywhere.py and
tests/test_side_by_side.py; nothing else should set it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV_POINT, ENV_MARKER = "MELOS_TEST_PAUSE_AT", "MELOS_TEST_PAUSE_MARKER"
POINTS = (
    "download",  # a document is written in the download stage's temporary directory
    "tokenize",  # the first part is tokenized and merged into a shard being written
    "checkpoint",  # a checkpoint's files are written under its temporary name, not yet renamed
    "evaluate",  # the trained model is loaded and evaluation starts
)
_reached: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Wait here while the environment asks for it (see the module docstring)."""
    wanted = os.environ.get(ENV_POINT)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return
    from .io import atomic_write_text

    marker = Path(os.environ[ENV_MARKER])
    atomic_write_text(marker, f"{os.getpid()}\n")  # whole when it appears: the test reads it at once
    while marker.exists():
        time.sleep(0.05)
