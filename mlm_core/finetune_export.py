"""A fine-tuned Melos model in Hugging Face format: ``BertForSequenceClassification`` or
``BertForTokenClassification`` with ``id2label``/``label2id``, and the tokenizer files that
``hf_export`` writes (BertJapaneseTokenizer: MeCab with unidic-lite, WordPiece). Nothing here
imports ``transformers``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .finetune import FinetuneModel
from .hf_export import hf_tokenizer_config
from .io import atomic_dir
from .model import hf_config_dict, to_hf_state_dict
from .tokenizer import CLS, MASK, PAD, SEP, UNK, WordPieceTokenizer

_HEAD_KEYS = ("head.dense.weight", "head.dense.bias", "head.ln.weight", "head.ln.bias", "head.decoder.bias")


def hf_state_dict(model: FinetuneModel) -> dict[str, torch.Tensor]:
    """HF names of the encoder (``bert.*``), the pooler (sequence tasks) and ``classifier.*``."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
    encoder = {k.removeprefix("bert."): v for k, v in sd.items() if k.startswith("bert.")}
    H, V = model.config.hidden_size, model.config.vocab_size
    # the MLM head was dropped; stand-ins let the encoder's renaming run, and are not exported
    stand_in = {"head.dense.weight": torch.zeros(H, H), "head.dense.bias": torch.zeros(H),
                "head.ln.weight": torch.ones(H), "head.ln.bias": torch.zeros(H), "head.decoder.bias": torch.zeros(V)}
    out = {k: v for k, v in to_hf_state_dict({**encoder, **stand_in}, model.config).items()
           if not k.startswith("cls.")}
    if model.pooler is not None:
        out["bert.pooler.dense.weight"] = sd["pooler.weight"]
        out["bert.pooler.dense.bias"] = sd["pooler.bias"]
    out["classifier.weight"] = sd["classifier.weight"]
    out["classifier.bias"] = sd["classifier.bias"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def export_finetuned_hf(model: FinetuneModel, tokenizer: WordPieceTokenizer, labels: list[str], out_dir: str | Path) -> Path:
    """Write ``out_dir`` atomically: config.json, model.safetensors, vocab.txt, tokenizer files."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    arch = "BertForSequenceClassification" if model.kind == "classification" else "BertForTokenClassification"
    config = {
        "architectures": [arch],
        "model_type": "bert",
        **hf_config_dict(model.config),
        "position_embedding_type": "absolute",
        "classifier_dropout": model.drop.p,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": "single_label_classification" if model.kind == "classification" else None,
        "tokenizer_class": "BertJapaneseTokenizer",
        "torch_dtype": "float32",
    }
    if config["problem_type"] is None:
        del config["problem_type"]
    with atomic_dir(out_dir) as tmp:
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        tokenizer.save(tmp / "vocab.txt")
        _write_json(tmp / "tokenizer_config.json", hf_tokenizer_config(model.config.max_position_embeddings))
        _write_json(tmp / "special_tokens_map.json",
                    {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK})
    return out_dir


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
