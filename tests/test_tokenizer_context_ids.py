"""MeCab writes the left context id of dictionary words in the place of their part of speech
(``_CONTEXT_FORMAT``), and the reading maps ids back through left-id.def. That is only right
for a dictionary whose every entry's left context id fixes its pos1 and pos2: this reads every
entry of the installed dictionary's sys.dic and checks it, and checks that another dictionary
is read through the formatted parts of speech instead."""

from __future__ import annotations

import os

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from mlm_core import tokenizer
from mlm_core.config import TokenizeConfig
from mlm_core.shards import read_part, tokenize_part
from mlm_core.tokenizer import MecabWords, dictionary_identity, pos_by_context_id

_TOKEN = np.dtype([("left", "<u2"), ("right", "<u2"), ("posid", "<u2"), ("cost", "<i2"), ("feature", "<u4"),
                   ("compound", "<u4")])


def dictionary_entries(path: Path) -> list[tuple[int, str]]:
    """(left context id, pos1-pos2) of every distinct (id, feature) of a compiled MeCab
    dictionary: a 72-byte header (ten uint32, then the charset), the double array, the
    16-byte tokens, then the NUL-terminated features the tokens point into."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    _, _, _, lexsize, _, _, dsize, tsize, fsize, _ = struct.unpack("<10I", bytes(raw[:40]))
    tokens = np.frombuffer(raw[72 + dsize: 72 + dsize + tsize], dtype=_TOKEN)
    assert len(tokens) == lexsize
    features = bytes(raw[72 + dsize + tsize: 72 + dsize + tsize + fsize])
    pairs = np.unique(np.stack([tokens["left"].astype(np.int64), tokens["feature"].astype(np.int64)], 1), axis=0)
    pos_at: dict[int, str] = {}
    entries = []
    for left, offset in pairs.tolist():
        if offset not in pos_at:
            fields = features[offset: features.index(b"\0", offset)].decode("utf-8").split(",")
            pos_at[offset] = f"{fields[0]}-{fields[1]}" if fields[1] not in ("", "*") else fields[0]
        entries.append((left, pos_at[offset]))
    return entries


def installed_dicdir() -> Path:
    import fugashi

    return Path(fugashi.Tagger().dictionary_info[0]["filename"]).parent


def test_every_dictionary_word_has_the_part_of_speech_of_its_context_id() -> None:
    dicdir = installed_dicdir()
    names = pos_by_context_id(dicdir)
    assert names is not None, f"{dicdir} is not in _CHECKED_DICTIONARIES: check it with this test, then add it"
    entries = dictionary_entries(dicdir / "sys.dic")
    assert len(entries) > 100_000
    wrong = [(left, pos, names[left]) for left, pos in entries if names[left] != pos]
    assert wrong == []
    # Unknown words are written with their part of speech, never an id: none may look like one.
    unknown = dictionary_entries(dicdir / "unk.dic")
    assert unknown and not any(pos.isdigit() for _, pos in unknown)
    assert any(names[left] != pos for left, pos in unknown)  # why unknown words keep %F-[0,1]


def test_an_unchecked_dictionary_is_read_through_formatted_parts_of_speech(tmp_path: Path, monkeypatch) -> None:
    dicdir = installed_dicdir()
    copy = tmp_path / "dic"
    copy.mkdir()
    for name in ("left-id.def", "unk.dic"):
        shutil.copy(dicdir / name, copy / name)
    (copy / "sys.dic").write_bytes(b"")
    assert pos_by_context_id(copy) is None  # same ids, another sys.dic
    assert dictionary_identity(dicdir) in tokenizer._CHECKED_DICTIONARIES

    text = "吾輩は猫である。〓と/\\を書いた。\nｱｲｳ abc-def 𠮷野家。\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    fast = tokenize_part(str(tmp_path), ["a"], str(tmp_path), "fast", TokenizeConfig(heldout_fraction=0.0))
    monkeypatch.setattr(tokenizer, "_CHECKED_DICTIONARIES", set())
    mecab = MecabWords()
    assert mecab.pos_by_id() is None
    monkeypatch.setitem(tokenizer._SPLITTERS, (os.getpid(), tokenizer.DEFAULT_SPLITTER), mecab)
    slow = tokenize_part(str(tmp_path), ["a"], str(tmp_path), "slow", TokenizeConfig(heldout_fraction=0.0))
    assert read_part(tmp_path, "slow")["train"].equals(read_part(tmp_path, "fast")["train"])
    assert slow["sample"] == fast["sample"] and slow["counts"] == fast["counts"]
    rows = read_part(tmp_path, "fast")["train"].to_pylist()
    assert [(r["words"], r["pos"]) for r in rows] == [mecab.nodes_reference(r["text"]) for r in rows]


@pytest.mark.parametrize("text", ["〓と/\\を書いた。", "ｱｲｳ 　 テスト\tabc ㋿ 𠮷野家", "\u2028x\u0085 a  b"])
def test_mecab_words_reads_ids_and_unknown_words_as_the_node_api(text: str) -> None:
    mecab = MecabWords()
    assert mecab.pos_by_id() is not None
    assert mecab(text) == mecab.nodes_reference(text)
