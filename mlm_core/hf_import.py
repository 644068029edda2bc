"""Read a published BERT masked LM (a Hugging Face model directory) into Melos's own model.

The inverse of `hf_export`: ``config.json`` gives the architecture (any size, positions,
token types, tied or untied decoder), ``model.safetensors`` / ``pytorch_model.bin`` (sharded or
not) the weights, renamed by `model.from_hf_state_dict`, and ``tokenizer_config.json`` +
``vocab.txt`` the tokenizer, exactly: BertJapaneseTokenizer's word splitter (MeCab with
ipadic / unidic_lite / unidic, or basic), its subwords (WordPiece or characters) and its
casing. Anything else (RoBERTa, DeBERTa, SentencePiece, another tokenizer class, a
vocabulary that does not match the embeddings) is a one-line ``ValueError`` naming the
problem and what is supported. Nothing here imports ``transformers``.

``resolve_source`` turns a ``--init-from`` value into a local directory: a directory as is, a
hub id through ``huggingface_hub``'s cache (local files only when ``HF_HUB_OFFLINE`` is set).
Melos runs (``run:<id>``) are resolved by the flows layer, which knows MLflow.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from .errors import UserError
from .io import fingerprint, sha256_file
from .model import BertForMaskedLM, ModelConfig, from_hf_state_dict, model_config_from_hf
from .tokenizer import (
    CLS, DEFAULT_SPLITTER, MASK, MECAB_DICTIONARIES, PAD, SEP, UNK, WordPieceTokenizer, check_splitter,
)

SUPPORTED = "BERT masked-LM checkpoints (BertForMaskedLM, BertForPreTraining) with a BertJapaneseTokenizer"
_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
              "pytorch_model.bin.index.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
              "README.md"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SPECIALS = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}


class CheckpointError(UserError, ValueError):
    """A starting checkpoint Melos cannot use; the message is one line naming it and the fix."""


@dataclass
class HFCheckpoint:
    """What a Hugging Face BERT directory holds, checked, without its weights loaded."""

    dir: Path
    model: ModelConfig
    tokenizer: dict  # WordPieceTokenizer keyword arguments (its spec)
    weights: list[Path]
    license: str | None = None
    name: str = ""
    info: dict = field(default_factory=dict)

    def load_tokenizer(self) -> WordPieceTokenizer:
        return WordPieceTokenizer.from_file(self.dir / "vocab.txt", **self.tokenizer)

    def identity(self) -> str:
        """A fingerprint of everything that decides the model and its tokenizer (the weight
        files are hashed, so a re-saved checkpoint with other weights gets another)."""
        files = ["config.json", "vocab.txt", "tokenizer_config.json"]
        return fingerprint("hf-checkpoint", {f: sha256_file(self.dir / f) for f in files if (self.dir / f).is_file()},
                           [sha256_file(p) for p in self.weights])


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {what}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def is_hf_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and not (Path(path) / "model.pt").is_file()


def resolve_source(source: str) -> Path:
    """A local directory, or a hub id (``owner/name``) found through ``huggingface_hub``'s cache;
    downloaded when the hub is reachable and ``HF_HUB_OFFLINE`` is not set."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or path.exists()
    if looks_local or not _HUB_ID.match(source):
        raise CheckpointError(f"--init-from {source}: no such directory; pass a directory written by save_pretrained, "
                         "a hub id such as tohoku-nlp/bert-base-japanese-v3, or run:<id>|latest")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(source, allow_patterns=_HUB_FILES, local_files_only=offline))
    except Exception as exc:  # not cached (offline), unknown repo, no network
        why = "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline else type(exc).__name__
        raise CheckpointError(f"--init-from {source}: no such directory, and no hub model ({why}); download it once "
                         "with the hub reachable, or pass a local directory") from None


