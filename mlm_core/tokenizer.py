"""Words with MeCab (fugashi + unidic-lite), subwords with WordPiece.

This mirrors Tohoku's Japanese BERT: MeCab splits a sentence into words, then each word
is split into WordPiece subwords, continuations prefixed with ``##``. The WordPiece model
is Hugging Face ``tokenizers``' (Rust), fed our MeCab words as pre-tokenised input.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from .io import sha256_file

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # ids 0..4, in this order, in every vocabulary
CONTINUATION = "##"
# MeCab writes each token as "surface<TAB>pos<TAB>" and nothing for BOS/EOS, so a sentence's
# output splits on tabs into alternating surfaces and parts of speech with no per-word Python
# work. %F-[0,1] joins pos1 and pos2 with "-", leaving out a "*" field: ``pos1-pos2``, or
# ``pos1`` where pos2 is "*". ``-O ""`` clears unidic-lite's own output-format-type, which
# would otherwise override the formats given here; unknown words (-U) get the same format.
_MECAB_FORMAT = r'-O "" -F%m\\t%F-[0,1]\\t -U%m\\t%F-[0,1]\\t -E "" -B ""'
# The reading's own format: for dictionary words MeCab writes the left context id (%phl)
# instead of formatting the features, which spares it a quarter of its time on Aozora text;
# ``pos_by_context_id`` maps the ids back to the same ``pos1-pos2`` strings. Unknown words
# keep %F-[0,1]: their context ids do not fix their part of speech (UniDic gives unknown
# symbols, 記号-一般, the context of 名詞-普通名詞).
_CONTEXT_FORMAT = r'-O "" -F%m\\t%phl\\t -U%m\\t%F-[0,1]\\t -E "" -B ""'
# Dictionaries in which every word's left context id was checked to fix its pos1 and pos2
# (tests/test_tokenizer_context_ids.py reads every entry of the installed dictionary), by
# the SHA-256 of left-id.def, unk.dic and the size of sys.dic: unidic-lite 1.0.8.
_CHECKED_DICTIONARIES = {
    ("c5ecfbe47a7d2d9f0404b6f9746e4ab96fc7f2f37e16224f0325a530ab67adf7",
     "e3b92803feeb6c2712c796b905317ec192a59729d2c1e92b2728d454169541c4", 187680870),
}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def dictionary_identity(dicdir: Path) -> tuple[str, str, int]:
    """(SHA-256 of left-id.def, SHA-256 of unk.dic, size of sys.dic) of a MeCab dictionary."""
    return (sha256_file(dicdir / "left-id.def"), sha256_file(dicdir / "unk.dic"), (dicdir / "sys.dic").stat().st_size)


def pos_by_context_id(dicdir: Path) -> list[str] | None:
    """``pos1-pos2`` (or ``pos1`` where pos2 is "*") of each left context id of a checked
    dictionary (see ``_CHECKED_DICTIONARIES``), from its ``left-id.def``; None for another."""
    try:
        if dictionary_identity(dicdir) not in _CHECKED_DICTIONARIES:
            return None
        lines = (dicdir / "left-id.def").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    names: list[str] = []
    for number, line in enumerate(lines):
        index, _, feature = line.partition(" ")
        fields = feature.split(",")
        if index != str(number) or len(fields) < 2:
            return None
        names.append(f"{fields[0]}-{fields[1]}" if fields[1] not in ("", "*") else fields[0])
    return names


class MecabWords:
    """MeCab word splitter. The fugashi ``Tagger`` is created lazily, once per process:
    it cannot be pickled, so each worker process must build its own."""

    def __init__(self) -> None:
        self._tagger = None
        self._reference = None
        self._pos_by_id: dict[str, str] | None = None
        self._pid = -1

    def _get(self):
        if self._tagger is None or self._pid != os.getpid():
            import fugashi  # deferred: importing loads the dictionary

            tagger = fugashi.Tagger(_CONTEXT_FORMAT)
            names = pos_by_context_id(Path(tagger.dictionary_info[0]["filename"]).parent)
            if names is None:  # a dictionary whose context ids do not fix pos1, pos2
                tagger = fugashi.Tagger(_MECAB_FORMAT)
            self._pos_by_id = None if names is None else {str(i): name for i, name in enumerate(names)}
            self._tagger, self._reference, self._pid = tagger, None, os.getpid()
        return self._tagger

    def parser(self):
        """The bound ``parse`` of this process's Tagger, for loops that call ``split``."""
        return self._get().parse

    def pos_by_id(self) -> dict[str, str] | None:
        """The part of speech of each left context id (as MeCab writes it), when ``parser()``
        writes the ids of dictionary words in the place of their parts of speech (None: it
        writes parts of speech only). A field that is no id (an unknown word's) is its part
        of speech."""
        self._get()
        return self._pos_by_id

    def __call__(self, text: str) -> tuple[list[str], list[str]]:
        """(surfaces, parts of speech), from MeCab's text output.

        Parsing to a string and splitting it is several times faster than walking fugashi's
        nodes (each node and feature becomes a Python object); ``nodes_reference`` keeps the
        node walk it must equal.
        """
        return self.split(self._get().parse(text), text)

    def split(self, parsed: str, text: str) -> tuple[list[str], list[str]]:
        """(surfaces, parts of speech) of ``parsed``, the output of ``parser()(text)``.

        Tokens whose surface is empty or only whitespace (U+3000 is such a token, 空白) are
        dropped, as the node API reading does. Output that does not split into pairs (fugashi
        strips the string's ends, so a leading whitespace surface could go) is read through
        the node API instead.
        """
        fields = parsed.split("\t")
        if len(fields) % 2:
            if fields == [""]:
                return [], []
            return self.nodes_reference(text)
        surfaces, pos = fields[0::2], fields[1::2]
        if self._pos_by_id is not None:
            pos = [self._pos_by_id.get(p, p) for p in pos]
        if "" in surfaces or any(map(str.isspace, surfaces)):
            kept = [i for i, s in enumerate(surfaces) if s and not s.isspace()]
            surfaces, pos = [surfaces[i] for i in kept], [pos[i] for i in kept]
        return surfaces, pos

    def nodes_reference(self, text: str) -> tuple[list[str], list[str]]:
        """The same through fugashi's node API with the default Tagger (slow; for tests,
        benchmarks and the rare output ``split`` cannot read)."""
        self._get()
        if self._reference is None:
            import fugashi

            self._reference = fugashi.Tagger()
        surfaces: list[str] = []
        pos: list[str] = []
        for node in self._reference(text):
            surface = node.surface
            if not surface or surface.isspace():
                continue
            feature = node.feature
            pos1, pos2 = feature.pos1, feature.pos2
            surfaces.append(str(surface))
            pos.append(f"{pos1}-{pos2}" if pos2 and pos2 != "*" else str(pos1))
        return surfaces, pos

    def __getstate__(self):  # allow pickling the wrapper (not the tagger) into workers
        return {}

    def __setstate__(self, state) -> None:
        self.__init__()


