"""Words with MeCab (fugashi + unidic-lite, or another dictionary), subwords with WordPiece.

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


DEFAULT_SPLITTER = "mecab:unidic_lite"  # Melos's own word splitter (fugashi + unidic-lite)
MECAB_DICTIONARIES = ("unidic_lite", "ipadic", "unidic")
# What to install for each dictionary (the pip package; unidic also needs its download step).
_DICTIONARY_PACKAGE = {"unidic_lite": "unidic-lite", "ipadic": "ipadic", "unidic": "unidic"}


def parse_splitter(spec: str) -> tuple[str, str | None, bool]:
    """``mecab:DIC[:lower]`` or ``basic[:lower]`` -> (kind, dictionary or None, lower-case)."""
    parts = spec.split(":")
    lower = parts[-1] == "lower"
    if lower:
        parts = parts[:-1]
    if parts[0] == "mecab" and len(parts) == 2 and parts[1] in MECAB_DICTIONARIES:
        return "mecab", parts[1], lower
    if parts == ["basic"]:
        return "basic", None, lower
    raise ValueError(
        f"unknown word splitter {spec!r}; use mecab:unidic_lite, mecab:ipadic, mecab:unidic or basic "
        "(each optionally followed by :lower)"
    )


def mecab_dicdir(dic: str) -> Path:
    """The directory of a MeCab dictionary package; ValueError naming the pip package if missing."""
    package = _DICTIONARY_PACKAGE[dic]
    try:
        module = __import__(dic)
    except ImportError:
        extra = f" (or pip install 'melos[{dic}]')" if dic == "ipadic" else ""
        raise ValueError(f"the MeCab dictionary {dic} is not installed: pip install {package}{extra}") from None
    dicdir = Path(module.DICDIR)
    if not (dicdir / "sys.dic").is_file():
        raise ValueError(f"the MeCab dictionary {dic} is installed but has no data in {dicdir}: "
                         f"run python -m {dic} download")
    return dicdir


def check_splitter(spec: str) -> None:
    """ValueError (one line) when ``spec`` is unknown or its dictionary is not installed."""
    kind, dic, _ = parse_splitter(spec)
    if kind == "mecab" and dic != "unidic_lite":
        mecab_dicdir(dic)


def splitter_packages(spec: str) -> dict[str, str]:
    """Versions of the packages that decide the words of ``spec`` (for cache keys)."""
    from importlib.metadata import PackageNotFoundError, version

    kind, dic, _ = parse_splitter(spec)
    names = ["fugashi", _DICTIONARY_PACKAGE[dic]] if kind == "mecab" else ["tokenizers"]
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


class MecabWords:
    """MeCab word splitter. The fugashi ``Tagger`` is created lazily, once per process:
    it cannot be pickled, so each worker process must build its own.

    ``dic`` picks the dictionary as Hugging Face's ``MecabTokenizer`` does (``-d`` its
    directory, ``-r`` its mecabrc); unidic-lite, Melos's own, keeps fugashi's default Tagger.
    ``lower`` lower-cases every surface (``do_lower_case``)."""

    def __init__(self, dic: str = "unidic_lite", lower: bool = False) -> None:
        self.dic, self.lower = dic, lower
        self._tagger = None
        self._reference = None
        self._pos_by_id: dict[str, str] | None = None
        self._pid = -1

    def _dic_args(self) -> str:
        if self.dic == "unidic_lite":
            return ""
        dicdir = mecab_dicdir(self.dic)
        return f'-d "{dicdir}" -r "{dicdir / "mecabrc"}" '

    def _get(self):
        if self._tagger is None or self._pid != os.getpid():
            import fugashi  # deferred: importing loads the dictionary

            make = fugashi.Tagger if self.dic == "unidic_lite" else fugashi.GenericTagger
            args = self._dic_args()
            tagger = make(args + _CONTEXT_FORMAT)
            names = pos_by_context_id(Path(tagger.dictionary_info[0]["filename"]).parent)
            if names is None:  # a dictionary whose context ids do not fix pos1, pos2
                tagger = make(args + _MECAB_FORMAT)
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
        return None if self.lower else self._pos_by_id  # lower-casing needs split's reading

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
        if self.lower:
            surfaces = [w.lower() for w in surfaces]
        return surfaces, pos

    def nodes_reference(self, text: str) -> tuple[list[str], list[str]]:
        """The same through fugashi's node API with the default Tagger (slow; for tests,
        benchmarks and the rare output ``split`` cannot read)."""
        self._get()
        if self._reference is None:
            import fugashi

            self._reference = (fugashi.Tagger() if self.dic == "unidic_lite"
                               else fugashi.GenericTagger(self._dic_args().strip()))
        surfaces: list[str] = []
        pos: list[str] = []
        for node in self._reference(text):
            surface = node.surface
            if not surface or surface.isspace():
                continue
            feature = node.feature
            if self.dic == "unidic_lite":
                pos1, pos2 = feature.pos1, feature.pos2
            else:  # a GenericTagger's features are the dictionary's CSV fields
                pos1, pos2 = feature[0], (feature[1] if len(feature) > 1 else "*")
            surfaces.append(str(surface).lower() if self.lower else str(surface))
            pos.append(f"{pos1}-{pos2}" if pos2 and pos2 != "*" else str(pos1))
        return surfaces, pos

    def __getstate__(self):  # allow pickling the wrapper (not the tagger) into workers
        return {"dic": self.dic, "lower": self.lower}

    def __setstate__(self, state) -> None:
        self.__init__(state.get("dic", "unidic_lite"), state.get("lower", False))


class BasicWords:
    """Hugging Face's ``BasicTokenizer`` as ``BertJapaneseTokenizer`` uses it (word_tokenizer_type
    "basic": no CJK splitting): clean control characters, split on whitespace and punctuation,
    with ``lower`` lower-case and strip accents. Built on ``tokenizers``' BERT normaliser and
    pre-tokeniser. Every word's part of speech is "*" (unknown)."""

    def __init__(self, lower: bool = False) -> None:
        from tokenizers import normalizers

        self.lower = lower
        self._norm = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=False, strip_accents=None, lowercase=lower
        )
        self._pre = pre_tokenizers.BertPreTokenizer()

    def words(self, text: str) -> list[str]:
        text = self._norm.normalize_str(unicodedata.normalize("NFC", text))
        return [w for w, _ in self._pre.pre_tokenize_str(text)]

    def parser(self):
        return lambda text: "".join(f"{w}\t*\t" for w in self.words(text))

    def pos_by_id(self) -> None:
        return None

    def split(self, parsed: str, text: str) -> tuple[list[str], list[str]]:
        words = self.words(text)
        return words, ["*"] * len(words)

    def __call__(self, text: str) -> tuple[list[str], list[str]]:
        return self.split("", text)

    def __getstate__(self):
        return {"lower": self.lower}

    def __setstate__(self, state) -> None:
        self.__init__(state["lower"])


