"""How the ``melos`` command ends on an error: one line a person can act on.

* A ``mlm_core.errors.UserError`` (bad option, file, source, network; raised before anything
  starts or from inside a flow) -> ``melos: <message>`` on stderr, exit 1, no traceback.
* Anything else is a bug in Melos -> its traceback, then a line on how to report it, exit 1.
* ``--debug`` or ``MELOS_DEBUG=1`` shows the traceback of a user error too, and lets
  Prefect's own exception logs through to the terminal.

Prefect logs every failed task and flow run with its full traceback ("Encountered exception
during execution", "Finished in state Failed(...)") to the terminal and to its API; the
terminal copy is dropped here (``quiet_prefect_console``), the API copy (the Prefect UI's flow
run log) is kept, and MLflow's runs are marked FAILED as before.

Other subcommands adopt this by raising ``UserError`` (or a subclass); ``main`` does the rest.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from mlm_core.errors import UserError, find_user_error

REPORT = "this is a bug in Melos; please report it with the output of the same command run with --debug"


def debug_enabled() -> bool:
    return os.environ.get("MELOS_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0]


def report(exc: BaseException) -> int:
    """Print ``exc`` as the command's last words; returns the exit status."""
    user = find_user_error(exc)
    if user is not None:
        if debug_enabled():
            traceback.print_exception(exc)
        print(f"melos: {one_line(str(user))}", file=sys.stderr)
        return 1
    traceback.print_exception(exc)
    print(f"melos: internal error: {type(exc).__name__}: {one_line(str(exc))[:300]}", file=sys.stderr)
    print(f"melos: {REPORT}", file=sys.stderr)
    return 1


class _ConsoleNoise(logging.Filter):
    """Prefect's run-engine error records that only repeat, with a traceback, what the
    command prints at its end in one line."""

    NOISE = ("Finished in state Failed", "Finished in state Crashed", "Crash detected!",
             "Encountered exception during execution")

    def filter(self, record: logging.LogRecord) -> bool:
        if debug_enabled():
            return True
        if record.levelno >= logging.WARNING and record.exc_info and record.exc_info[1] is not None:
            return False  # main prints it: once, as one line, or as a bug report with its traceback
        message = record.getMessage()
        return not any(m in message for m in self.NOISE)


def quiet_prefect_console() -> None:
    """Put ``_ConsoleNoise`` on Prefect's terminal handlers (not on its API handler)."""
    try:
        from prefect.logging.handlers import PrefectConsoleHandler
    except ImportError:  # pragma: no cover - prefect is a dependency
        return
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, _ConsoleNoise) for f in handler.filters):
                handler.addFilter(_ConsoleNoise())


__all__ = ["UserError", "debug_enabled", "quiet_prefect_console", "report"]
