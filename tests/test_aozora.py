"""Tests for mlm_core.aozora: decoding, header/legend/footer splitting and markup cleaning."""

from __future__ import annotations

import unicodedata
import zipfile
from pathlib import Path

import pytest

import mlm_core
from mlm_core.aozora import (
    GETA,
    AozoraText,
    TextDecodeError,
    clean_aozora,
    clean_body,
    decode_text,
    gaiji_to_char,
    split_aozora,
    strip_markup,
)

SAMPLE_ZIP = Path(mlm_core.__file__).parent / "corpus" / "1567_ruby_4948.zip"
SAMPLE_MEMBER = "hashire_merosu.txt"
LEGEND_TITLE = "【テキスト中に現れる記号について】"
SEPARATOR = "-" * 55

# Anything that would show that markup survived cleaning, before or after NFKC.
MARKUP_LEFTOVERS = ["《", "》", "｜", "|", "［＃", "[#", "※［", "※["]


@pytest.fixture(scope="module")
def melos_text() -> str:
    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        raw = archive.read(SAMPLE_MEMBER)
    return decode_text(raw, f"{SAMPLE_ZIP.name}:{SAMPLE_MEMBER}")


@pytest.fixture(scope="module")
def melos(melos_text: str) -> AozoraText:
    return clean_aozora(melos_text)


# --- the shipped 走れメロス file -------------------------------------------------------


def test_sample_decodes_with_auto_and_has_no_carriage_returns(melos_text: str) -> None:
    assert "\r" not in melos_text
    assert melos_text.startswith("走れメロス\n太宰治\n")


def test_sample_title_and_author(melos: AozoraText) -> None:
    assert melos.title == "走れメロス"
    assert melos.author == "太宰治"
    assert melos.is_aozora


def test_sample_body_starts_with_the_story(melos: AozoraText) -> None:
    assert melos.body.startswith("メロスは激怒した。")


def test_sample_body_has_no_markup_left(melos: AozoraText) -> None:
    for leftover in MARKUP_LEFTOVERS:
        assert leftover not in melos.body, leftover


def test_sample_legend_removed(melos_text: str, melos: AozoraText) -> None:
    split = split_aozora(melos_text)
    for body in (split.body, melos.body):
        assert LEGEND_TITLE not in body
        assert "ルビの付く文字列の始まりを特定する記号" not in body
        assert "入力者注" not in body
        assert "-----" not in body


def test_sample_footer(melos: AozoraText) -> None:
    assert melos.footer is not None
    assert melos.footer.startswith("底本：「太宰治全集3」ちくま文庫、筑摩書房")
    assert "青空文庫" in melos.footer
    assert melos.footer.endswith("ボランティアの皆さんです。")
    for footer_text in ("底本", "入力：金川一之", "青空文庫"):
        assert footer_text not in melos.body


def test_sample_body_ends_with_the_story(melos_text: str, melos: AozoraText) -> None:
    # The raw body ends with the right-aligned source note; cleaning drops the
    # alignment annotation and NFKC turns the full-width parentheses into ASCII.
    assert split_aozora(melos_text).body.split("\n")[-1] == (
        "［＃地から１字上げ］（古伝説と、シルレルの詩から。）"
    )
    lines = melos.body.split("\n")
    assert lines[-1] == "(古伝説と、シルレルの詩から。)"
    assert lines[-2] == "勇者は、ひどく赤面した。"


def test_sample_ruby_base_text_kept(melos: AozoraText) -> None:
    assert "かの邪智暴虐の王を除かなければならぬ" in melos.body
    assert "じゃちぼうぎゃく" not in melos.body
    assert "「呆れた王だ。生かして置けぬ。」" in melos.body


def test_sample_body_is_one_paragraph_per_line(melos: AozoraText) -> None:
    lines = melos.body.split("\n")
    assert all(line and line == line.strip() for line in lines)
    assert "「なぜ殺すのだ。」" in lines


# --- decode_text -----------------------------------------------------------------------


def test_decode_cp932_bytes() -> None:
    # ① and 髙 exist only in cp932 (Microsoft's extensions), not in plain Shift_JIS.
    text = "走れメロス①髙"
    assert decode_text(text.encode("cp932"), "sample.txt") == text


def test_decode_utf8_with_bom() -> None:
    raw = "\ufeffメロスは激怒した。".encode("utf-8")
    assert decode_text(raw, "utf8.txt") == "メロスは激怒した。"


def test_decode_normalises_crlf_and_lone_cr() -> None:
    raw = "一\r\n二\r三\n四".encode("cp932")
    assert decode_text(raw, "lines.txt") == "一\n二\n三\n四"


def test_decode_invalid_bytes_raise_with_source_and_offset() -> None:
    raw = "メロス".encode("cp932") + b"\x85\x40" + "激怒".encode("cp932")
    with pytest.raises(TextDecodeError) as info:
        decode_text(raw, "broken/hashire.txt")
    message = str(info.value)
    assert "broken/hashire.txt" in message
    assert "utf-8" in message and "cp932" in message
    assert "offset 6" in message
    assert "85 40" in message
    assert info.value.offset == 6
    assert isinstance(info.value, ValueError)