_SPLITTERS: dict[tuple[int, str], object] = {}


def word_splitter(spec: str = DEFAULT_SPLITTER):
    """This process's splitter for ``spec`` (one Tagger per process and dictionary)."""
    key = (os.getpid(), spec)
    if key not in _SPLITTERS:
        kind, dic, lower = parse_splitter(spec)
        _SPLITTERS[key] = MecabWords(dic, lower) if kind == "mecab" else BasicWords(lower)
    return _SPLITTERS[key]


class WordPieceTokenizer:
    """Ids for words, backed by a BERT-format vocabulary (one token per line).

    The tokenizer owns its word splitter (``splitter``: MeCab with a dictionary, or HF's basic
    splitter) and its subword scheme (``subword``: WordPiece with ``##`` continuations, or one
    token per character), so ``encode_text`` and ``split_words`` need nothing else; the spec
    (``spec()``) is recorded with a model and rebuilds the same tokenizer. Special token ids
    are looked up by name; every id below the highest of them (``num_special``) counts as
    special, as the ``[unused]`` slots of published BERT vocabularies do.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        max_input_chars_per_word: int = 100,
        *,
        splitter: str = DEFAULT_SPLITTER,
        subword: str = "wordpiece",
        model_max_length: int | None = None,
    ) -> None:
        vocab = list(vocab)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"vocabulary must hold the special tokens {SPECIAL_TOKENS}; {missing} missing")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate tokens")
        if subword not in ("wordpiece", "character"):
            raise ValueError(f"unknown subword scheme {subword!r}; use wordpiece or character")
        parse_splitter(splitter)
        self.vocab = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.token_to_id[t] for t in SPECIAL_TOKENS)
        self.num_special = max(self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id) + 1
        if self.num_special > max(len(SPECIAL_TOKENS), len(vocab) // 2):
            raise ValueError(
                f"the special tokens sit at ids up to {self.num_special - 1} of {len(vocab)}; Melos needs them "
                "before the regular tokens (as in BERT vocabularies)"
            )
        self.splitter, self.subword = splitter, subword
        self.max_input_chars_per_word, self.model_max_length = max_input_chars_per_word, model_max_length
        model = models.WordPiece(
            vocab=dict(self.token_to_id),
            unk_token=UNK,
            max_input_chars_per_word=max_input_chars_per_word,
            continuing_subword_prefix=CONTINUATION,
        )
        self._tok = Tokenizer(model)
        self._tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def spec(self) -> dict:
        """What rebuilds this tokenizer from its vocab.txt (``WordPieceTokenizer.from_file(path, **spec)``)."""
        return {"splitter": self.splitter, "subword": self.subword,
                "max_input_chars_per_word": self.max_input_chars_per_word, "model_max_length": self.model_max_length}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs) -> "WordPieceTokenizer":
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        lines = [line.removesuffix("\r") for line in lines]
        return cls(lines, **kwargs)

    def save(self, path: str | os.PathLike[str]) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, "\n".join(self.vocab) + "\n")

    def __len__(self) -> int:
        return len(self.vocab)

    def words(self):
        """This tokenizer's word splitter (one per process)."""
        return word_splitter(self.splitter)

    def normalize(self, text: str) -> str:
        """NFKC for MeCab splitters (as BertJapaneseTokenizer's MecabTokenizer); the basic
        splitter normalises for itself."""
        return unicodedata.normalize("NFKC", text) if self.splitter.startswith("mecab") else text

    def split_words(self, text: str) -> list[str]:
        """The words of ``text`` as this tokenizer's splitter cuts them (after normalising)."""
        return self.words()(self.normalize(text))[0]

    def _characters(self, batch: Sequence[Sequence[str]]) -> list[tuple[list[int], list[int]]]:
        """One token per character (HF's CharacterTokenizer: NFKC per word, [UNK] if unknown)."""
        get, unk = self.token_to_id.get, self.unk_id
        out = []
        for words in batch:
            ids: list[int] = []
            word_ids: list[int] = []
            for i, word in enumerate(words):
                for piece in word.split():
                    for c in unicodedata.normalize("NFKC", piece):
                        ids.append(get(c, unk))
                        word_ids.append(i)
            out.append((ids, word_ids))
        return out

    def encode_words_batch(self, batch: Sequence[Sequence[str]]) -> list[list[int]]:
        """Subword ids of each list of words (no [CLS]/[SEP])."""
        if not batch:
            return []
        if self.subword == "character":
            return [ids for ids, _ in self._characters(batch)]
        encodings = self._tok.encode_batch(
            [list(words) for words in batch], is_pretokenized=True, add_special_tokens=False
        )
        return [e.ids for e in encodings]

    def encode_words_with_word_ids(self, batch: Sequence[Sequence[str]]) -> list[tuple[list[int], list[int]]]:
        """Per list of words: (subword ids, index of the word each subword belongs to)."""
        if not batch:
            return []
        if self.subword == "character":
            return self._characters(batch)
        encodings = self._tok.encode_batch(
            [list(words) for words in batch], is_pretokenized=True, add_special_tokens=False
        )
        return [(e.ids, list(e.word_ids)) for e in encodings]

    def words_unknown(self, words: Sequence[str]) -> list[bool]:
        """Per word: does it end up as [UNK]?"""
        return [self.unk_id in ids for ids in self.encode_words_batch([[w] for w in words])]

    def encode_text(self, text: str, mecab=None) -> list[int]:
        """Ids of raw text that may contain literal special tokens such as ``[MASK]``.

        Words come from ``mecab`` when given, else from the tokenizer's own splitter. MeCab
        splitters see NFKC text, as the corpus was normalised before training (and as Hugging
        Face's BertJapaneseTokenizer does), so full-width Latin letters or digits typed by a
        user meet the same vocabulary entries."""
        split = mecab or self.words()
        ids: list[int] = []
        for piece in _SPECIAL_RE.split(self.normalize(text)):
            if not piece:
                continue
            if piece in SPECIAL_TOKENS:
                ids.append(self.token_to_id[piece])
            else:
                words, _ = split(piece)
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
