"""Tests for mlm_core.vocab (WordPiece training, vocab.txt) and mlm_core.tokenizer
(MeCab words, WordPiece ids), on the real 走れメロス corpus."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlm_core.config import VocabConfig
from mlm_core.shards import iter_rows, shard_paths
from mlm_core.tokenizer import CONTINUATION, SPECIAL_TOKENS, MecabWords, WordPieceTokenizer
from mlm_core.vocab import VOCAB_FILE, build_vocab, train_wordpiece, vocab_key


@dataclass
class Built:
    root: Path
    tokenize_dir: Path
    shards: dict
    vocab_dir: Path
    manifest: dict
    tokenizer: WordPieceTokenizer


def rows(tokenize_dir: Path, shards: dict, split: str) -> list[dict]:
    out = []
    for batch in iter_rows(shard_paths(tokenize_dir, split, shards), ["text", "words"]):
        out += batch.to_pylist()
    return out


@pytest.fixture(scope="module")
def built(merosu) -> Built:
    """The session's 走れメロス shards and vocabulary (built once in conftest)."""
    return Built(merosu.root, merosu.tokenize_dir, merosu.tokenize_manifest, merosu.vocab_dir,
                 merosu.vocab_manifest, merosu.tokenizer)


@pytest.fixture(scope="module")
def train_rows(built: Built) -> list[dict]:
    return rows(built.tokenize_dir, built.shards, "train")


@pytest.fixture(scope="module")
def heldout_rows(built: Built) -> list[dict]:
    return rows(built.tokenize_dir, built.shards, "heldout")


# --- vocab.txt ---------------------------------------------------------------------------------


def test_vocab_file_is_bert_format(built: Built) -> None:
    raw = (built.vocab_dir / VOCAB_FILE).read_bytes()
    assert raw.endswith(b"\n") and not raw.endswith(b"\n\n")
    assert b"\r" not in raw
    lines = raw.decode("utf-8").split("\n")[:-1]
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(lines) == len(set(lines)) == built.manifest["counts"]["vocab_size"]
    assert all(line and line == line.strip() and " " not in line for line in lines)
    continuations = [t for t in lines if t.startswith("##")]
    assert len(continuations) == built.manifest["counts"]["continuation_tokens"] > 100
    assert all(len(t) > 2 for t in continuations)
    assert "[UNK]" not in lines[5:] and "[MASK]" not in lines[5:]
    # words and pieces the story is made of
    for token in ("メロス", "は", "##た", "。"):
        assert token in lines
    assert sorted(p.name for p in built.vocab_dir.iterdir()) == ["manifest.json", VOCAB_FILE]


def test_manifest_describes_the_build(built: Built) -> None:
    m = built.manifest
    assert m["stage"] == "vocab"
    assert m["upstream_fingerprint"] == built.shards["fingerprint"]
    assert m["fingerprint"] == vocab_key(built.shards["fingerprint"], VocabConfig())
    assert m["config"] == VocabConfig().model_dump()
    assert m["counts"]["special_tokens"] == 5
    assert m["counts"]["vocab_size"] <= VocabConfig().vocab_size


def test_vocab_key_follows_inputs() -> None:
    base = vocab_key("abc", VocabConfig())
    assert base == vocab_key("abc", VocabConfig())
    assert vocab_key("abd", VocabConfig()) != base
    assert vocab_key("abc", VocabConfig(vocab_size=4000)) != base
    assert vocab_key("abc", VocabConfig(min_frequency=3)) != base
    assert vocab_key("abc", VocabConfig(limit_alphabet=100)) != base


# --- coverage ------------------------------------------------------------------------------------


def test_training_words_are_all_known(built: Built, train_rows) -> None:
    words = [w for r in train_rows for w in r["words"]]
    assert not any(built.tokenizer.words_unknown(words))
    cov = built.manifest["coverage"]["train"]
    assert cov["words"] == len(words) == built.shards["counts"]["splits"]["train"]["words"]
    assert cov["unknown_words"] == 0 and cov["unk_word_rate"] == 0.0