def tokenizer_spec(path: Path, config: dict) -> dict:
    """The Melos tokenizer spec of a checkpoint's ``tokenizer_config.json`` (ValueError if unsupported)."""
    tc_path = path / "tokenizer_config.json"
    tc = _read_json(tc_path, "the tokenizer config") if tc_path.is_file() else {}
    cls = tc.get("tokenizer_class") or config.get("tokenizer_class")
    if cls is None:
        raise CheckpointError(f"{path}: no tokenizer_class in tokenizer_config.json or config.json; "
                         f"--init-from supports {SUPPORTED}")
    if cls != "BertJapaneseTokenizer":
        raise CheckpointError(f"{path}: tokenizer class {cls} is not supported; --init-from supports {SUPPORTED}")
    subword = tc.get("subword_tokenizer_type", "wordpiece")
    if subword not in ("wordpiece", "character"):
        raise CheckpointError(f"{path}: subword_tokenizer_type {subword!r} (e.g. a SentencePiece model) is not supported; "
                         "Melos reads wordpiece or character subwords with a vocab.txt")
    if not tc.get("do_word_tokenize", True) or not tc.get("do_subword_tokenize", True):
        raise CheckpointError(f"{path}: a tokenizer without word or subword splitting is not supported")
    kind = tc.get("word_tokenizer_type", "basic")  # BertJapaneseTokenizer's own default
    lower = bool(tc.get("do_lower_case", False))
    if kind == "mecab":
        kwargs = dict(tc.get("mecab_kwargs") or {})
        dic = kwargs.pop("mecab_dic", "unidic_lite")  # transformers' MecabTokenizer default
        normalized = kwargs.pop("normalize_text", True) is True
        if dic not in MECAB_DICTIONARIES or not normalized or kwargs.pop("mecab_option", None) or kwargs:
            raise CheckpointError(f"{path}: mecab_kwargs {tc.get('mecab_kwargs')} not supported; Melos reads mecab_dic "
                             f"{', '.join(MECAB_DICTIONARIES)} with NFKC and no other MeCab options")
        splitter = f"mecab:{dic}"
    elif kind == "basic":
        splitter = "basic"
    else:
        raise CheckpointError(f"{path}: word_tokenizer_type {kind!r} is not supported; Melos reads mecab or basic")
    for key, expected in _SPECIALS.items():
        found = tc.get(key, expected)
        found = found.get("content") if isinstance(found, dict) else found
        if found != expected:
            raise CheckpointError(f"{path}: {key} is {found!r}; Melos needs BERT's special tokens {list(_SPECIALS.values())}")
    if lower:
        splitter += ":lower"
    max_len = tc.get("model_max_length")
    return {"splitter": splitter, "subword": subword, "max_input_chars_per_word": 100,  # HF's WordPiece limit
            "model_max_length": int(max_len) if isinstance(max_len, (int, float)) and max_len < 10**9 else None}


def _weight_files(path: Path) -> list[Path]:
    for name in _WEIGHTS:
        if (path / name).is_file():
            if name.endswith(".index.json"):
                index = _read_json(path / name, "the weight index")
                return [path / f for f in sorted(set(index.get("weight_map", {}).values()))]
            return [path / name]
    raise CheckpointError(f"{path}: no weights (model.safetensors or pytorch_model.bin)")


def _embedding_rows(weights: list[Path]) -> int | None:
    """Rows of the word embedding table, read from safetensors headers (None for .bin files)."""
    if not all(p.suffix == ".safetensors" for p in weights):
        return None
    from safetensors import safe_open

    for p in weights:
        with safe_open(str(p), framework="pt") as f:
            if "bert.embeddings.word_embeddings.weight" in f.keys():
                return f.get_slice("bert.embeddings.word_embeddings.weight").get_shape()[0]
    return None


def card_license(path: Path) -> str | None:
    """The ``license:`` field of a model card's YAML front matter, if any."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    for line in text.split("\n---", 1)[0].splitlines()[1:]:
        if line.startswith("license:"):
            return line.partition(":")[2].strip().strip("'\"") or None
    return None


def inspect_hf_dir(path: str | Path, name: str | None = None, *, check_dictionary: bool = True) -> HFCheckpoint:
    """Check a Hugging Face model directory without loading its weights; ValueError (one line)
    for anything Melos cannot read exactly."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; --init-from needs a Hugging Face model directory "
                         "(what save_pretrained writes) or a Melos run")
    config = _read_json(path / "config.json", "config.json")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type != "bert":
        raise CheckpointError(f"{path}: model_type {model_type!r} ({', '.join(archs) or 'unknown architecture'}) is not "
                         f"supported; --init-from supports {SUPPORTED}")
    if archs and not set(archs) & set(_ARCHITECTURES):
        raise CheckpointError(f"{path}: architecture {', '.join(archs)} has no masked-LM head; --init-from supports {SUPPORTED}")
    for key, ok in (("position_embedding_type", "absolute"), ("hidden_act", "gelu")):
        if config.get(key, ok) != ok:
            raise CheckpointError(f"{path}: {key} {config[key]!r} is not supported (Melos's BERT has {ok})")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise CheckpointError(f"{path}: a decoder BERT is not supported; --init-from supports {SUPPORTED}")
    spec = tokenizer_spec(path, config)
    if check_dictionary:
        check_splitter(spec["splitter"])
    if not (path / "vocab.txt").is_file():
        raise CheckpointError(f"{path}: no vocab.txt")
    vocab_lines = (path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    if "vocab_size" not in config:
        raise CheckpointError(f"{path}: config.json has no vocab_size")
    weights = _weight_files(path)
    missing = [p.name for p in weights if not p.is_file()]
    if missing:
        raise CheckpointError(f"{path}: weight file(s) {', '.join(missing)} missing")
    rows = _embedding_rows(weights)
    for what, n in (("config.json's vocab_size", config["vocab_size"]), ("the word embedding table", rows)):
        if n is not None and n != len(vocab_lines):
            raise CheckpointError(f"{path}: vocab.txt has {len(vocab_lines)} tokens but {what} has {n} rows; "
                             "the tokenizer does not belong to these weights")
    try:
        model_cfg = model_config_from_hf(config)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: config.json does not describe a BERT Melos can build: "
                         f"{exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return HFCheckpoint(path, model_cfg, spec, weights, card_license(path), name or path.name,
                        {"architectures": archs, "model_type": model_type})