def test_decode_explicit_encoding() -> None:
    raw = "メロス".encode("cp932")
    assert decode_text(raw, "x.txt", encoding="shift_jis") == "メロス"
    with pytest.raises(TextDecodeError, match="'x.txt' as utf-8"):
        decode_text(raw, "x.txt", encoding="utf-8")


def test_decode_unknown_encoding_is_named() -> None:
    with pytest.raises(ValueError, match="no-such-codec"):
        decode_text(b"abc", "x.txt", encoding="no-such-codec")


# --- split_aozora ------------------------------------------------------------------------


def _aozora_file(header: str, body: str, footer: str | None) -> str:
    legend = f"{SEPARATOR}\n{LEGEND_TITLE}\n\n《》：ルビ\n（例）邪智暴虐《じゃちぼうぎゃく》\n{SEPARATOR}"
    text = f"{header}\n\n{legend}\n\n{body}\n"
    if footer is not None:
        text += f"\n\n\n{footer}\n"
    return text


def test_split_plain_text_is_untouched() -> None:
    text = "ただの文章です。\n\n二段落目。\n"
    parts = split_aozora(text)
    assert parts == AozoraText(title=None, author=None, body=text, footer=None, is_aozora=False)


def test_split_hyphen_line_in_plain_text_is_not_a_legend() -> None:
    text = "見出し\n\n本文。\n---------\n続き。"
    parts = split_aozora(text)
    assert parts.body == text
    assert not parts.is_aozora


def test_split_without_legend_but_with_footer() -> None:
    text = "田舎者\n太宰治\n\n　私は、生れました。\n　二段落目。\n\n\n\n底本：「もの思う葦」新潮文庫\n入力：某\n\n"
    parts = split_aozora(text)
    assert parts.title == "田舎者"
    assert parts.author == "太宰治"
    assert parts.body == "　私は、生れました。\n　二段落目。"
    assert parts.footer == "底本：「もの思う葦」新潮文庫\n入力：某"
    assert parts.is_aozora


def test_split_footer_only_keeps_the_text() -> None:
    parts = split_aozora("一行だけの本文。\n底本：「本」")
    assert (parts.title, parts.author) == (None, None)
    assert parts.body == "一行だけの本文。"
    assert parts.footer == "底本：「本」"


def test_split_legend_without_footer() -> None:
    parts = split_aozora(_aozora_file("題\n著者", "本文《ほんぶん》。", None))
    assert (parts.title, parts.author) == ("題", "著者")
    assert parts.body == "本文《ほんぶん》。"
    assert parts.footer is None
    assert parts.is_aozora


def test_split_subtitle_and_translator() -> None:
    text = _aozora_file("題名\n――副題――\n原作者\n某某訳", "本文。", "底本：「本」")
    parts = split_aozora(text)
    assert parts.title == "題名"
    assert parts.author == "原作者"
    assert parts.footer == "底本：「本」"


def test_split_end_of_text_marker_stays_in_body() -> None:
    text = _aozora_file("題\n著者", "本文。\n\n［＃本文終わり］", "　底本：「本」\n入力：某")
    parts = split_aozora(text)
    assert parts.body == "本文。\n\n［＃本文終わり］"
    assert parts.footer == "　底本：「本」\n入力：某"
    assert clean_body(parts.body) == "本文。"


def test_split_footer_after_end_marker_when_no_sourcebook_line() -> None:
    # Translations on Aozora have no 底本 line; their notes follow ［＃本文終わり］.
    text = _aozora_file("Afterlife\nAUTHOR\nTranslated by SOMEONE", "Text.\n\n［＃本文終わり］", "翻訳の原作：x")
    parts = split_aozora(text)
    assert parts.author == "AUTHOR"
    assert parts.body == "Text.\n\n［＃本文終わり］"
    assert parts.footer == "翻訳の原作：x"


def test_split_notation_block_instead_of_legend() -> None:
    # An older header form: ［表記について］ notes closed by a single hyphen line.
    text = (
        "ガドルフの百合\n宮沢賢治\n\n［表記について］\n●ルビは「《ルビ》」の形式で処理した。\n"
        f"{'-' * 66}\n　本文《ほんぶん》です。\n\n底本：「風の又三郎」\n"
    )
    parts = split_aozora(text)
    assert (parts.title, parts.author) == ("ガドルフの百合", "宮沢賢治")
    assert parts.body == "　本文《ほんぶん》です。"
    assert parts.footer == "底本：「風の又三郎」"


def test_clean_aozora_normalises_title_and_keeps_footer_verbatim() -> None:
    text = _aozora_file("網《あみ》ＡＢ\n著者", "　本文。", "底本：「本」（全角）")
    parts = clean_aozora(text)
    assert parts.title == "網AB"
    assert parts.footer == "底本：「本」（全角）"
    assert parts.body == "本文。"


