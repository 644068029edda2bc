"""Errors a person can act on.

A ``UserError`` is a failure caused by the input (an option, a file, a source, the network)
and fixed by the user: its message is one line that names the input and says what to do.
The ``melos`` command prints it as ``melos: <message>`` and exits 1, without a traceback
(``--debug`` or ``MELOS_DEBUG=1`` shows it); any other exception is a bug in Melos and keeps
its traceback, with a line on how to report it. Raise it (or subclass it) anywhere: in
``mlm_core``, in a Prefect task or flow, or in the CLI before anything starts.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; ``str(exc)`` is one line naming the input and the fix."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """``exc`` itself or the first ``UserError`` it was raised from (``raise ... from``, or an
    exception raised while handling one: Prefect and MLflow may wrap the one that matters)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None