def test_heldout_coverage_is_what_a_recount_gives(built: Built, heldout_rows) -> None:
    tok = built.tokenizer
    words = [w for r in heldout_rows for w in r["words"]]
    unknown = sum(tok.words_unknown(words))
    subwords = sum(len(ids) for ids in tok.encode_words_batch([r["words"] for r in heldout_rows]))
    cov = built.manifest["coverage"]["heldout"]
    assert cov["words"] == len(words) == built.shards["counts"]["splits"]["heldout"]["words"]
    assert cov["unknown_words"] == unknown
    assert 0 < unknown < len(words) * 0.2  # some held-out words are new; most are not
    assert cov["unk_word_rate"] == pytest.approx(unknown / len(words))
    assert cov["unk_word_rate"] == pytest.approx(cov["unknown_words"] / cov["words"])
    assert cov["subwords_per_word"] == pytest.approx(subwords / len(words))
    assert cov["subwords_per_word"] >= 1.0
    # a word is unknown exactly when its encoding contains [UNK]
    for word, unk in zip(words, tok.words_unknown(words)):
        assert unk == (tok.unk_id in tok.encode_words_batch([[word]])[0])


# --- round trips -----------------------------------------------------------------------------


def test_file_round_trip_gives_the_same_tokenizer(built: Built, train_rows, heldout_rows) -> None:
    tokens = train_wordpiece(shard_paths(built.tokenize_dir, "train", built.shards), VocabConfig())
    in_memory = WordPieceTokenizer(tokens)
    loaded = built.tokenizer
    assert loaded.vocab == tokens
    assert loaded.token_to_id == in_memory.token_to_id
    assert len(loaded) == len(tokens)
    batch = [r["words"] for r in train_rows + heldout_rows] + [["存在しない語彙", "メロス"], []]
    assert loaded.encode_words_batch(batch) == in_memory.encode_words_batch(batch)
    assert loaded.encode_words_batch([]) == []