# --- strip_markup and gaiji ----------------------------------------------------------------


def test_ruby_removed_with_and_without_bar() -> None:
    assert strip_markup("邪智暴虐《じゃちぼうぎゃく》の王") == "邪智暴虐の王"
    assert strip_markup("疲労｜困憊《こんぱい》") == "疲労困憊"


def test_annotations_removed_including_nested() -> None:
    assert strip_markup("勇者は赤面した。［＃地から１字上げ］") == "勇者は赤面した。"
    text = "その※［＃「言＋墟のつくり」、第4水準2-88-74］［＃「※［＃「言＋墟のつくり」、第4水準2-88-74］」に傍点］だ"
    assert strip_markup(text) == "その\u8b43だ"  # 譃


def test_gaiji_third_level_code() -> None:
    assert gaiji_to_char("「木＋内」、第3水準1-85-54") == "\u6798"  # 枘
    assert strip_markup("※［＃「木＋内」、第3水準1-85-54］") == "\u6798"


def test_gaiji_fourth_level_code() -> None:
    assert gaiji_to_char("「女＋章」、第4水準2-5-75") == "\u5adc"  # 嫜


def test_gaiji_bare_code_for_double_parenthesis() -> None:
    # Aozora writes 始め二重括弧 as 1-2-54; in JIS X 0213 that is ⦅ (U+2985), not 《.
    text = "※［＃始め二重括弧、1-2-54］内※［＃終わり二重括弧、1-2-55］"
    assert strip_markup(text) == "\u2985内\u2986"


def test_gaiji_giving_ruby_brackets_stays_literal() -> None:
    # 1-1-52 / 1-1-53 are 《 and 》: emitted as text, never re-read as ruby, while a real
    # ruby later on the line is still removed.
    text = "前※［＃始め二重山括弧、1-1-52］中※［＃終わり二重山括弧、1-1-53］後の漢字《かんじ》"
    assert strip_markup(text) == "前《中》後の漢字"
    assert clean_body(text) == "前《中》後の漢字"
    assert strip_markup("※［＃始め二重山括弧、1-1-52］ルビではない") == "《ルビではない"


def test_gaiji_combining_sequence() -> None:
    assert gaiji_to_char("半濁点付き平仮名か、1-4-87") == "\u304b\u309a"


def test_gaiji_unicode_code() -> None:
    assert gaiji_to_char("「口＋堯」、U+5635、71-2") == "\u5635"
    assert strip_markup("※［＃「鹿＋嚴」、U+9EA3、148-1］") == "\u9ea3"


def test_gaiji_without_code_becomes_geta() -> None:
    assert gaiji_to_char("もんがまえに真の正字。読みは「タン」") is None
    assert strip_markup("あ※［＃もんがまえに真の正字。読みは「タン」］い") == f"あ{GETA}い"


def test_page_line_references_are_not_codes() -> None:
    assert gaiji_to_char("「にんべん＋總のつくり」、389-10") is None
    assert gaiji_to_char("「行がまえ＜干」、69-上-16") is None
    assert gaiji_to_char("小書き平仮名ん、151-4") is None
    assert strip_markup("※［＃「てへん＋蜀」、71-下-22］") == GETA


def test_undecodable_code_falls_back() -> None:
    assert gaiji_to_char("架空、2-2-1") is None  # plane 2 row 2 is unassigned
    assert gaiji_to_char("架空、2-2-1、U+6798") == "\u6798"


def test_gaiji_code_of_a_nested_gaiji_is_not_used() -> None:
    description = "「姉」の正字、「※［＃第3水準1-85-57］」の「木」に代えて「女」、374-10"
    assert gaiji_to_char(description) is None
    assert gaiji_to_char(f"※［＃{description}］") is None


def test_unmatched_brackets_keep_the_text() -> None:
    text = "あ［＃閉じない注記\nい《閉じないルビ\nう※［＃閉じない外字\nえ》"
    assert strip_markup(text) == text


def test_ruby_containing_gaiji_is_skipped_whole() -> None:
    assert strip_markup("字《※［＃終わり二重山括弧、1-1-53］よみ》後") == "字後"


# --- clean_body ----------------------------------------------------------------------------


def test_nfkc_after_markup() -> None:
    assert clean_body("ＡＢＣ［＃「ＡＢＣ」に傍点］です") == "ABCです"
    assert clean_body("（注）！？") == "(注)!?"


def test_voiced_kana_not_decomposed() -> None:
    assert clean_body("がぎぐ") == "がぎぐ"
    # A decomposed が is composed, never stripped of its mark.
    assert clean_body("か\u3099") == "が"
    assert unicodedata.is_normalized("NFKC", clean_body("ガッコウ"))


def test_clean_body_strips_indentation_and_blank_lines() -> None:
    body = "　一段落目。\n\n\n　　二段落目。　\n［＃改ページ］\n三段落目。"
    assert clean_body(body) == "一段落目。\n二段落目。\n三段落目。"
