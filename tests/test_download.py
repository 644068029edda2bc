"""Tests for mlm_core.download: stage 1, sources -> cleaned UTF-8 documents + manifest.

HTTP goes to the real ``http_server`` fixture on 127.0.0.1; ZIPs are the shipped 走れメロス
archive or small archives built here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import zipfile
from pathlib import Path

import pytest

from conftest import EMBEDDED_ZIP, free_port
from mlm_core.config import DownloadConfig
from mlm_core.download import (
    SourceError,
    TransientSourceError,
    download_corpus,
    download_key,
    parse_source,
)

MELOS_URL_PATH = "cards/000035/files/1567_ruby_4948.zip"
MELOS_BYTES = EMBEDDED_ZIP.read_bytes()

# A second, different Aozora-format work (cp932, CRLF, ruby, legend, footer).
RASHOMON = (
    "羅生門\r\n芥川龍之介\r\n\r\n"
    "-------------------------------------------------------\r\n"
    "【テキスト中に現れる記号について】\r\n\r\n《》：ルビ\r\n（例）下人《げにん》\r\n"
    "-------------------------------------------------------\r\n\r\n"
    "　ある日の暮方の事である。一人の下人《げにん》が、羅生門の下で雨やみを待っていた。\r\n\r\n"
    "底本：「芥川龍之介全集1」ちくま文庫、筑摩書房\r\n"
)
RASHOMON_BODY = "ある日の暮方の事である。一人の下人が、羅生門の下で雨やみを待っていた。"


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A ZIP holding ``members`` under exactly these names (no sanitising of '..')."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buf.getvalue()


def serve(http_server, path: str, data: bytes) -> str:
    target = http_server.root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return http_server.url(path)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def read_doc(out: Path, doc_id: str) -> str:
    return (out / "docs" / f"{doc_id}.txt").read_bytes().decode("utf-8")  # strict UTF-8


# --- a real Aozora ZIP over HTTP ------------------------------------------------------------


def test_url_zip_becomes_one_document_with_metadata(tmp_path: Path, http_server) -> None:
    url = serve(http_server, MELOS_URL_PATH, MELOS_BYTES)
    out = tmp_path / "out"
    manifest = download_corpus(DownloadConfig(sources=[url]), out, tmp_path / "raw")

    assert http_server.requests == ["/" + MELOS_URL_PATH]
    assert manifest["counts"]["documents"] == 1
    assert manifest["counts"]["skipped"] == 0
    (doc,) = manifest["documents"]
    assert doc["doc_id"] == "1567_ruby_4948"
    assert doc["source"] == url
    assert doc["member"] == "hashire_merosu.txt"
    assert doc["title"] == "走れメロス"
    assert doc["author"] == "太宰治"
    assert doc["raw_sha256"] == hashlib.sha256(MELOS_BYTES).hexdigest()
    assert doc["raw_bytes"] == len(MELOS_BYTES)
    assert doc["provenance"].startswith("底本")

    text = read_doc(out, doc["doc_id"])
    assert text.startswith("メロスは激怒した")
    assert text.endswith("\n") and not text.endswith("\n\n")
    body = text[:-1]
    assert doc["text_chars"] == len(body)
    assert doc["text_sha256"] == hashlib.sha256(body.encode("utf-8")).hexdigest()
    for leftover in ("《", "》", "［＃", "底本"):
        assert leftover not in body
    # the manifest on disk is the one returned
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert sorted(p.name for p in out.iterdir()) == ["docs", "manifest.json"]


def test_url_is_fetched_once_then_served_from_the_raw_cache(tmp_path: Path, http_server) -> None:
    url = serve(http_server, MELOS_URL_PATH, MELOS_BYTES)
    cfg = DownloadConfig(sources=[url])
    first = download_corpus(cfg, tmp_path / "a", tmp_path / "raw")
    assert len(http_server.requests) == 1
    (http_server.root / MELOS_URL_PATH).unlink()  # the server could not answer any more
    second = download_corpus(cfg, tmp_path / "b", tmp_path / "raw")
    assert len(http_server.requests) == 1
    assert second["fingerprint"] == first["fingerprint"]
    assert second["documents"] == first["documents"]
    assert read_doc(tmp_path / "b", "1567_ruby_4948") == read_doc(tmp_path / "a", "1567_ruby_4948")

    # the shipped copy gives the same document as the one fetched over HTTP
    embedded = download_corpus(DownloadConfig(), tmp_path / "e", tmp_path / "raw")
    assert embedded["fingerprint"] == first["fingerprint"]
    assert embedded["documents"][0]["source"] == "embedded"
    assert embedded["documents"][0]["text_sha256"] == first["documents"][0]["text_sha256"]


# --- several sources -------------------------------------------------------------------------


def test_several_sources_in_one_run_get_unique_ids(tmp_path: Path, http_server) -> None:
    url = serve(http_server, "cards/000879/files/127_ruby_150.zip", make_zip({"rashomon.txt": RASHOMON.encode("cp932")}))
    utf8 = tmp_path / "in" / "a" / "story.txt"
    sjis = tmp_path / "in" / "b" / "story.txt"  # same stem as the UTF-8 one
    utf8.parent.mkdir(parents=True)
    sjis.parent.mkdir(parents=True)
    utf8.write_text("吾輩は猫である。名前はまだ無い。\n\nどこで生れたかとんと見当がつかぬ。\n", encoding="utf-8")
    sjis.write_bytes("国境の長いトンネルを抜けると雪国であった。\r\n".encode("cp932"))
    with pytest.raises(UnicodeDecodeError):
        sjis.read_bytes().decode("utf-8")  # really needs the cp932 fallback

    cfg = DownloadConfig(sources=["embedded", str(utf8), str(sjis), url])
    out = tmp_path / "out"
    manifest = download_corpus(cfg, out, tmp_path / "raw")

    ids = [d["doc_id"] for d in manifest["documents"]]
    assert len(ids) == len(set(ids)) == 4
    assert manifest["counts"] == {
        "sources": 4,
        "documents": 4,
        "raw_bytes": sum(d["raw_bytes"] for d in manifest["documents"]),
        "characters": sum(d["text_chars"] for d in manifest["documents"]),
        "skipped": 0,
        "files": 4,
        "skipped_no_url": 0,
        "skipped_external_url": 0,
        "failed": 0,
    }
    assert sorted(p.name for p in (out / "docs").iterdir()) == sorted(f"{i}.txt" for i in ids)
    by_source = {d["source"]: d for d in manifest["documents"]}
    assert read_doc(out, by_source["embedded"]["doc_id"]).startswith("メロスは激怒した")
    assert read_doc(out, by_source[str(utf8)]["doc_id"]) == (
        "吾輩は猫である。名前はまだ無い。\nどこで生れたかとんと見当がつかぬ。\n"
    )
    assert read_doc(out, by_source[str(sjis)]["doc_id"]) == "国境の長いトンネルを抜けると雪国であった。\n"
    assert read_doc(out, by_source[url]["doc_id"]) == RASHOMON_BODY + "\n"
    assert by_source[url]["title"] == "羅生門"
    assert by_source[url]["author"] == "芥川龍之介"
    assert by_source[str(utf8)]["title"] is None  # a plain text has no header
    assert {by_source[str(utf8)]["doc_id"], by_source[str(sjis)]["doc_id"]} == {"story", "story-2"}
    assert manifest["source_keys"][3] == url
    assert manifest["source_keys"][1] == "sha256:" + hashlib.sha256(utf8.read_bytes()).hexdigest()


def test_same_text_twice_is_kept_once_and_reported(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("同じ文章です。\n", encoding="utf-8")
    b.write_bytes("同じ文章です。\r\n".encode("cp932"))  # other bytes, same text
    manifest = download_corpus(DownloadConfig(sources=[str(a), str(b)]), tmp_path / "out", tmp_path / "raw")
    assert [d["doc_id"] for d in manifest["documents"]] == ["a"]
    assert manifest["skipped"] == [{"source": str(b), "reason": "same text as a"}]
    assert manifest["counts"]["skipped"] == 1


# --- permanent failures ----------------------------------------------------------------------


def test_http_404_is_a_permanent_source_error(tmp_path: Path, http_server) -> None:
    url = http_server.url("cards/000035/files/missing.zip")
    with pytest.raises(SourceError) as info:
        download_corpus(DownloadConfig(sources=[url]), tmp_path / "out", tmp_path / "raw")
    assert not isinstance(info.value, TransientSourceError)
    assert url in str(info.value)
    assert "404" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_html_page_served_as_zip_is_not_a_zip_and_is_not_cached(tmp_path: Path, http_server) -> None:
    url = serve(http_server, MELOS_URL_PATH, b"<!DOCTYPE html><html><body>Not here</body></html>")
    cfg = DownloadConfig(sources=[url])
    with pytest.raises(SourceError) as info:
        download_corpus(cfg, tmp_path / "out", tmp_path / "raw")
    assert not isinstance(info.value, TransientSourceError)
    assert url in str(info.value)
    assert "not a ZIP" in str(info.value)
    assert not (tmp_path / "out").exists()
    # Once the server answers with the real archive, the next run refetches it instead of
    # failing forever on the cached error page.
    serve(http_server, MELOS_URL_PATH, MELOS_BYTES)
    manifest = download_corpus(cfg, tmp_path / "out", tmp_path / "raw")
    assert manifest["documents"][0]["title"] == "走れメロス"
    assert len(http_server.requests) == 2


def test_truncated_zip_is_a_source_error(tmp_path: Path) -> None:
    for cut in (len(MELOS_BYTES) // 2, len(MELOS_BYTES) - 10, 100):
        path = tmp_path / f"cut-{cut}.zip"
        path.write_bytes(MELOS_BYTES[:cut])
        with pytest.raises(SourceError, match="corrupt ZIP") as info:
            download_corpus(DownloadConfig(sources=[str(path)]), tmp_path / "out", tmp_path / "raw")
        assert str(path) in str(info.value)
        assert not (tmp_path / "out").exists()


def test_member_failing_its_crc_is_a_source_error(tmp_path: Path) -> None:
    data = "メロスは激怒した。\r\n".encode("cp932") * 20
    raw = bytearray(make_zip({"story.txt": data}, compression=zipfile.ZIP_STORED))
    pos = raw.index(data) + 5  # inside the stored (uncompressed) member
    raw[pos] ^= 0x01
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(raw))
    with pytest.raises(SourceError) as info:
        download_corpus(DownloadConfig(sources=[str(path)]), tmp_path / "out", tmp_path / "raw")
    message = str(info.value)
    assert str(path) in message and "story.txt" in message and "CRC" in message


def test_damaged_deflate_data_is_always_a_source_error(tmp_path: Path) -> None:
    """Flipping bytes of the real archive's compressed stream fails the CRC check or the
    inflater itself (zlib.error); both must surface as a SourceError naming the source."""
    info = zipfile.ZipFile(io.BytesIO(MELOS_BYTES)).infolist()[0]
    assert info.compress_type == zipfile.ZIP_DEFLATED
    extra_len = int.from_bytes(MELOS_BYTES[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + len(info.filename.encode()) + extra_len
    path = tmp_path / "damaged.zip"
    messages = []
    for pos in range(start, start + info.compress_size, 97):
        raw = bytearray(MELOS_BYTES)
        raw[pos] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(SourceError) as err:
            download_corpus(DownloadConfig(sources=[str(path)]), tmp_path / "out", tmp_path / "raw")
        assert str(path) in str(err.value)
        messages.append(str(err.value))
    assert any("CRC" in m for m in messages)
    assert any("decompressing" in m for m in messages)  # the zlib.error path is covered too
    assert not (tmp_path / "out").exists()


def test_zip_without_text_member(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    path.write_bytes(make_zip({"cover.png": b"\x89PNG....", "readme.html": b"<html></html>"}))
    with pytest.raises(SourceError, match=r"no \.txt member") as info:
        download_corpus(DownloadConfig(sources=[str(path)]), tmp_path / "out", tmp_path / "raw")
    assert str(path) in str(info.value)
    assert "cover.png" in str(info.value)


@pytest.mark.parametrize("kind", ["relative", "absolute", "backslash", "drive"])
def test_path_traversal_member_rejects_the_archive(tmp_path: Path, kind: str) -> None:
    evil = f"melos-evil-{uuid.uuid4().hex}.txt"
    member = {
        "relative": f"../../{evil}",
        "absolute": f"/tmp/{evil}",
        "backslash": f"..\\..\\{evil}",
        "drive": f"C:/{evil}",
    }[kind]
    archive = make_zip({"good.txt": "メロスは激怒した。\n".encode(), member: "悪意のある文章。\n".encode()})
    assert member in zipfile.ZipFile(io.BytesIO(archive)).namelist()  # the name really is unsafe
    src = tmp_path / "in" / "evil.zip"
    src.parent.mkdir()
    src.write_bytes(archive)
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    out = work / "out"
    watched = [tmp_path, tmp_path.parent]
    before = {d: sorted(os.listdir(d)) for d in watched}
    before_tree = tree(tmp_path)

    with pytest.raises(SourceError, match="unsafe member") as info:
        download_corpus(DownloadConfig(sources=[str(src)]), out, tmp_path / "raw")
    assert repr(member) in str(info.value)
    assert str(src) in str(info.value)

    assert not out.exists()
    assert tree(tmp_path) == before_tree
    assert {d: sorted(os.listdir(d)) for d in watched} == before
    for base in (out, work, tmp_path, Path("/tmp"), Path.cwd()):
        assert not (base / evil).exists()
        assert not (base / ".." / evil).exists()
        assert not (base / ".." / ".." / evil).exists()


def test_bytes_invalid_in_utf8_and_cp932_name_the_file(tmp_path: Path) -> None:
    raw = "メロスは激怒した。".encode("cp932") + b"\x82\xff\xfe\x82\xff"
    for codec in ("utf-8", "cp932"):
        with pytest.raises(UnicodeDecodeError):
            raw.decode(codec)
    path = tmp_path / "broken.txt"
    path.write_bytes(raw)
    with pytest.raises(SourceError) as info:
        download_corpus(DownloadConfig(sources=[str(path)]), tmp_path / "out", tmp_path / "raw")
    message = str(info.value)
    assert str(path) in message
    assert "cp932" in message and "encoding" in message
    assert not (tmp_path / "out").exists()


def test_bad_bytes_inside_a_zip_name_the_member(tmp_path: Path) -> None:
    path = tmp_path / "bad.zip"
    path.write_bytes(make_zip({"work/text.txt": b"\x82\xff\xfe" * 4}))
    with pytest.raises(SourceError) as info:
        download_corpus(DownloadConfig(sources=[str(path)]), tmp_path / "out", tmp_path / "raw")
    assert f"{path}!work/text.txt" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"   \r\n\r\n\t\n", "\u3000\u3000\n".encode("utf-8")])
def test_empty_corpus_is_a_source_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(SourceError, match="empty") as info:
        download_corpus(DownloadConfig(sources=[str(path)]), tmp_path / "out", tmp_path / "raw")
    assert str(path) in str(info.value)
    assert "no text after cleaning" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_local_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(SourceError, match="no such file") as info:
        download_corpus(DownloadConfig(sources=[str(missing)]), tmp_path / "out", tmp_path / "raw")
    assert str(missing) in str(info.value)


def test_download_larger_than_max_bytes(tmp_path: Path, http_server) -> None:
    url = serve(http_server, MELOS_URL_PATH, MELOS_BYTES)
    with pytest.raises(SourceError, match="max_bytes") as info:
        download_corpus(DownloadConfig(sources=[url], max_bytes=1000), tmp_path / "out", tmp_path / "raw")
    assert not isinstance(info.value, TransientSourceError)
    assert url in str(info.value)
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_member_larger_than_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    path.write_bytes(make_zip({"big.txt": "あ".encode() * 50_000}))
    assert path.stat().st_size < 20_000  # small archive, large member
    with pytest.raises(SourceError, match="max_bytes") as info:
        download_corpus(DownloadConfig(sources=[str(path)], max_bytes=20_000), tmp_path / "out", tmp_path / "raw")
    assert "big.txt" in str(info.value)


# --- transient failures ----------------------------------------------------------------------


def test_timeout_is_transient_and_names_the_url(tmp_path: Path, http_server) -> None:
    serve(http_server, MELOS_URL_PATH, MELOS_BYTES)
    http_server.slow_seconds = 3.0
    url = http_server.url("slow/" + MELOS_URL_PATH)
    with pytest.raises(TransientSourceError) as info:
        download_corpus(DownloadConfig(sources=[url], timeout_s=0.5, retries=0), tmp_path / "out", tmp_path / "raw")
    assert url in str(info.value)
    assert "timed out" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_http_503_is_transient_and_a_retry_fetches_the_file(tmp_path: Path, http_server) -> None:
    serve(http_server, MELOS_URL_PATH, MELOS_BYTES)
    http_server.flaky_failures = 3
    url = http_server.url("flaky/" + MELOS_URL_PATH)
    cfg = DownloadConfig(sources=[url], retries=0)
    for _ in range(3):
        with pytest.raises(TransientSourceError) as info:
            download_corpus(cfg, tmp_path / "out", tmp_path / "raw")
        assert url in str(info.value)
        assert "503" in str(info.value)
        assert not (tmp_path / "out").exists()
        assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []
    manifest = download_corpus(cfg, tmp_path / "out", tmp_path / "raw")
    assert manifest["documents"][0]["raw_sha256"] == hashlib.sha256(MELOS_BYTES).hexdigest()
    assert len(http_server.requests) == 4


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/x.zip"
    with pytest.raises(TransientSourceError) as info:
        download_corpus(DownloadConfig(sources=[url], timeout_s=2, retries=0), tmp_path / "out", tmp_path / "raw")
    assert url in str(info.value)


# --- a failed run never damages the previous output -----------------------------------------


HTTP_FAILURES = {"404", "not-zip", "timeout", "503"}


@pytest.mark.parametrize("failure", ["404", "not-zip", "traversal", "empty", "undecodable", "timeout", "503"])
def test_failure_leaves_previous_output_intact(tmp_path: Path, request, failure: str) -> None:
    out = tmp_path / "work" / "download"
    good = download_corpus(DownloadConfig(), out, tmp_path / "raw")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    if failure in HTTP_FAILURES:  # each HTTP server costs ~0.5 s to shut down
        http_server = request.getfixturevalue("http_server")
        serve(http_server, MELOS_URL_PATH, MELOS_BYTES)
        http_server.slow_seconds = 3.0
        http_server.flaky_failures = 1000
    bad_txt = tmp_path / "bad.txt"
    if failure == "empty":
        bad_txt.write_bytes(b"\n\n")
    elif failure == "undecodable":
        bad_txt.write_bytes(b"\x82\xff\xfe")
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(make_zip({"../../escape.txt": b"x"}))
    source = {
        "404": lambda: http_server.url("nothing.zip"),
        "not-zip": lambda: serve(http_server, "page.zip", b"<html>moved</html>"),
        "traversal": lambda: str(bad_zip),
        "empty": lambda: str(bad_txt),
        "undecodable": lambda: str(bad_txt),
        "timeout": lambda: http_server.url("slow/" + MELOS_URL_PATH),
        "503": lambda: http_server.url("flaky/" + MELOS_URL_PATH),
    }[failure]()
    # The good source first, so the stage fails part-way, after writing a document. An
    # empty source next to a good one is only skipped, so it has to stand alone.
    sources = [source] if failure == "empty" else ["embedded", source]
    with pytest.raises(SourceError):
        download_corpus(DownloadConfig(sources=sources, timeout_s=0.5, retries=0), out, tmp_path / "raw")

    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == good
    assert sorted(p.name for p in out.parent.iterdir()) == ["download"]  # no temporary leftovers


# --- keys and source parsing -----------------------------------------------------------------


def test_download_key(tmp_path: Path) -> None:
    text = tmp_path / "story.txt"
    text.write_text("メロスは激怒した。\n", encoding="utf-8")
    url = f"http://127.0.0.1:{free_port()}/cards/1.zip"  # nothing listens: the key must not fetch
    cfg = DownloadConfig(sources=["embedded", str(text), url])
    key = download_key(cfg)
    assert key == download_key(DownloadConfig(sources=["embedded", str(text), url]))
    assert len(key) == 16 and int(key, 16) >= 0
    # speed-only settings do not change it; settings that change the output do
    assert download_key(DownloadConfig(sources=cfg.sources, timeout_s=1, max_bytes=10)) == key
    assert download_key(DownloadConfig(sources=cfg.sources, encoding="cp932")) != key
    assert download_key(DownloadConfig(sources=["embedded", str(text)])) != key

    text.write_text("メロスは激怒した!\n", encoding="utf-8")  # edited in place
    edited = download_key(cfg)
    assert edited != key
    text.write_text("メロスは激怒した。\n", encoding="utf-8")  # edited back
    assert download_key(cfg) == key

    copy = tmp_path / "elsewhere" / "copy.txt"  # the path names the document: part of the key
    copy.parent.mkdir()
    copy.write_bytes(text.read_bytes())
    assert download_key(DownloadConfig(sources=["embedded", str(copy), url])) != key

    text.unlink()
    with pytest.raises(SourceError, match="no such file") as info:
        download_key(cfg)
    assert str(text) in str(info.value)


def test_parse_source_kinds(tmp_path: Path) -> None:
    embedded = parse_source("  embedded ")
    assert embedded.kind == "embedded"
    assert Path(embedded.location) == EMBEDDED_ZIP and Path(embedded.location).is_file()
    assert embedded.stem == "1567_ruby_4948"

    url = parse_source("https://www.aozora.gr.jp/cards/000035/files/1567_ruby_4948.zip")
    assert (url.kind, url.stem) == ("url", "1567_ruby_4948")
    assert parse_source("http://127.0.0.1:8000/a%20b.zip?x=1").stem == "a b"

    local = parse_source(str(tmp_path / "dir" / "work.txt"))
    assert (local.kind, local.location, local.stem) == ("path", str(tmp_path / "dir" / "work.txt"), "work")
    home = parse_source("~/corpus/x.zip")
    assert home.kind == "path" and home.location == str(Path.home() / "corpus" / "x.zip")
    assert parse_source("relative/dir/y.zip").kind == "path"
    assert parse_source("C:\\corpus\\z.zip").kind == "path"  # a drive letter is no scheme


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("ftp://example.com/x.zip", "unsupported URL scheme 'ftp'"),
        ("file:///tmp/x.zip", "unsupported URL scheme 'file'"),
        ("s3://bucket/x.zip", "unsupported URL scheme 's3'"),
        ("http://", "no host"),
        ("https:///cards/x.zip", "no host"),
        ("http://[::1/x.zip", "malformed URL"),
    ],
)
def test_parse_source_rejects(spec: str, fragment: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_source(spec)
    assert not isinstance(info.value, TransientSourceError)
    assert fragment in str(info.value)
    assert repr(spec) in str(info.value)


def test_config_refuses_no_sources() -> None:
    with pytest.raises(ValueError, match="sources is empty"):
        DownloadConfig(sources=["  ", ""])
    assert DownloadConfig(sources=[" embedded "]).sources == ["embedded"]


def test_a_finished_download_is_kept_not_replaced_under_its_readers(tmp_path):
    """Runs sharing a work directory: the second run of the same download keeps the first's
    directory (a tokenize stage may be reading it), unless it is incomplete."""
    cfg = DownloadConfig()
    out = tmp_path / "download"
    first = download_corpus(cfg, out, tmp_path / "raw")
    inode = out.stat().st_ino
    again = download_corpus(cfg, out, tmp_path / "raw")
    assert again == first and out.stat().st_ino == inode  # same directory, not swapped
    [doc] = first["documents"]
    (out / "docs" / f"{doc['doc_id']}.txt").unlink()  # incomplete: made again
    remade = download_corpus(cfg, out, tmp_path / "raw")
    assert remade["fingerprint"] == first["fingerprint"] and (out / "docs" / f"{doc['doc_id']}.txt").is_file()
