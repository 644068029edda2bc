"""Reading published BERT checkpoints: small real checkpoints built here with transformers
(random weights, a vocabulary from the embedded corpus split by the checkpoint's own word
splitter), loaded by Melos; logits and token ids must equal transformers' own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mlm_core.checkpoint import load_pretrained, save_model_dir
from mlm_core.config import VocabConfig
from mlm_core.hf_import import inspect_hf_dir, load_hf_pretrained, resolve_source
from mlm_core.sentences import split_sentences
from mlm_core.shards import iter_document_lines
from mlm_core.tokenizer import SPECIAL_TOKENS, word_splitter
from mlm_core.vocab import train_wordpiece_from_counts

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "メロスは[MASK]した。",
    "私は、[MASK]を信じている。",
    "ＭＥＬＯＳは走った、Ｄｉｏｎｉｓは笑った。",
    "セリヌンティウスは縄打たれた。[SEP]",
]


def corpus_sentences(merosu) -> list[str]:
    docs = merosu.root / "download" / "docs"
    return [s for p in sorted(docs.glob("*.txt")) for line in iter_document_lines(p) for s in split_sentences(line)]


def build_checkpoint(out: Path, sentences: list[str], *, dic: str, subword: str = "wordpiece", lower: bool = False,
                     head: str = "BertForMaskedLM", tied: bool = True, safetensors: bool = True,
                     word_type: str = "mecab", layers: int = 2) -> Path:
    """A random-weight BERT + BertJapaneseTokenizer directory, as save_pretrained writes it."""
    spec = ("basic" if word_type == "basic" else f"mecab:{dic}") + (":lower" if lower else "")
    split = word_splitter(spec)
    counts = Counter(w for s in sentences for w in split(s)[0])
    if subword == "character":
        vocab = SPECIAL_TOKENS + sorted({c for w in counts for c in w})
    else:
        vocab = train_wordpiece_from_counts(counts, VocabConfig(vocab_size=1200, min_frequency=2))
    out.mkdir(parents=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    kwargs = {"word_tokenizer_type": word_type, "subword_tokenizer_type": subword, "do_lower_case": lower}
    if word_type == "mecab":
        kwargs["mecab_kwargs"] = {"mecab_dic": dic}
    tok = transformers.BertJapaneseTokenizer(str(out / "vocab.txt"), **kwargs)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, type_vocab_size=2, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = getattr(transformers, head)(config)
    if not tied:  # make the untied decoder differ from the embeddings
        with torch.no_grad():
            model.cls.predictions.decoder.weight.normal_(0, 0.05)
    model.save_pretrained(out, safe_serialization=safetensors)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sentences(merosu) -> list[str]:
    return corpus_sentences(merosu)


@pytest.fixture(scope="module")
def ipadic_dir(sentences, tmp_path_factory) -> Path:
    pytest.importorskip("ipadic")
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "ipadic", sentences, dic="ipadic")


CASES = {
    "ipadic-wordpiece-tied-safetensors": {"dic": "ipadic"},
    "unidic_lite-character-pretraining-untied-bin": {
        "dic": "unidic_lite", "subword": "character", "head": "BertForPreTraining", "tied": False, "safetensors": False},
    "basic-lower-wordpiece": {"dic": None, "word_type": "basic", "lower": True, "layers": 1},
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_ids_equal_transformers(case, sentences, tmp_path) -> None:
    opts = CASES[case]
    if opts.get("dic") == "ipadic":
        pytest.importorskip("ipadic")
    path = build_checkpoint(tmp_path / case, sentences, **opts)
    model, tokenizer = load_hf_pretrained(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    assert type(hf_tok).__name__ == "BertJapaneseTokenizer"
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(path).eval()
    texts = TEXTS + sentences[::25] + ["Hello, World! Ｍｅｌｏｓ was ANGRY."]
    for text in texts:
        ids = tokenizer.encode_text(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
    batch = [tokenizer.encode_text(t)[:60] for t in texts[:6]]
    width = max(map(len, batch)) + 2
    input_ids = torch.tensor([[tokenizer.cls_id, *b, tokenizer.sep_id] + [tokenizer.pad_id] * (width - len(b) - 2)
                              for b in batch])
    mask = (input_ids != tokenizer.pad_id).long()
    with torch.no_grad():
        ours, _ = model(input_ids, attention_mask=mask)
        theirs = hf_model(input_ids=input_ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5, rtol=1e-4)
    assert model.config.tie_word_embeddings == opts.get("tied", True)
    # a Melos model directory keeps the tokenizer: load_pretrained rebuilds the same splitter
    save_model_dir(tmp_path / "melos", model, tokenizer, {})
    again_model, again = load_pretrained(tmp_path / "melos")
    assert again.spec() == tokenizer.spec()
    assert [again.encode_text(t) for t in texts] == [tokenizer.encode_text(t) for t in texts]
    assert again.split_words(texts[0]) == tokenizer.split_words(texts[0])
    # and exports back in the format it came in: transformers reads the same tokenizer and logits
    from mlm_core.hf_export import export_hf

    out = export_hf(tmp_path / "melos", tmp_path / "export")
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (tc["word_tokenizer_type"], tc["subword_tokenizer_type"], tc["do_lower_case"]) == (
        opts.get("word_type", "mecab"), opts.get("subword", "wordpiece"), opts.get("lower", False))
    assert tc.get("mecab_kwargs", {}).get("mecab_dic") == opts.get("dic")
    back_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert [back_tok(t, add_special_tokens=False)["input_ids"] for t in texts] == [tokenizer.encode_text(t) for t in texts]
    with torch.no_grad():
        back = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()(input_ids=input_ids, attention_mask=mask).logits
    assert torch.allclose(back[real], theirs[real], atol=1e-5, rtol=1e-4)


def test_ipadic_words_and_parts_of_speech(ipadic_dir) -> None:
    _, tokenizer = load_hf_pretrained(ipadic_dir)
    assert tokenizer.spec()["splitter"] == "mecab:ipadic"
    words = tokenizer.split_words("メロスは激怒した。")
    assert words == ["メロス", "は", "激怒", "し", "た", "。"]  # IPAdic's split (UniDic's is the same here)
    _, pos = tokenizer.words()("メロスは激怒した。")
    assert pos[0] == "名詞-一般" and pos[2] == "名詞-サ変接続"  # IPAdic's pos1-pos2, not UniDic's 普通名詞
    from mlm_core.data import POS_CLASSES, pos_class

    assert POS_CLASSES[pos_class("記号-句点")] == "補助記号" and POS_CLASSES[pos_class("名詞-サ変接続")] == "名詞"


def test_hub_cache_offline(ipadic_dir, tmp_path) -> None:
    """A hub id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--melos-test--tiny-ipadic"
    shutil.copytree(ipadic_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = ("from mlm_core.hf_import import resolve_source, load_hf_pretrained; p = resolve_source('melos-test/tiny-ipadic');"
            "print(p); m, t = load_hf_pretrained(p); print(t.spec()['splitter'], len(t))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == str(repo / "snapshots" / commit)
    assert out.stdout.splitlines()[1].startswith("mecab:ipadic ")
    missing = subprocess.run([sys.executable, "-c", "from mlm_core.hf_import import resolve_source; "
                              "resolve_source('melos-test/not-cached')"], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "HF_HUB_OFFLINE" in missing.stderr.strip().splitlines()[-1]


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data), encoding="utf-8")


BAD = {
    "missing dir": (lambda d: shutil.rmtree(d), "no such directory"),
    "no config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "roberta": (lambda d: _edit_json(d / "config.json", model_type="roberta", architectures=["RobertaForMaskedLM"]),
                "model_type 'roberta'"),
    "deberta": (lambda d: _edit_json(d / "config.json", model_type="deberta-v2"), "is not supported"),
    "no MLM head": (lambda d: _edit_json(d / "config.json", architectures=["BertForSequenceClassification"]),
                    "no masked-LM head"),
    "sentencepiece": (lambda d: _edit_json(d / "tokenizer_config.json", subword_tokenizer_type="sentencepiece"),
                      "SentencePiece"),
    "unknown tokenizer class": (lambda d: _edit_json(d / "tokenizer_config.json", tokenizer_class="T5Tokenizer"),
                                "tokenizer class T5Tokenizer"),
    "no tokenizer class": (lambda d: (_edit_json(d / "tokenizer_config.json", tokenizer_class=None),
                                      _edit_json(d / "config.json", tokenizer_class=None)), "no tokenizer_class"),
    "missing dictionary": (lambda d: _edit_json(d / "tokenizer_config.json", mecab_kwargs={"mecab_dic": "unidic"}),
                           "pip install unidic"),
    "vocab too short": (lambda d: (d / "vocab.txt").write_text(
        "\n".join((d / "vocab.txt").read_text(encoding="utf-8").splitlines()[:-3]) + "\n", encoding="utf-8"),
        "vocab.txt has"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_fail_in_one_line(case, ipadic_dir, tmp_path) -> None:
    if case == "missing dictionary":
        try:
            import unidic  # noqa: F401

            pytest.skip("unidic is installed here")
        except ImportError:
            pass
    d = tmp_path / "ck"
    shutil.copytree(ipadic_dir, d)
    change, expected = BAD[case]
    change(d)
    with pytest.raises(ValueError) as err:
        inspect_hf_dir(resolve_source(str(d)) if case != "missing dir" else d)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
