"""Decoding and cleaning of Aozora Bunko text files.

An Aozora file is a title/author header, a legend explaining the markup, the work with
ruby (《》, ｜), annotations (［＃…］) and gaiji (※［＃…］), and a provenance footer
starting at 底本：. This module turns such a file into plain text, one paragraph per line.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import dataclass

__all__ = [
    "AozoraText",
    "TextDecodeError",
    "UnknownEncodingError",
    "clean_aozora",
    "clean_body",
    "decode_text",
    "gaiji_to_char",
    "split_aozora",
    "strip_markup",
]

# Aozora's own mark for a character that cannot be represented.
GETA = "\u3013"  # 〓

_RUBY_OPEN = "《"
_RUBY_CLOSE = "》"
_RUBY_BAR = "｜"  # U+FF5C, marks where the ruby base text starts
_BRACKET_OPEN = "［"  # U+FF3B
_BRACKET_CLOSE = "］"  # U+FF3D
_ANNOTATION_MARK = "＃"  # U+FF03
_GAIJI_MARK = "※"

_LEGEND_TITLE = "【テキスト中に現れる記号について】"
_NOTATION_TITLE = "［表記について］"
_FOOTER_PREFIX = "底本："
_END_OF_TEXT = "［＃本文終わり］"

# Aozora's legend separator is usually 55 hyphens, but real files have 9 to 90; a lone
# "-" or "--" is more likely text. Hyphen lines only matter next to the legend title.
_SEPARATOR = re.compile(r"-{3,}")
_TRANSLATOR = re.compile(r"(?:[訳譯]|^translated by\b.*)$", re.IGNORECASE)

# The characters where the markup scanner has to stop and look; everything else is copied
# in chunks, which keeps cleaning 12 million characters fast.
_SPECIAL = re.compile("[※［《｜]")

# A JIS X 0213 plane-row-cell code, with or without the 第3水準/第4水準 prefix. The
# lookarounds keep page-line references such as "、267-13" or "174-下-19" (which sit in the
# same descriptions) and longer number runs from being read as codes.
_JIS_CODE = re.compile(r"(?<![\d\-])([12])-(\d{1,2})-(\d{1,2})(?![\d\-])")
_UCS_CODE = re.compile(r"U\+([0-9A-Fa-f]{4,5})(?![0-9A-Fa-f])")

_SNIPPET_BYTES = 8


class TextDecodeError(ValueError):
    """Raw bytes that could not be decoded with any of the encodings tried."""

    def __init__(self, source: str, encodings: list[str], offset: int, snippet: bytes) -> None:
        self.source = source
        self.encodings = list(encodings)
        self.offset = offset
        self.snippet = snippet
        tried = " or ".join(self.encodings)
        super().__init__(
            f"cannot decode {source!r} as {tried}: invalid bytes at offset {offset} "
            f"({snippet.hex(' ')}); the file is damaged or in another encoding - "
            f"re-download it, or pass encoding=<codec name> naming its real encoding"
        )


class UnknownEncodingError(ValueError):
    """An encoding name that Python has no codec for."""

    def __init__(self, encoding: str, source: str) -> None:
        self.encoding = encoding
        self.source = source
        super().__init__(
            f"unknown encoding {encoding!r} for {source!r}: use 'auto' (UTF-8, else cp932) "
            f"or a Python codec name such as 'cp932' or 'utf-8'"
        )


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode_strict(raw: bytes, encoding: str) -> str:
    text = raw.decode(encoding, errors="strict")
    # A BOM is never part of the text, whichever codec let it through.
    return text[1:] if text.startswith("\ufeff") else text


def decode_text(raw: bytes, source: str, encoding: str = "auto") -> str:
    """Decode a text file's bytes strictly and normalise its newlines to "\\n".

    "auto" tries UTF-8 (BOM dropped), then cp932, the encoding Aozora files really use
    (Shift_JIS plus Microsoft's extensions). `source` names the file in error messages.
    """
    if encoding == "auto":
        encodings = ["utf-8", "cp932"]
    else:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise UnknownEncodingError(encoding, source) from None
        encodings = [encoding]

    error: UnicodeDecodeError | None = None
    for name in encodings:
        try:
            return _normalise_newlines(_decode_strict(raw, name))
        except UnicodeDecodeError as exc:
            error = exc
    assert error is not None
    # The last codec tried is the one the caller meant (cp932 for Aozora), so its
    # failure position is the useful one to report.
    snippet = raw[error.start : error.start + _SNIPPET_BYTES]
    raise TextDecodeError(source, encodings, error.start, snippet) from error


@dataclass(frozen=True)
class AozoraText:
    """A text split into its Aozora parts; for a plain text only `body` is set."""

    title: str | None
    author: str | None
    body: str
    footer: str | None
    is_aozora: bool


def _is_blank(line: str) -> bool:
    return not line.strip()


def _strip_blank_lines(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and _is_blank(lines[start]):
        start += 1
    while end > start and _is_blank(lines[end - 1]):
        end -= 1
    return lines[start:end]


def _is_separator(line: str) -> bool:
    return _SEPARATOR.fullmatch(line.strip()) is not None


def _next_nonblank(lines: list[str], start: int) -> int | None:
    for i in range(start, len(lines)):
        if not _is_blank(lines[i]):
            return i
    return None


def _find_legend(lines: list[str]) -> tuple[int, int] | None:
    """(first line of the legend or notation block, line after it), or None.

    Most files open the body with the hyphen-framed 【テキスト中に現れる記号について】
    legend. A few older ones instead put a ［表記について］ note block between the header
    and a single hyphen line; both are editorial and are dropped.
    """
    first = next((i for i, line in enumerate(lines) if _is_separator(line)), None)
    if first is None:
        return None
    after = _next_nonblank(lines, first + 1)
    if after is not None and lines[after].strip().startswith(_LEGEND_TITLE):
        closing = next(
            (i for i in range(after + 1, len(lines)) if _is_separator(lines[i])), None
        )
        # Without its closing line the legend's extent is unknown; removing up to some
        # guess could eat the work, so the text is treated as having no legend.
        if closing is None:
            return None
        return first, closing + 1
    notation = next(
        (i for i in range(first) if lines[i].strip() == _NOTATION_TITLE), None
    )
    if notation is not None:
        return notation, first + 1
    # A hyphen line somewhere in the work is just text.
    return None


def _find_footer(lines: list[str], start: int) -> int | None:
    """Index of the first footer line at or after `start`, or None."""
    for i in range(start, len(lines)):
        if lines[i].lstrip().startswith(_FOOTER_PREFIX):
            return i
    # Files without a 底本 line (e.g. translations published on Aozora) still close the
    # work with ［＃本文終わり］, followed by their provenance notes.
    for i in range(start, len(lines)):
        if lines[i].strip() == _END_OF_TEXT:
            return _next_nonblank(lines, i + 1)
    return None


def _title_and_author(header: list[str]) -> tuple[str | None, str | None]:
    header = [line.strip() for line in header if not _is_blank(line)]
    if not header:
        return None, None
    title = header[0]
    # Header lines are title, optional subtitle, author and optional translator; the
    # author is therefore the last line that is not a translator credit.
    authors = [line for line in header[1:] if not _TRANSLATOR.search(line)]
    return title, (authors[-1] if authors else None)


def split_aozora(text: str) -> AozoraText:
    """Separate an Aozora text's header, legend and footer from the work's body.

    Markup in the body is left as it is (see `clean_body`). A text that shows none of
    Aozora's structure comes back unchanged as the body, with is_aozora False.
    """
    lines = text.split("\n")
    legend = _find_legend(lines)
    if legend is not None:
        legend_start, body_start = legend
        header = lines[:legend_start]
        footer_start = _find_footer(lines, body_start)
    else:
        footer_start = _find_footer(lines, 0)
        first = _next_nonblank(lines, 0)
        # Without a legend only the footer proves the text is an Aozora file; a user's
        # own text would otherwise lose its first paragraph as a "header".
        if footer_start is None or first is None or first >= footer_start:
            return AozoraText(title=None, author=None, body=text, footer=None, is_aozora=False)
        header_end = first
        while header_end < footer_start and not _is_blank(lines[header_end]):
            header_end += 1
        if header_end == footer_start:
            # No blank line before the footer: that paragraph is the work, not a header.
            header, body_start = [], first
        else:
            header, body_start = lines[first:header_end], header_end

    title, author = _title_and_author(header)
    body_end = len(lines) if footer_start is None else footer_start
    body = "\n".join(_strip_blank_lines(lines[body_start:body_end]))
    footer: str | None = None
    if footer_start is not None:
        footer = "\n".join(_strip_blank_lines(lines[footer_start:])) or None
    return AozoraText(title=title, author=author, body=body, footer=footer, is_aozora=True)


def _without_nested_annotations(description: str) -> str:
    """`description` with every bracketed ［…］ part removed, matched by depth."""
    out: list[str] = []
    depth = 0
    for char in description:
        if char == _BRACKET_OPEN:
            depth += 1
        elif char == _BRACKET_CLOSE and depth > 0:
            depth -= 1
        elif depth == 0:
            out.append(char)
    return "".join(out)


def _jis_x0213_char(plane: int, row: int, cell: int) -> str | None:
    if not (1 <= row <= 94 and 1 <= cell <= 94):
        return None
    if plane == 1:
        raw = bytes((0xA0 + row, 0xA0 + cell))
    else:
        assert plane == 2, plane  # the code pattern only admits planes 1 and 2
        raw = bytes((0x8F, 0xA0 + row, 0xA0 + cell))
    try:
        # Some cells are combining sequences (e.g. か゚), so the result may be two
        # code points.
        return raw.decode("euc_jis_2004")
    except UnicodeDecodeError:
        return None


def gaiji_to_char(annotation: str) -> str | None:
    """The character a gaiji annotation describes, or None when it gives no usable code.

    `annotation` is the description inside ※［＃…］ (the surrounding ※［＃ and ］ may be
    included). Recognised codes: JIS X 0213 plane-row-cell ("第3水準1-85-54",
    "第4水準2-88-74", "1-2-54") and Unicode ("U+9EA3").
    """
    description = annotation.strip()
    if description.startswith(_GAIJI_MARK):
        description = description[1:]
    if description.startswith(_BRACKET_OPEN + _ANNOTATION_MARK) and description.endswith(
        _BRACKET_CLOSE
    ):
        description = description[2:-1]
    # A description may quote another gaiji; its code belongs to that one, not this.
    description = _without_nested_annotations(description)

    for match in _JIS_CODE.finditer(description):
        char = _jis_x0213_char(int(match[1]), int(match[2]), int(match[3]))
        if char is not None:
            return char
    for match in _UCS_CODE.finditer(description):
        code_point = int(match[1], 16)
        if 0xD800 <= code_point <= 0xDFFF:
            continue
        return chr(code_point)
    return None


def _annotation_end(text: str, start: int) -> int | None:
    """Index just past the ］ closing the ［ at `start`, on the same line; None if none."""
    assert text[start] == _BRACKET_OPEN
    depth = 0
    for i in range(start, len(text)):
        char = text[i]
        if char == "\n":
            return None
        if char == _BRACKET_OPEN:
            depth += 1
        elif char == _BRACKET_CLOSE:
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _ruby_end(text: str, start: int) -> int | None:
    """Index just past the 》 closing the 《 at `start`, on the same line; None if none."""
    assert text[start] == _RUBY_OPEN
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == "\n":
            return None
        if char == _RUBY_CLOSE:
            return i + 1
        if char == _BRACKET_OPEN and text.startswith(_ANNOTATION_MARK, i + 1):
            # A gaiji inside the ruby could describe a 》; skip it whole.
            end = _annotation_end(text, i)
            if end is not None:
                i = end
                continue
        i += 1
    return None


def strip_markup(text: str) -> str:
    """Remove ruby, ｜ and ［＃…］ annotations, and replace gaiji by their characters.

    One left-to-right scan: a gaiji's character goes straight to the output and is never
    scanned again, so a gaiji that stands for 《 or ｜ stays literal. Brackets are matched
    within a line; an unmatched one is kept as text rather than swallowing what follows.
    Gaiji without a usable code become 〓.
    """
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        match = _SPECIAL.search(text, i)
        if match is None:
            out.append(text[i:])
            break
        pos = match.start()
        out.append(text[i:pos])
        char = text[pos]
        i = pos + 1
        if char == _RUBY_BAR:
            continue
        if char == _RUBY_OPEN:
            end = _ruby_end(text, pos)
            if end is not None:
                i = end
                continue
        elif char == _GAIJI_MARK:
            if text.startswith(_BRACKET_OPEN + _ANNOTATION_MARK, pos + 1):
                end = _annotation_end(text, pos + 1)
                if end is not None:
                    gaiji = gaiji_to_char(text[pos + 3 : end - 1])
                    out.append(GETA if gaiji is None else gaiji)
                    i = end
                    continue
        elif char == _BRACKET_OPEN:
            if text.startswith(_ANNOTATION_MARK, pos + 1):
                end = _annotation_end(text, pos)
                if end is not None:
                    i = end
                    continue
        out.append(char)
    return "".join(out)


def clean_body(body: str) -> str:
    """Plain text of a work's body: markup removed, NFKC, one paragraph per line."""
    # NFKC must come after the markup is gone: it maps the full-width brackets ［＃］ to
    # ASCII ones, which would no longer be recognised as markup.
    text = unicodedata.normalize("NFKC", strip_markup(body))
    # Aozora indents paragraphs with U+3000 (a space after NFKC); indentation and blank
    # lines are layout, not language.
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _clean_field(value: str | None) -> str | None:
    if value is None:
        return None
    # Titles carry ruby too (e.g. インドラ［※１］の網《あみ》).
    cleaned = unicodedata.normalize("NFKC", strip_markup(value)).strip()
    return cleaned or None


def clean_aozora(text: str) -> AozoraText:
    """`split_aozora`, then the body cleaned and title/author normalised; footer verbatim."""
    parts = split_aozora(text)
    return AozoraText(
        title=_clean_field(parts.title),
        author=_clean_field(parts.author),
        body=clean_body(parts.body),
        footer=parts.footer,
        is_aozora=parts.is_aozora,
    )


def clean_plain(text: str) -> str:
    """Text from elsewhere (a JSON Lines or Parquet corpus): no Aozora markup to remove, but
    the same NFKC and one-paragraph-per-line layout as Aozora bodies."""
    text = unicodedata.normalize("NFKC", _normalise_newlines(text))
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)
