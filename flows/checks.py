"""Checks of the command line that need no data, made before any server or stage starts:
a mistake found after the data stages, or after training, costs minutes for one line."""

from __future__ import annotations

from pathlib import Path

from mlm_core.checkpoint import list_checkpoints
from mlm_core.errors import UserError


def check_register_as(name: str | None) -> None:
    """``--register-as NAME`` against MLflow's rules for registered model names."""
    if name is None:
        return
    if not name.strip():
        raise UserError(f"--register-as needs a registered model name, got {name!r}")
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise UserError(f"--register-as {name!r}: {exc.message.rstrip('.')}; choose another name, e.g. "
                        f"{_suggest(name)!r}") from None


def _suggest(name: str) -> str:
    return "-".join(part for part in name.replace(":", "/").replace("\\", "/").split("/") if part.strip(" .")) or "melos"


def check_resume(workdir: str | Path) -> None:
    """``--resume`` with no checkpoint at all in the work directory has nothing to continue."""
    train = Path(workdir) / "train"
    if not any(list_checkpoints(d) for d in train.glob("*/checkpoints")):
        raise UserError(f"--resume: no interrupted run to continue in {str(Path(workdir))!r} (no checkpoint under "
                        f"{str(train)!r}); run without --resume to start one, or give its --workdir")