class WordPieceTokenizer:
    """Ids for MeCab words, backed by a BERT-format vocabulary (one token per line)."""

    def __init__(self, vocab: Sequence[str], max_input_chars_per_word: int = 100) -> None:
        vocab = list(vocab)
        if vocab[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError(
                f"vocabulary must start with {SPECIAL_TOKENS}, got {vocab[:len(SPECIAL_TOKENS)]}"
            )
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate tokens")
        self.vocab = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}
        model = models.WordPiece(
            vocab=dict(self.token_to_id),
            unk_token=UNK,
            max_input_chars_per_word=max_input_chars_per_word,
            continuing_subword_prefix=CONTINUATION,
        )
        self._tok = Tokenizer(model)
        self._tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(len(SPECIAL_TOKENS))
        self.num_special = len(SPECIAL_TOKENS)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs) -> "WordPieceTokenizer":
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls(lines, **kwargs)

    def save(self, path: str | os.PathLike[str]) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, "\n".join(self.vocab) + "\n")

    def __len__(self) -> int:
        return len(self.vocab)

    def encode_words_batch(self, batch: Sequence[Sequence[str]]) -> list[list[int]]:
        """Subword ids of each list of MeCab words (no [CLS]/[SEP])."""
        if not batch:
            return []
        encodings = self._tok.encode_batch(
            [list(words) for words in batch], is_pretokenized=True, add_special_tokens=False
        )
        return [e.ids for e in encodings]

    def encode_words_with_word_ids(self, batch: Sequence[Sequence[str]]) -> list[tuple[list[int], list[int]]]:
        """Per list of MeCab words: (subword ids, index of the word each subword belongs to)."""
        if not batch:
            return []
        encodings = self._tok.encode_batch(
            [list(words) for words in batch], is_pretokenized=True, add_special_tokens=False
        )
        return [(e.ids, list(e.word_ids)) for e in encodings]

    def words_unknown(self, words: Sequence[str]) -> list[bool]:
        """Per word: does it end up as [UNK]?"""
        encodings = self._tok.encode_batch([[w] for w in words], is_pretokenized=True, add_special_tokens=False)
        return [self.unk_id in e.ids for e in encodings]

    def encode_text(self, text: str, mecab: MecabWords) -> list[int]:
        """Ids of raw text that may contain literal special tokens such as ``[MASK]``.

        NFKC first, as the corpus was normalised before training (and as Hugging Face's
        BertJapaneseTokenizer does), so full-width Latin letters or digits typed by a user
        meet the same vocabulary entries."""
        ids: list[int] = []
        for piece in _SPECIAL_RE.split(unicodedata.normalize("NFKC", text)):
            if not piece:
                continue
            if piece in SPECIAL_TOKENS:
                ids.append(self.token_to_id[piece])
            else:
                words, _ = mecab(piece)
                if words:
                    ids.extend(self.encode_words_batch([words])[0])
        return ids

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.vocab[i] for i in ids]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Join subwords back into text (Japanese: no spaces between words)."""
        out = []
        for token in self.convert_ids_to_tokens(ids):
            if skip_special and token in SPECIAL_TOKENS:
                continue
            out.append(token[len(CONTINUATION):] if token.startswith(CONTINUATION) else token)
        return "".join(out)