def test_save_load_save_is_byte_identical(built: Built, tmp_path: Path) -> None:
    original = (built.vocab_dir / VOCAB_FILE).read_bytes()
    built.tokenizer.save(tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_bytes() == original
    WordPieceTokenizer.from_file(tmp_path / "a.txt").save(tmp_path / "b.txt")
    assert (tmp_path / "b.txt").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary leftovers


def test_decode_of_encode_gives_back_training_sentences(built: Built, train_rows) -> None:
    tok = built.tokenizer
    checked = 0
    for row, ids in zip(train_rows, tok.encode_words_batch([r["words"] for r in train_rows])):
        assert tok.unk_id not in ids
        if " " in row["text"]:
            continue  # MeCab drops spaces; the words cannot give them back
        assert tok.decode(ids) == row["text"]
        pieces = tok.convert_ids_to_tokens(ids)
        # a word's first piece has no ##, the others do
        assert sum(not p.startswith(CONTINUATION) for p in pieces) == len(row["words"])
        checked += 1
    assert checked > 300


def test_decode_skips_special_tokens_unless_asked(built: Built) -> None:
    tok = built.tokenizer
    ids = [tok.cls_id] + tok.encode_words_batch([["メロス", "は"]])[0] + [tok.mask_id, tok.sep_id, tok.pad_id]
    assert tok.decode(ids) == "メロスは"
    assert tok.decode(ids, skip_special=False) == "[CLS]メロスは[MASK][SEP][PAD]"


# --- encode_text ---------------------------------------------------------------------------------


def test_encode_text_with_a_literal_mask(built: Built) -> None:
    tok, mecab = built.tokenizer, MecabWords()
    ids = tok.encode_text("メロスは[MASK]した。", mecab)
    assert ids.count(tok.mask_id) == 1
    left = tok.encode_words_batch([mecab("メロスは")[0]])[0]
    right = tok.encode_words_batch([mecab("した。")[0]])[0]
    assert ids == left + [tok.mask_id] + right
    assert tok.unk_id not in ids
    assert tok.decode(ids, skip_special=False) == "メロスは[MASK]した。"

    two = tok.encode_text("[CLS][MASK]は[MASK]。[SEP]", mecab)
    assert two.count(tok.mask_id) == 2
    assert two[0] == tok.cls_id and two[-1] == tok.sep_id

    plain = "メロスは激怒した。"
    assert tok.encode_text(plain, mecab) == tok.encode_words_batch([mecab(plain)[0]])[0]
    assert tok.encode_text("", mecab) == []
    assert tok.encode_text("[MASK]", mecab) == [tok.mask_id]
    # not a special token: split and encoded as text
    assert tok.mask_id not in tok.encode_text("[MASKED]", mecab)


def test_words_unknown_and_long_words(built: Built) -> None:
    tok = built.tokenizer
    assert tok.words_unknown(["メロス", "龘", "🍣", "は"]) == [False, True, True, False]
    assert tok.words_unknown([]) == []
    short = WordPieceTokenizer(tok.vocab, max_input_chars_per_word=3)
    assert short.words_unknown(["メロス", "メロスは"]) == [False, True]
    assert short.encode_words_batch([["メロスは"]]) == [[tok.unk_id]]


# --- vocabulary size, frequency, alphabet, determinism ------------------------------------------


@pytest.fixture(scope="module")
def train_paths(built: Built) -> list[Path]:
    return shard_paths(built.tokenize_dir, "train", built.shards)


@pytest.mark.parametrize("size", [1200, 1500, 2000])
def test_vocab_size_is_an_upper_bound(train_paths, size: int) -> None:
    # above the corpus alphabet (~1140 characters and ## forms) the target is reached
    # exactly when every pair may merge, and never exceeded
    assert len(train_wordpiece(train_paths, VocabConfig(vocab_size=size, min_frequency=1))) == size
    assert len(train_wordpiece(train_paths, VocabConfig(vocab_size=size, min_frequency=2))) <= size


def test_higher_min_frequency_gives_smaller_or_equal_vocab(train_paths) -> None:
    sizes = [len(train_wordpiece(train_paths, VocabConfig(min_frequency=f))) for f in (1, 2, 3, 5, 10)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > sizes[-1]


def test_limit_alphabet_keeps_the_most_frequent_characters(train_paths, train_rows) -> None:
    tokens = train_wordpiece(train_paths, VocabConfig(limit_alphabet=300))
    single = [t for t in tokens[5:] if len(t) == 1]
    assert len(single) == 300
    counts: dict[str, int] = {}
    for r in train_rows:
        for w in r["words"]:
            for c in w:
                counts[c] = counts.get(c, 0) + 1
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    assert set(single) == set(ranked[:300])
    continuation_chars = {t[2:] for t in tokens if t.startswith("##") and len(t) == 3}
    assert continuation_chars <= set(single)
    assert train_wordpiece(train_paths, VocabConfig(limit_alphabet=300)) == tokens


def test_building_twice_gives_the_identical_vocab(built: Built, tmp_path: Path) -> None:
    """The trainer assigns ## ids in hash-map order (huggingface/tokenizers#1794); unless
    pinned, ties between equally frequent merges then differ from build to build."""
    first = (built.vocab_dir / VOCAB_FILE).read_bytes()
    for i in range(3):
        m = build_vocab(built.tokenize_dir, built.shards, tmp_path / f"v{i}", VocabConfig())
        assert (tmp_path / f"v{i}" / VOCAB_FILE).read_bytes() == first
        assert m == built.manifest
    for cfg in (VocabConfig(vocab_size=1500, min_frequency=1), VocabConfig(min_frequency=1)):
        paths = shard_paths(built.tokenize_dir, "train", built.shards)
        assert train_wordpiece(paths, cfg) == train_wordpiece(paths, cfg)


def test_vocab_from_word_counts_equals_training_on_the_sentences(built: Built, train_rows, tmp_path: Path) -> None:
    """The stage feeds the trainer each distinct word repeated its count times; that must
    give exactly the vocabulary the trainer learns from the sentences themselves."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mlm_core.vocab import _initial_tokens, count_words

    cfg = VocabConfig()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=cfg.max_input_chars_per_word))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    paths = shard_paths(built.tokenize_dir, "train", built.shards)
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS + _initial_tokens(count_words(paths), None), limit_alphabet=0,
        continuing_subword_prefix=CONTINUATION, show_progress=False,
    )
    tok.train_from_iterator((" ".join(r["words"]) for r in train_rows), trainer)
    from_sentences = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    assert built.tokenizer.vocab == from_sentences

    # an output without word counts (counted from the shards instead) gives the same stage
    legacy = {k: v for k, v in built.shards.items() if k != "word_counts"}
    assert build_vocab(built.tokenize_dir, legacy, tmp_path / "v", cfg) == built.manifest


def test_rebuilding_into_the_same_directory_replaces_it(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "vocab"
    build_vocab(built.tokenize_dir, built.shards, out, VocabConfig(vocab_size=1200, min_frequency=1))
    assert len(WordPieceTokenizer.from_file(out / VOCAB_FILE)) == 1200
    build_vocab(built.tokenize_dir, built.shards, out, VocabConfig())
    assert (out / VOCAB_FILE).read_bytes() == (built.vocab_dir / VOCAB_FILE).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab"]


# --- WordPieceTokenizer and MecabWords -------------------------------------------------------


def test_tokenizer_validates_its_vocabulary() -> None:
    # published vocabularies order their special tokens differently: ids are looked up by name
    swapped = WordPieceTokenizer(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "a"])
    assert (swapped.pad_id, swapped.unk_id, swapped.mask_id, swapped.num_special) == (1, 0, 4, 5)
    # every id below the last special token counts as special (BERT's [unused] slots)
    unused = WordPieceTokenizer(["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdef"))
    assert (unused.unk_id, unused.num_special) == (2, 6)
    with pytest.raises(ValueError, match="special tokens"):
        WordPieceTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="before the regular tokens"):
        WordPieceTokenizer(list("abcdefghijkl") + SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="duplicate"):
        WordPieceTokenizer(SPECIAL_TOKENS + ["a", "##a", "a"])
    tok = WordPieceTokenizer(SPECIAL_TOKENS + ["a", "##b"])
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.num_special) == (0, 1, 2, 3, 4, 5)
    assert tok.encode_words_batch([["ab", "ba", "a"]]) == [[5, 6, 1, 5]]


def test_from_file_tolerates_crlf_and_a_missing_final_newline(tmp_path: Path) -> None:
    (tmp_path / "crlf.txt").write_bytes("\r\n".join(SPECIAL_TOKENS + ["メ", "##ロス"]).encode() + b"\r\n")
    (tmp_path / "bare.txt").write_bytes("\n".join(SPECIAL_TOKENS + ["メ", "##ロス"]).encode())
    for name in ("crlf.txt", "bare.txt"):
        tok = WordPieceTokenizer.from_file(tmp_path / name)
        assert tok.vocab == SPECIAL_TOKENS + ["メ", "##ロス"]
        assert tok.encode_words_batch([["メロス"]]) == [[5, 6]]


def test_mecab_words() -> None:
    mecab = MecabWords()
    words, pos = mecab("メロスは激怒した。")
    assert "".join(words) == "メロスは激怒した。"
    assert len(words) == len(pos) and words[0] == "メロス"
    assert pos[0].startswith("名詞") and pos[-1].startswith("補助記号")
    spaced, spaced_pos = mecab("メロス は 激怒 した 。")
    assert spaced == words and spaced_pos == pos  # spaces never become words
    assert mecab("") == ([], [])
    assert mecab("   ") == ([], [])
    clone = pickle.loads(pickle.dumps(mecab))  # workers get their own tagger
    assert clone("メロスは激怒した。") == (words, pos)
