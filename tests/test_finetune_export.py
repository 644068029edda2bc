"""A fine-tuned model exported in Hugging Face format: transformers loads every weight and its
text-classification / token-classification pipelines predict what Melos predicts."""

from __future__ import annotations

import pytest
import torch

from mlm_core.finetune import FinetuneConfig, FinetuneModel, encode_examples, predict_ids, train_head
from mlm_core.finetune_data import Example
from mlm_core.finetune_export import export_finetuned_hf
from mlm_core.model import BertForMaskedLM, ModelConfig

transformers = pytest.importorskip("transformers")

TEXTS = ["メロスは激怒した。", "メロスには政治がわからぬ。", "王は、人を殺します。", "私は、ちゃんと死ぬる覚悟で居るのに。",
         "セリヌンティウスは、すべてを察した様子で首肯き、メロスをひしと抱きしめた。", "走れ！メロス。"]


def _trained(merosu, kind: str, labels: list[str]):
    """A tiny model given a few steps of training, so its heads are not at their initial zeros."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(merosu.tokenizer), hidden_size=32, num_layers=2, num_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    model = FinetuneModel(BertForMaskedLM(cfg), len(labels), kind)
    if kind == "classification":
        exs = [Example(label=labels[i % len(labels)], text=t) for i, t in enumerate(TEXTS)]
    else:
        exs = [Example(tokens=(w := merosu.tokenizer.split_words(t)), tags=[labels[len(x) % len(labels)] for x in w]) for t in TEXTS]
    enc = encode_examples(exs, merosu.tokenizer, kind, {l: i for i, l in enumerate(labels)}, 64, resplit=False)
    train_head(model, enc, FinetuneConfig(max_steps=8, learning_rate=1e-2), 0, torch.device("cpu"))
    return model.eval()


def _load_exactly(cls, out):
    """transformers' class on the export, every weight matched: none missing, unexpected or mis-shaped."""
    hf, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return hf


def test_sequence_classification_pipeline_matches_melos(merosu, tmp_path):
    from transformers import BertForSequenceClassification, BertJapaneseTokenizer, pipeline

    labels = ["negative", "neutral", "positive"]
    model = _trained(merosu, "classification", labels)
    out = export_finetuned_hf(model, merosu.tokenizer, labels, tmp_path / "cls")
    hf = _load_exactly(BertForSequenceClassification, out)
    assert hf.config.id2label == dict(enumerate(labels))
    pipe = pipeline("text-classification", model=hf, tokenizer=BertJapaneseTokenizer.from_pretrained(out), device="cpu")
    enc = encode_examples([Example(label=labels[0], text=t) for t in TEXTS], merosu.tokenizer, "classification",
                          {l: i for i, l in enumerate(labels)}, 64)
    ours = [labels[p[0]] for p in predict_ids(model, enc, torch.device("cpu"))]
    got = [r["label"] for r in pipe(TEXTS)]
    assert got == ours
    assert len(set(ours)) > 1 or len(TEXTS) == 1  # the comparison is not between constant outputs
    # and the probabilities agree, not only the argmax
    with torch.no_grad():
        from mlm_core.finetune import _tensors, pack

        logits = model(**_tensors(pack(enc, [0], 64, 0, "classification"), torch.device("cpu")))
    probs = torch.softmax(logits[0], -1)
    assert pipe(TEXTS[0], top_k=None)[0]["score"] == pytest.approx(float(probs.max()), rel=1e-4)


def test_token_classification_pipeline_matches_melos(merosu, tmp_path):
    from transformers import BertForTokenClassification, BertJapaneseTokenizer, pipeline

    labels = ["O", "B-X", "I-X"]
    model = _trained(merosu, "ner", labels)
    out = export_finetuned_hf(model, merosu.tokenizer, labels, tmp_path / "tok")
    hf = _load_exactly(BertForTokenClassification, out)
    pipe = pipeline("token-classification", model=hf, tokenizer=BertJapaneseTokenizer.from_pretrained(out),
                    device="cpu", ignore_labels=[])
    predicted = set()
    for text in TEXTS:
        words = merosu.tokenizer.split_words(text)
        enc = encode_examples([Example(tokens=words, tags=["O"] * len(words))], merosu.tokenizer, "ner",
                              {l: i for i, l in enumerate(labels)}, 64, resplit=False)
        ours = [labels[p] for p in predict_ids(model, enc, torch.device("cpu"))[0]]
        by_index = {r["index"]: r["entity"] for r in pipe(text)}  # index: position among the input ids
        got = [by_index[int(p)] for p in enc.token_pos[0]]  # the label of each word's first subword
        assert got == ours, text
        predicted.update(ours)
    assert len(predicted) > 1
