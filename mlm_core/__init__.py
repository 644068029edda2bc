"""Melos core library: Japanese masked-LM pre-training without any orchestration.

Pure Python + PyTorch + pyarrow + fugashi; no Prefect, MLflow or CLI imports, so every
piece can be used from a notebook. The stage functions below are the public entry points;
the modules (``aozora``, ``sentences``, ``tokenizer``, ``shards``, ``vocab``, ``masking``,
``model``, ``data``, ``train``, ``evaluate``, ``checkpoint``, ``config``) hold the parts.

The entry points are imported on first use (module ``__getattr__``), so importing one
module, e.g. ``mlm_core.shards`` in a tokenizer worker process, does not load PyTorch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

# Idle OpenMP threads sleep rather than spin (issue 18): spinning threads take the cores other
# jobs on a busy machine need, and wait on each other when one is put aside. OpenMP reads this
# once, when torch loads it, so it is set here, before any module of ours imports torch; a
# value in the environment wins. See mlm_core.train.configure_threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_ENTRY_POINTS = {
    "download_corpus": "download",
    "tokenize_corpus": "shards",
    "build_vocab": "vocab",
    "train_model": "train",
    "evaluate_heldout": "evaluate",
    "fill_mask": "evaluate",
    "load_pretrained": "checkpoint",
}

__all__ = list(_ENTRY_POINTS)

if TYPE_CHECKING:
    from .checkpoint import load_pretrained
    from .download import download_corpus
    from .evaluate import evaluate_heldout, fill_mask
    from .shards import tokenize_corpus
    from .train import train_model
    from .vocab import build_vocab


def __getattr__(name: str):
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlm_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
