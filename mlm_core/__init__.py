"""Melos core library: Japanese masked-LM pre-training without any orchestration.

Pure Python + PyTorch + pyarrow + fugashi; no Prefect, MLflow or CLI imports, so every
piece can be used from a notebook. The stage functions below are the public entry points;
the modules (``aozora``, ``sentences``, ``tokenizer``, ``shards``, ``vocab``, ``masking``,
``model``, ``data``, ``train``, ``evaluate``, ``checkpoint``, ``config``) hold the parts.
"""

from .checkpoint import load_pretrained
from .download import download_corpus
from .evaluate import evaluate_heldout, fill_mask
from .shards import tokenize_corpus
from .train import train_model
from .vocab import build_vocab

__all__ = [
    "download_corpus",
    "tokenize_corpus",
    "build_vocab",
    "train_model",
    "evaluate_heldout",
    "fill_mask",
    "load_pretrained",
]
