"""Hugging Face export: transformers loads it cleanly, predicts what Melos predicts, and
tokenises held-out text to the same ids; the export is atomic and carries a model card."""

from __future__ import annotations

import os

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mlm_core.checkpoint import load_pretrained
from mlm_core.config import RuntimeConfig, TrainConfig
from mlm_core.evaluate import fill_mask
from mlm_core.hf_export import export_hf
from mlm_core.tokenizer import SPECIAL_TOKENS, MecabWords

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "メロスは[MASK]した。",
    "メロスには[MASK]がわからぬ。",
    "私は、[MASK]を信じている。",
    "[MASK]は、村の牧人である。",
    "セリヌンティウスは[MASK]を待っていた。",
    "ＭＥＬＯＳは[MASK]、走った。",  # full-width Latin: NFKC on both sides
]


@pytest.fixture(scope="module")
def trained(merosu, tmp_path_factory) -> Path:
    """A tiny model trained for a few dozen steps (so predictions are not near-uniform)."""
    from mlm_core.train import train_model

    cfg = TrainConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=64,
                      batch_size=32, max_steps=40, checkpoint_every=40, learning_rate=3e-3)
    run_dir = tmp_path_factory.mktemp("hf") / "run"
    result = train_model(merosu.train, merosu.tokenizer, cfg, RuntimeConfig(device="cpu"), run_dir,
                         data_fingerprint=merosu.data_fingerprint)
    return result.model_dir


@pytest.fixture(scope="module")
def card(merosu) -> dict:
    manifest = json.loads((merosu.root / "download" / "manifest.json").read_text(encoding="utf-8"))
    return {
        "mlflow_run_id": "0123456789abcdef0123456789abcdef",
        "train_run_id": "fedcba9876543210fedcba9876543210",
        "documents": manifest["documents"],
        "metrics": {"eval/top1_accuracy": 0.1234, "eval/unigram_top1_accuracy": 0.0567, "eval/top5_accuracy": 0.3,
                    "eval/unigram_top5_accuracy": 0.2, "eval/loss": 5.5, "eval/perplexity": 244.7,
                    "eval/masked_tokens": 300, "eval/sentences": 34},
    }


@pytest.fixture(scope="module")
def exported(trained, card, tmp_path_factory) -> Path:
    return export_hf(trained, tmp_path_factory.mktemp("export") / "melos-bert", card)


def test_transformers_loads_every_weight(exported, trained):
    from transformers import BertForMaskedLM, BertJapaneseTokenizer

    assert {p.name for p in exported.iterdir()} == {
        "config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "README.md",
    }
    model, info = BertForMaskedLM.from_pretrained(exported, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    ours, tokenizer = load_pretrained(trained)
    assert model.config.vocab_size == len(tokenizer) and model.config.num_hidden_layers == 2
    # the tie survived: HF's decoder is its embedding table, equal to ours
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert (model.bert.embeddings.word_embeddings.weight == ours.embeddings.word.weight).all()
    hf_tok = BertJapaneseTokenizer.from_pretrained(exported)
    assert hf_tok.word_tokenizer_type == "mecab" and hf_tok.subword_tokenizer_type == "wordpiece"
    assert hf_tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
    assert hf_tok.mask_token == "[MASK]" and hf_tok.model_max_length == 64


def test_fill_mask_pipeline_matches_melos(exported, trained):
    from transformers import BertForMaskedLM, BertJapaneseTokenizer, pipeline

    ours, tokenizer = load_pretrained(trained)
    mecab = MecabWords()
    fill = pipeline("fill-mask", model=BertForMaskedLM.from_pretrained(exported),
                    tokenizer=BertJapaneseTokenizer.from_pretrained(exported), device="cpu")
    for text in SENTENCES:
        [expected] = fill_mask(ours, tokenizer, text, 5, mecab)
        # Melos never proposes a special token or a ## continuation for a blank; the pipeline
        # ranks the whole vocabulary, so ask it for enough to drop those and keep five
        got = [p for p in fill(text, top_k=len(tokenizer.vocab))
               if p["token"] >= len(SPECIAL_TOKENS) and not tokenizer.vocab[p["token"]].startswith("##")][:5]
        assert [tokenizer.vocab[p["token"]] for p in got] == [t for t, _ in expected], text
        assert [p["score"] for p in got] == pytest.approx([s for _, s in expected], rel=1e-4, abs=1e-6), text


def test_hf_tokenizer_gives_melos_ids_on_heldout_sentences(exported, merosu):
    from transformers import BertJapaneseTokenizer

    hf_tok = BertJapaneseTokenizer.from_pretrained(exported)
    tokenizer, mecab = merosu.tokenizer, MecabWords()
    rows = [r for path in merosu.shard_paths("heldout") for r in pq.read_table(path, columns=["text", "words"]).to_pylist()]
    assert len(rows) >= 20
    unk_seen = 0
    for row in rows:
        # the ids training and evaluation used (from the shard's MeCab words) ...
        [from_words] = tokenizer.encode_words_batch([row["words"]])
        # ... equal Melos's raw-text path and Hugging Face's tokenizer
        assert tokenizer.encode_text(row["text"], mecab) == from_words
        hf_ids = hf_tok(row["text"], add_special_tokens=True)["input_ids"]
        assert hf_ids == [tokenizer.cls_id, *from_words, tokenizer.sep_id], row["text"]
        unk_seen += from_words.count(tokenizer.unk_id)
    # full-width forms are NFKC-normalised by both before MeCab
    assert hf_tok("ＭＥＬＯＳ[MASK]")["input_ids"][1:-1] == tokenizer.encode_text("ＭＥＬＯＳ[MASK]", mecab)
    assert tokenizer.encode_text("ＭＥＬＯＳ", mecab) == tokenizer.encode_text("MELOS", mecab)


def test_model_card_tells_provenance_metrics_run_and_license(exported, trained):
    card = (exported / "README.md").read_text(encoding="utf-8")
    assert "pipeline_tag: fill-mask" in card
    assert "2 layers, hidden size 32, 2 attention heads" in card
    assert "走れメロス" in card and "太宰治" in card and "ちくま文庫" in card  # the 底本 of the embedded text
    assert "| top-1 accuracy | 0.1234 | 0.0567 |" in card
    assert "0123456789abcdef0123456789abcdef" in card and "fedcba9876543210fedcba9876543210" in card
    assert "public domain" in card and "All 1 training document(s) are Aozora Bunko files" in card
    assert "`max_steps`: 40" in card


def test_card_without_a_pipeline_record_says_so(trained, tmp_path):
    out = export_hf(trained, tmp_path / "bare")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "Not recorded with this model" in card and "no MLflow run recorded" in card
    assert "cannot say whether all of them were public domain" in card
    # readable as any file the user writes (umask), not owner-only as temporary files are made
    mask = os.umask(0o022)
    os.umask(mask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~mask)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()} == {
        f.name: oct(0o666 & ~mask) for f in out.iterdir()}


def test_export_is_atomic_and_never_overwrites(trained, tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken already exists and is not empty"):
        export_hf(trained, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    # a broken model directory: nothing appears at the target, no temporary directory is left
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a Melos model"):
        export_hf(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken"]

    # a failure midway (after the weights are written, before the card) leaves nothing either
    import mlm_core.hf_export as hf

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "model_card", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(trained, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken"]
