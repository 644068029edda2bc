"""Sentence splitting for cleaned Japanese literary text (one paragraph per line)."""

from __future__ import annotations

import re

__all__ = ["split_sentences"]

_TERMINATORS = frozenset("。!?！？")

# Both full-width and ASCII forms: the text is NFKC-normalised, which turns （）［］ into
# ASCII, but callers may pass text that was not.
_PAIRS = {
    "「": "」",
    "『": "』",
    "（": "）",
    "(": ")",
    "【": "】",
    "〔": "〕",
    "［": "］",
    "[": "]",
    "〈": "〉",
    "《": "》",
}
_OPENING = frozenset(_PAIRS)
_CLOSING = frozenset(_PAIRS.values())
_MARKS = re.compile("[" + re.escape("".join(sorted(_TERMINATORS | _OPENING | _CLOSING))) + "]")


def _skip_closing(line: str, i: int) -> int:
    while i < len(line) and line[i] in _CLOSING:
        i += 1
    return i


def _next_visible(line: str, i: int) -> int:
    while i < len(line) and line[i].isspace():
        i += 1
    return i


def _split_line(line: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    depth = 0
    n = len(line)
    # Only brackets and terminators change the state: jump from one to the next (a C-level
    # search) instead of stepping through every character in Python.
    search = _MARKS.search
    found = search(line)
    while found is not None:
        i = found.start()
        char = line[i]
        if char in _OPENING:
            depth += 1
            i += 1
        elif char in _CLOSING:
            # Brackets of different kinds are counted together: Aozora texts nest them
            # freely, and a stray closer (its opener on an earlier line) must not make
            # the depth negative and hide every later sentence end.
            depth = max(0, depth - 1)
            i += 1
            if depth == 0:
                before = i - 1
                while before > start and line[before] in _CLOSING:
                    before -= 1
                if line[before] in _TERMINATORS:
                    # 「…。」 ends a sentence only when another quote or the line's end
                    # follows; 「…。」とメロスは答えた。 is one sentence.
                    i = _skip_closing(line, i)
                    following = _next_visible(line, i)
                    if following == n or line[following] in _OPENING:
                        sentences.append(line[start:i])
                        start = i
        elif char in _TERMINATORS and depth == 0:
            while i < n and line[i] in _TERMINATORS:
                i += 1
            # 。） with the （ on an earlier line: the closer still belongs here.
            i = _skip_closing(line, i)
            sentences.append(line[start:i])
            start = i
        else:
            i += 1
        found = search(line, i)
    sentences.append(line[start:])
    return sentences


def split_sentences(text: str) -> list[str]:
    """Split text into sentences; every line break also ends a sentence.

    A sentence ends after a run of 。!?！？ outside brackets (closing brackets right after
    it stay with it). Inside 「」『』（）【】〔〕［］〈〉《》 nothing is split; a quote that ends
    with a terminator is its own sentence only when followed by another bracket or the
    end of the line. "…" and "―" do not end sentences.
    """
    sentences: list[str] = []
    for line in text.split("\n"):
        for sentence in _split_line(line):
            sentence = sentence.strip()
            if sentence:
                sentences.append(sentence)
    return sentences
