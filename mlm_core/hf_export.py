"""Export a Melos model directory in Hugging Face format, with a model card.

The result loads with ``transformers.BertForMaskedLM.from_pretrained(dir)`` and
``transformers.BertJapaneseTokenizer.from_pretrained(dir)``; nothing here imports
``transformers``. Weights go through `model.to_hf_state_dict` (a renaming, plus the
split of the fused q/k/v); the tokenizer settings reproduce Melos's own: NFKC, MeCab
words from fugashi + unidic-lite, WordPiece subwords with ``##`` continuations, no
lower-casing, and the five special tokens at ids 0..4.

The card's facts come from a ``card`` dict that the pipeline records next to the model
(corpus provenance, held-out metrics, MLflow run ids); without one the card says what it
does not know rather than guessing.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import load_pretrained, read_meta
from .evaluate import metrics_table
from .io import atomic_dir, usual_mode
from .model import hf_config_dict, to_hf_state_dict
from .tokenizer import CLS, DEFAULT_SPLITTER, MASK, PAD, SEP, UNK, parse_splitter

CARD_FILE = "card.json"  # what the pipeline records about a model, beside its model/ directory
# HF re-creates these from the tie on load; safetensors refuses to store shared tensors twice
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_TIED_BIAS = ("cls.predictions.decoder.bias",)  # an untied decoder still shares its bias


def hf_tokenizer_config(max_length: int, spec: dict | None = None) -> dict:
    """``tokenizer_config.json`` for BertJapaneseTokenizer matching Melos's tokenizer.

    ``spec`` is the tokenizer's own (``WordPieceTokenizer.spec()``): a model continued from a
    published checkpoint goes out with the word splitter, dictionary, subwords and casing it
    came in with (an IPAdic model stays IPAdic). HF's WordPiece always turns words over 100
    characters into [UNK], Melos's default ``max_input_chars_per_word``; a vocabulary built
    with another limit differs there."""
    spec = spec or {}
    kind, dic, lower = parse_splitter(spec.get("splitter") or DEFAULT_SPLITTER)
    config = {
        "tokenizer_class": "BertJapaneseTokenizer",
        "do_lower_case": lower,
        "do_word_tokenize": True,
        "do_subword_tokenize": True,
        "word_tokenizer_type": kind,
        "subword_tokenizer_type": spec.get("subword") or "wordpiece",
        "model_max_length": spec.get("model_max_length") or max_length,
        "unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK,
    }
    if kind == "mecab":  # named always: HF's default dictionary has changed between versions
        config["mecab_kwargs"] = {"mecab_dic": dic}
    return config


def export_hf(model_dir: str | Path, out_dir: str | Path, card: dict | None = None, *, overwrite: bool = False) -> Path:
    """Write ``out_dir`` (atomically) from a Melos model or checkpoint directory."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new directory or remove it")
    model, tokenizer = load_pretrained(model_dir, "cpu")
    meta = read_meta(Path(model_dir))
    config = model.config
    state = to_hf_state_dict(model.state_dict(), config)
    shared = _TIED if config.tie_word_embeddings else _TIED_BIAS
    tensors = {k: v.detach().contiguous() for k, v in state.items() if k not in shared}
    hf_config = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        **hf_config_dict(config),
        "position_embedding_type": "absolute",
        "tokenizer_class": "BertJapaneseTokenizer",
        "torch_dtype": "float32",
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        usual_mode(tmp / "model.safetensors")  # safetensors writes it owner-only (0600)
        _write_json(tmp / "config.json", hf_config)
        tokenizer.save(tmp / "vocab.txt")
        _write_json(tmp / "tokenizer_config.json", hf_tokenizer_config(config.max_position_embeddings, tokenizer.spec()))
        _write_json(
            tmp / "special_tokens_map.json",
            {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK},
        )
        (tmp / "README.md").write_text(model_card(meta, model.num_parameters(), model.num_parameters(True), card), encoding="utf-8")
    return out_dir


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def model_card(meta: dict, params: int, params_no_emb: int, card: dict | None) -> str:
    """The ``README.md`` of an export: what the model is, what it was trained on, how good
    it is, where it is tracked, and what may be done with it."""
    card = card or {}
    m = meta["model"]
    run_id = card.get("mlflow_run_id")
    init = meta.get("init_from")
    spec = meta.get("tokenizer") or {}
    kind, dic, lower = parse_splitter(spec.get("splitter") or DEFAULT_SPLITTER)
    package = {"unidic_lite": "unidic-lite", "ipadic": "ipadic", "unidic": "unidic"}.get(dic or "")
    words = f"MeCab words (fugashi + {package})" if kind == "mecab" else "words split on whitespace and punctuation"
    subwords = ("one token per character" if spec.get("subword") == "character"
                else "WordPiece subwords with `##` continuations")
    how = (f"continued from `{init.get('name') or init.get('source')}` (its weights, vocabulary and tokenizer) on "
           "Japanese text" if init else "pre-trained from scratch on Japanese text")
    lines = [
        "---",
        "language: ja",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        "tags: [bert, japanese, masked-lm, melos, aozora-bunko]",
        "---",
        "",
        "# Melos Japanese BERT masked language model",
        "",
        f"A BERT masked language model {how} by "
        "Melos (Prefect + MLflow + PyTorch)"
        + (f", MLflow run `{run_id}`." if run_id else "."),
        "",
        "```python",
        "from transformers import BertForMaskedLM, BertJapaneseTokenizer, pipeline",
        "fill = pipeline('fill-mask', model=BertForMaskedLM.from_pretrained(path),",
        "                tokenizer=BertJapaneseTokenizer.from_pretrained(path))",
        "fill('メロスは[MASK]した。')",
        "```",
        "",
        (f"The tokenizer needs `fugashi` and `{package}` installed." if package else "The tokenizer needs nothing beyond transformers."),
        "",
        "## Architecture",
        "",
        f"- original post-LayerNorm BERT, {m['num_layers']} layers, hidden size {m['hidden_size']}, "
        f"{m['num_heads']} attention heads, feed-forward size {m['intermediate_size']}, GELU",
        f"- {params:,} parameters ({params_no_emb:,} without the embedding tables); "
        + ("the output projection is tied to the word embeddings" if m.get("tie_word_embeddings", True)
           else "the output projection has its own weights"),
        f"- vocabulary {m['vocab_size']:,} tokens, at most {m['max_position_embeddings']} positions "
        f"({m['max_position_embeddings'] - 2} subwords plus [CLS] and [SEP])",
        f"- tokenizer: {'NFKC, ' if kind == 'mecab' else ''}{words}, {subwords}, "
        f"{'lower-cased' if lower else 'no lower-casing'}; special tokens [PAD] [UNK] [CLS] [SEP] [MASK]",
        "",
    ]
    if init:
        lines += [
            "## Starting checkpoint",
            "",
            f"- `{init.get('source')}` ({'Hugging Face' if init.get('format') == 'hf' else 'Melos'} format), "
            f"fingerprint `{init.get('fingerprint')}`",
            f"- its license field: {init['license']}" if init.get("license")
            else "- its model card states no license field; check the terms of its publisher",
            "",
        ]
    lines += ["## Training corpus", ""]
    docs = card.get("documents")
    if docs:
        lines += [
            "Aozora Bunko markup (ruby, notes, header and footer) was removed before training. "
            "底本 is the printed edition each Aozora text was transcribed from.",
            "",
            "| document | title | author | source | 底本 |",
            "|---|---|---|---|---|",
        ]
        for d in docs:
            cells = [d.get("doc_id"), d.get("title"), d.get("author"), d.get("source"),
                     _first_line(d.get("provenance")).removeprefix("底本：") or "(none: not an Aozora file)"]
            lines.append("| " + " | ".join(str(c or "").replace("|", "\\|") for c in cells) + " |")
    else:
        lines.append("Not recorded with this model (it was exported from a directory without the "
                     "pipeline's record); see the MLflow run's download stage for the documents.")
    train = meta.get("train", {})
    lines += ["", "## Training settings", ""]
    if train:
        lines += [f"- `{k}`: {json.dumps(v, ensure_ascii=False)}" for k, v in train.items()]
    if "step" in meta:
        lines.append(f"- optimizer steps completed: {meta['step']}")
    lines += ["", "## Held-out evaluation", ""]
    metrics = card.get("metrics")
    if metrics:
        lines += [
            card.get("eval_mask", "Masked tokens of held-out sentences, each replaced by [MASK]."),
            "",
            *metrics_table(metrics),
        ]
        initial = card.get("initial_metrics") or {}
        if "eval/initial_top1_accuracy" in initial:
            lines += ["", f"The starting checkpoint on the same masks, before continued pre-training: top-1 "
                      f"{initial['eval/initial_top1_accuracy']:.4f} → {metrics.get('eval/top1_accuracy', float('nan')):.4f}, "
                      f"top-5 {initial['eval/initial_top5_accuracy']:.4f} → {metrics.get('eval/top5_accuracy', float('nan')):.4f}."]
    else:
        lines.append("Not recorded with this model.")
    lines += ["", "## Tracking", ""]
    for key, label in (("mlflow_run_id", "MLflow run (pipeline)"), ("train_run_id", "MLflow run (train stage)"),
                       ("tracking_uri", "MLflow tracking URI"), ("prefect_flow_run_id", "Prefect flow run")):
        if card.get(key):
            lines.append(f"- {label}: `{card[key]}`")
    if not any(card.get(k) for k in ("mlflow_run_id", "train_run_id")):
        lines.append("- no MLflow run recorded with this model")
    lines += ["", "## License", ""] + _license_lines(docs)
    if init:
        lines += ["", f"The weights continue `{init.get('source')}`"
                  + (f", released under `{init['license']}`: its terms apply to this model too."
                     if init.get("license") else ", whose card names no license: its publisher's terms apply.")]
    return "\n".join(lines) + "\n"


def _license_lines(docs: list[dict] | None) -> list[str]:
    aozora = [d for d in docs or [] if d.get("provenance")]
    other = [d for d in docs or [] if not d.get("provenance")]
    lines = [
        "The works Aozora Bunko publishes without a license notice are those whose copyright has "
        "expired, i.e. they are in the public domain in Japan. Weights trained only on such texts "
        "carry no obligation from the training data: whoever trained them may release them under "
        "any license (or none) they choose; this export does not pick one for them. Public-domain "
        "status is a matter of each country's copyright term, so check it where you use the model "
        "if that matters to you.",
    ]
    if not docs:
        lines += ["", "The documents behind this model were not recorded here, so this card cannot "
                  "say whether all of them were public domain."]
    elif other:
        names = ", ".join(str(d.get("source")) for d in other[:5])
        lines += ["", f"{len(other)} of the {len(aozora) + len(other)} training documents are not Aozora "
                  f"files ({names}); their own license terms apply to what was learnt from them."]
    else:
        lines += ["", f"All {len(aozora)} training document(s) are Aozora Bunko files (see 底本 above)."]
    return lines
