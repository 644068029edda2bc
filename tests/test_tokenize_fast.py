"""The fast tokenize path: a part's MeCab outputs read with one split must give exactly the
rows of fugashi's node API (unknown words included, whose context ids do not give their part
of speech), on the fast path and on the per-sentence fallback that a whitespace token forces;
and importing mlm_core's data modules must not load PyTorch."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mlm_core.config import TokenizeConfig
from mlm_core.sentences import split_sentences
from mlm_core.shards import _string_array, heldout_test, is_heldout, read_part, tokenize_part
from mlm_core.tokenizer import MecabWords

PLAIN = "吾輩は猫である。名前はまだ無い。〓と/\\を書いた。\n「どこで生れたか」とんと見当がつかぬ。ｱｲｳ abc-def 𠮷野家\n\n何でも薄暗いじめじめした所で泣いていた。\n"
# U+3000 is a MeCab token (空白) that the reading drops; a line of it alone has no words.
SPACED = "メロスは激怒した。\u3000必ず、かの邪智暴虐の王を除かなければならぬと決意した。\n\u3000\nEOS と書いた。\n"


def expected_rows(docs: dict[str, str], cfg: TokenizeConfig) -> list[dict]:
    """The part's rows computed sentence by sentence through the node API."""
    mecab, rows = MecabWords(), []
    for doc_id, text in docs.items():
        index = 0
        for line in text.split("\n"):
            for sentence in split_sentences(line.strip()):
                words, pos = mecab.nodes_reference(sentence)
                if words:
                    rows.append({"doc_id": doc_id, "sentence_index": index, "text": sentence, "words": words,
                                 "pos": pos, "heldout": is_heldout(sentence, cfg.heldout_fraction, cfg.split_salt)})
                    index += 1
    return rows


@pytest.mark.parametrize("docs", [{"a": PLAIN, "e": "\u3000\n", "b": PLAIN.replace("猫", "犬")}, {"a": PLAIN, "s": SPACED}],
                         ids=["one-split", "fallback"])
def test_part_rows_equal_the_node_api_reading(docs: dict[str, str], tmp_path: Path) -> None:
    for doc_id, text in docs.items():
        (tmp_path / f"{doc_id}.txt").write_text(text, encoding="utf-8")
    cfg = TokenizeConfig(heldout_fraction=0.5)
    summary = tokenize_part(str(tmp_path), list(docs), str(tmp_path), "part", cfg)
    part = read_part(tmp_path, "part")
    expected = expected_rows(docs, cfg)
    assert {r["heldout"] for r in expected} == {False, True}
    for split, held in (("train", False), ("heldout", True)):
        mine = [r for r in expected if r["heldout"] == held]
        assert part[split].to_pylist() == [{k: v for k, v in r.items() if k != "heldout"} for r in mine]
        assert summary["counts"][split] == {"sentences": len(mine), "words": sum(len(r["words"]) for r in mine),
                                            "characters": sum(len(r["text"]) for r in mine)}
        counted = part["counts"].filter(pc.equal(part["counts"].column("split"), split))
        assert dict(zip(counted.column("word").to_pylist(), counted.column("count").to_pylist())) == Counter(
            w for r in mine for w in r["words"])
    first = expected[0]
    assert summary["sample"] == {k: first[k] for k in ("doc_id", "text", "words", "pos")}


def test_string_arrays_built_from_joined_strings_equal_pyarrows() -> None:
    for strings in (["文。", "", "ｱｲｳ\t𠮷"], ["二行\nの文", "x"], [""], []):
        assert _string_array(strings).equals(pa.array(strings, pa.string()))


def test_a_part_without_words_has_no_rows(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\u3000\n\n", encoding="utf-8")
    summary = tokenize_part(str(tmp_path), ["empty"], str(tmp_path), "part", TokenizeConfig())
    part = read_part(tmp_path, "part")
    assert part["train"].num_rows == part["heldout"].num_rows == part["counts"].num_rows == 0
    assert summary["sample"] is None and summary["counts"]["train"]["sentences"] == 0


def salted_hash_below(text: str, fraction: float, salt: str) -> bool:
    """The split rule written out: a keyed blake2b (long salts hashed to 64 bytes) < fraction."""
    key = salt.encode()
    key = hashlib.blake2b(key, digest_size=64).digest() if len(key) > 64 else key
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=key).digest(), "big") / 2**64 < fraction


def test_heldout_test_keeps_the_split_rule() -> None:
    texts = [f"文{i}。" for i in range(400)]
    for fraction, salt in ((0.3, "melos"), (0.0, "x"), (0.5, "長い塩" * 40)):
        test = heldout_test(fraction, salt)
        assert [test(t) for t in texts] == [salted_hash_below(t, fraction, salt) for t in texts]
        assert [is_heldout(t, fraction, salt) for t in texts] == [test(t) for t in texts]
    assert 60 < sum(map(heldout_test(0.3, "melos"), texts)) < 180


def test_heldout_test_is_exact_at_the_fraction() -> None:
    """Fractions equal to a text's hash / 2**64 and their float neighbours: the precomputed
    threshold must decide exactly as the division does."""
    texts = [f"文{i}。" for i in range(50)]
    for text in texts[:10]:
        value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=b"melos").digest(), "big") / 2**64
        for fraction in (value, math.nextafter(value, 0.0), math.nextafter(value, 1.0)):
            test = heldout_test(fraction, "melos")
            assert [test(t) for t in texts] == [salted_hash_below(t, fraction, "melos") for t in texts]
    assert all(map(heldout_test(1.0, "melos"), texts))


def test_data_modules_import_without_torch() -> None:
    code = ("import sys, mlm_core.shards, mlm_core.download, mlm_core.tokenizer; assert 'torch' not in sys.modules;"
            "from mlm_core import tokenize_corpus, build_vocab; assert 'torch' not in sys.modules;"
            "import mlm_core; assert mlm_core.train_model.__module__ == 'mlm_core.train'; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    import mlm_core

    with pytest.raises(AttributeError, match="no_such_stage"):
        mlm_core.no_such_stage  # noqa: B018