def read_hf_state_dict(weights: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for p in weights:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(p)))
        else:
            state.update(torch.load(p, map_location="cpu", weights_only=True))
    return state


def load_hf_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[BertForMaskedLM, WordPieceTokenizer]:
    """A Hugging Face BERT masked-LM directory as Melos's model (eval mode) and tokenizer."""
    ckpt = inspect_hf_dir(path)
    model = model_from_checkpoint(ckpt)
    return model.to(device).eval(), ckpt.load_tokenizer()


def model_from_checkpoint(ckpt: HFCheckpoint) -> BertForMaskedLM:
    state = read_hf_state_dict(ckpt.weights)
    rows = state.get("bert.embeddings.word_embeddings.weight")
    if rows is not None and rows.shape[0] != ckpt.model.vocab_size:
        raise CheckpointError(f"{ckpt.dir}: vocab.txt has {ckpt.model.vocab_size} tokens but the word embedding table has "
                         f"{rows.shape[0]} rows; the tokenizer does not belong to these weights")
    model = BertForMaskedLM(ckpt.model)
    ours = from_hf_state_dict(state, ckpt.model)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=False)
    if unexpected or [k for k in missing if k != "head.decoder.weight"]:
        raise CheckpointError(f"{ckpt.dir}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def load_init(path: str | Path, device: str | torch.device = "cpu") -> tuple[BertForMaskedLM, WordPieceTokenizer]:
    """A starting point for continued pre-training: a Hugging Face directory or a Melos model
    directory (``model.pt``), with its own tokenizer."""
    path = Path(path)
    if (path / "model.pt").is_file():
        from .checkpoint import load_pretrained

        return load_pretrained(path, device)
    return load_hf_pretrained(path, device)


def describe_init(path: str | Path, source: str) -> dict:
    """What the pipeline records about a starting checkpoint (checked; weights hashed, not loaded):
    source, dir, format, name, license, model (ModelConfig fields), tokenizer (spec),
    fingerprint (weights and all) and tokenizer_fingerprint (vocabulary and spec)."""
    from .vocab import tokenizer_fingerprint

    found = _describe(Path(path), source)
    tok = WordPieceTokenizer.from_file(Path(path) / "vocab.txt", **found["tokenizer"])
    return {**found, "tokenizer_fingerprint": tokenizer_fingerprint(tok)}


def _describe(path: Path, source: str) -> dict:
    if (path / "model.pt").is_file():
        from .checkpoint import load_tokenizer, read_meta

        meta = read_meta(path)
        tok = load_tokenizer(path, meta)
        check_splitter(tok.splitter)
        return {"source": source, "dir": str(path), "format": "melos", "name": source, "license": None,
                "model": ModelConfig(**meta["model"]).model_dump(), "tokenizer": tok.spec(),
                "fingerprint": fingerprint("melos-checkpoint", sha256_file(path / "model.pt"),
                                           sha256_file(path / "vocab.txt"), tok.spec())}
    ckpt = inspect_hf_dir(path, source)
    return {"source": source, "dir": str(path), "format": "hf", "name": source, "license": ckpt.license,
            "model": ckpt.model.model_dump(), "tokenizer": ckpt.tokenizer,
            "fingerprint": ckpt.identity()}


__all__ = [
    "DEFAULT_SPLITTER", "HFCheckpoint", "describe_init", "inspect_hf_dir", "is_hf_dir", "load_hf_pretrained",
    "load_init", "resolve_source", "tokenizer_spec",
]
