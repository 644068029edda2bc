"""Tests for mlm_core.sentences.split_sentences on Japanese literary text."""

from __future__ import annotations

import pytest

from mlm_core.sentences import split_sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "聞いて、メロスは激怒した。「呆れた王だ。生かして置けぬ。」",
            ["聞いて、メロスは激怒した。", "「呆れた王だ。生かして置けぬ。」"],
        ),
        (
            "「なぜ殺すのだ。」「たくさんの人を殺したのか。」",
            ["「なぜ殺すのだ。」", "「たくさんの人を殺したのか。」"],
        ),
        (
            "「言え!」暴君ディオニスは静かに問いつめた。",
            ["「言え!」暴君ディオニスは静かに問いつめた。"],
        ),
        (
            "「市を暴君の手から救うのだ。」とメロスは悪びれずに答えた。",
            ["「市を暴君の手から救うのだ。」とメロスは悪びれずに答えた。"],
        ),
        ("本当か?!嘘だ。", ["本当か?!", "嘘だ。"]),
        ("メロスは走った", ["メロスは走った"]),
    ],
)
def test_brief_examples(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_full_width_terminators_are_accepted() -> None:
    assert split_sentences("本当か？！嘘だ！") == ["本当か？！", "嘘だ！"]


def test_terminator_run_counts_once() -> None:
    assert split_sentences("終わり。。次。") == ["終わり。。", "次。"]


def test_ellipsis_and_dash_do_not_end_sentences() -> None:
    text = "間に合った……。いや――まだだ。"
    assert split_sentences(text) == ["間に合った……。", "いや――まだだ。"]


def test_nested_quote_inside_quote() -> None:
    text = "「彼は『行く。帰らない。』と言った。」と妹は泣いた。次の日。"
    assert split_sentences(text) == ["「彼は『行く。帰らない。』と言った。」と妹は泣いた。", "次の日。"]


def test_nested_quote_ending_the_sentence() -> None:
    text = "「彼は『行く。』」「そうか。」"
    assert split_sentences(text) == ["「彼は『行く。』」", "「そうか。」"]


def test_parentheses_are_not_split() -> None:
    text = "王は言った(信じられぬ。人は嘘をつく。)と。次だ。"
    assert split_sentences(text) == ["王は言った(信じられぬ。人は嘘をつく。)と。", "次だ。"]


def test_closing_bracket_after_terminator_stays() -> None:
    # The ） closes a （ from an earlier line: it is stray here and must stay attached.
    assert split_sentences("と書いてある。）続きの文。") == ["と書いてある。）", "続きの文。"]


def test_stray_closing_bracket_does_not_go_negative() -> None:
    text = "」ここから。「引用だ。」そして終わり。"
    assert split_sentences(text) == ["」ここから。", "「引用だ。」そして終わり。"]


def test_quote_followed_by_space_then_quote() -> None:
    assert split_sentences("「あ。」 「い。」") == ["「あ。」", "「い。」"]


def test_unclosed_bracket_keeps_rest_of_line_together() -> None:
    assert split_sentences("彼は「行く。帰らない。") == ["彼は「行く。帰らない。"]


def test_each_line_is_split_separately() -> None:
    text = "  一行目。二文目\n\n「三行目。\n続き。」四。\n"
    assert split_sentences(text) == ["一行目。", "二文目", "「三行目。", "続き。」", "四。"]


def test_empty_and_whitespace_only_text() -> None:
    assert split_sentences("") == []
    assert split_sentences(" \n\u3000\n") == []
