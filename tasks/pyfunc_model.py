"""A Melos model as an MLflow ``pyfunc``: fill-mask over a column of texts.

Input: a DataFrame with a ``text`` column (or a list of strings), each text holding one
or more ``[MASK]``. Output: one row per ``[MASK]``, left to right: the text, the mask's
number within it (1-based), and the top-k tokens with their probabilities. ``top_k`` is
an inference parameter (default 5).

The logged model carries the Melos model directory (config.json, vocab.txt, model.pt)
as the artifact ``melos_model`` and this class by reference, so loading it needs only
Melos installed: ``mlflow.pyfunc.load_model("runs:/<pipeline run id>/model")`` or
``mlflow models serve -m models:/NAME@champion --env-manager local``.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

MODEL_ARTIFACT = "melos_model"
CARD_ARTIFACT = "card"
TEXT_COLUMN = "text"
DEFAULT_TOP_K = 5


class BadInput(MlflowException):
    """A 400 whose message stays one line. MLflow's scoring server rewrites the message of an
    ``MlflowException`` from ``predict`` to "Failed to predict data '<the whole DataFrame>'";
    this message keeps the first value it is given."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._first

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_first"):
            self._first = value


def _texts(model_input) -> list[str]:
    import numpy as np

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            column = model_input[TEXT_COLUMN]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise BadInput(f"expected a column named {TEXT_COLUMN!r}, got columns {list(model_input.columns)}")
        model_input = list(column)
    texts: list[str] = []
    for cell in model_input:  # a dict input {"text": [...]} arrives as one row holding the list
        texts.extend(str(t) for t in cell) if isinstance(cell, (list, tuple, np.ndarray)) else texts.append(str(cell))
    return texts


class MelosFillMask(mlflow.pyfunc.PythonModel):
    """Top-k predictions for every [MASK] of every input text."""

    def load_context(self, context) -> None:
        from mlm_core.checkpoint import load_pretrained

        self.model, self.tokenizer = load_pretrained(Path(context.artifacts[MODEL_ARTIFACT]), "cpu")
        self.mecab = None  # the tokenizer's own word splitter (recorded with the model)

    # the DataFrame hint tells MLflow the logged signature, not the hint, describes the input
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlm_core.evaluate import fill_mask

        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        if not 1 <= top_k <= len(self.tokenizer):
            raise BadInput(f"top_k must be between 1 and {len(self.tokenizer)}, got {top_k}")
        rows = []
        for text in _texts(model_input):
            try:
                predictions = fill_mask(self.model, self.tokenizer, text, top_k, self.mecab)
            except ValueError as exc:  # no [MASK], or longer than the model reads
                raise BadInput(str(exc)) from None
            for number, preds in enumerate(predictions, 1):
                rows.append({
                    TEXT_COLUMN: text,
                    "mask": number,
                    "tokens": [token for token, _ in preds],
                    "scores": [score for _, score in preds],
                })
        return pd.DataFrame(rows, columns=[TEXT_COLUMN, "mask", "tokens", "scores"])


def melos_model_dir(downloaded: str | Path) -> Path:
    """The Melos model directory inside a downloaded MLflow Model (MLflow copies the
    ``melos_model`` artifact to ``artifacts/<its directory name>``), or the directory itself
    when the URI pointed at a raw Melos model, e.g. a train run's ``model`` artifacts."""
    root = Path(downloaded)
    found = sorted(p.parent for p in (root / "artifacts").glob("*/model.pt"))
    return found[0] if found and not (root / "model.pt").is_file() else root
