"""Corpus-scale sources: Aozora catalogue selections served over HTTP (or from a local
directory), directories and globs, JSON Lines / Parquet corpora, parallel downloads with a
failure threshold, per-file retries, and the raw cache."""

from __future__ import annotations

import csv
import os
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm_core.catalogue import CATALOGUE_PATH, parse_selection, read_catalogue, select_works
from mlm_core.config import DownloadConfig
from mlm_core.download import SourceError, check_sources, download_corpus, download_key, parse_source

# The real header of list_person_all_extended_utf8.csv (55 columns).
HEADER = (
    "作品ID,作品名,作品名読み,ソート用読み,副題,副題読み,原題,初出,分類番号,文字遣い種別,作品著作権フラグ,公開日,"
    "最終更新日,図書カードURL,人物ID,姓,名,姓読み,名読み,姓読みソート用,名読みソート用,姓ローマ字,名ローマ字,"
    "役割フラグ,生年月日,没年月日,人物著作権フラグ,底本名1,底本出版社名1,底本初版発行年1,入力に使用した版1,"
    "校正に使用した版1,底本の親本名1,底本の親本出版社名1,底本の親本初版発行年1,底本名2,底本出版社名2,"
    "底本初版発行年2,入力に使用した版2,校正に使用した版2,底本の親本名2,底本の親本出版社名2,底本の親本初版発行年2,"
    "入力者,校正者,テキストファイルURL,テキストファイル最終更新日,テキストファイル符号化方式,テキストファイル文字集合,"
    "テキストファイル修正回数,XHTML/HTMLファイルURL,XHTML/HTMLファイル最終更新日,XHTML/HTMLファイル符号化方式,"
    "XHTML/HTMLファイル文字集合,XHTML/HTMLファイル修正回数"
).split(",")
SITE = "https://www.aozora.gr.jp/"


def work_text(title: str, author: str, body: str) -> bytes:
    return (
        f"{title}\r\n{author}\r\n\r\n"
        "-------------------------------------------------------\r\n"
        "【テキスト中に現れる記号について】\r\n\r\n《》：ルビ\r\n"
        "-------------------------------------------------------\r\n\r\n"
        f"{body}\r\n\r\n底本：「{title}」テスト文庫\r\n"
    ).encode("cp932")


def row(work_id: int, title: str, person_id: int, family: str, given: str, *, role: str = "著者",
        copyright_: str = "なし", url: str | None = None) -> dict:
    values = dict.fromkeys(HEADER, "")
    values.update({
        "作品ID": f"{work_id:06d}", "作品名": title, "作品著作権フラグ": copyright_, "人物ID": f"{person_id:06d}",
        "姓": family, "名": given, "役割フラグ": role, "底本名1": f"{title}全集", "底本出版社名1": "テスト書房",
        "底本初版発行年1": "1990（平成2）年1月1日",
        "図書カードURL": f"{SITE}cards/{person_id:06d}/card{work_id}.html",
        "テキストファイルURL": f"{SITE}cards/{person_id:06d}/files/{work_id}_ruby_1.zip" if url is None else url,
    })
    return values


def catalogue_zip(rows: list[dict]) -> bytes:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, HEADER, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("list_person_all_extended_utf8.csv", "\ufeff" + text.getvalue())  # UTF-8 with BOM
    return buf.getvalue()


ROWS = [
    row(1, "一の話", 35, "太宰", "治"),
    row(2, "二の話", 35, "太宰", "治"),
    row(2, "二の話", 35, "訳者", "某", role="翻訳者"),  # a translator's row: not a second work
    row(3, "三の話", 879, "芥川", "竜之介"),
    row(3, "三の話", 880, "共著", "者"),  # a second author of the same work
    row(4, "四の話", 35, "太宰", "治", copyright_="あり"),  # still in copyright: left out
    row(5, "五の話", 879, "芥川", "竜之介", url=""),  # no text file: skipped, counted
    row(6, "六の話", 879, "芥川", "竜之介", url="https://example.com/6.zip"),  # external: skipped, counted
]


def write_site(root: Path, rows=ROWS, missing: tuple[int, ...] = ()) -> None:
    """A small copy of the site under ``root``: the catalogue and one ZIP per work."""
    (root / CATALOGUE_PATH).parent.mkdir(parents=True, exist_ok=True)
    (root / CATALOGUE_PATH).write_bytes(catalogue_zip(rows))
    for r in rows:
        work_id = int(r["作品ID"])
        if not r["テキストファイルURL"].startswith(SITE) or work_id in missing:
            continue
        path = root / r["テキストファイルURL"][len(SITE):]
        path.parent.mkdir(parents=True, exist_ok=True)
        body = f"{r['作品名']}の本文である。第{work_id}の作品は{work_id * 7}頁ある。"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"work{work_id}.txt", work_text(r["作品名"], r["姓"] + r["名"], body))


def test_catalogue_selection_roles_copyright_and_coauthors() -> None:
    rows = read_catalogue(catalogue_zip(ROWS))
    assert len(rows) == len(ROWS) and list(rows[0]) == HEADER
    by_author = select_works(rows, parse_selection("aozora:author=35"))
    assert [w.work_id for w in by_author] == ["000001", "000002"]  # no translator duplicate, no copyrighted work
    (three,) = select_works(rows, parse_selection("aozora:work=3"))
    assert three.author == "芥川竜之介・共著者" and three.teihon.startswith("三の話全集、テスト書房")
    assert [w.work_id for w in select_works(rows, parse_selection("aozora:all"))] == [f"{i:06d}" for i in (1, 2, 3, 5, 6)]
    assert parse_selection("aozora:author=000035, 879").ids == (35, 879)


@pytest.mark.parametrize(
    "spec, fragment",
    [("aozora:writer=35", "unknown Aozora selection"), ("aozora:author=", "no author id"),
     ("aozora:work=abc", "ids must be numbers")],
)
def test_bad_selections_name_the_source(spec: str, fragment: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_source(spec)
    assert fragment in str(info.value) and repr(spec) in str(info.value)


def test_catalogue_over_http_with_metadata_skips_and_cache(tmp_path: Path, http_server) -> None:
    write_site(http_server.root)
    cfg = DownloadConfig(sources=["aozora:author=35,879"], aozora_base_url=http_server.url(""), concurrency=3)
    manifest = download_corpus(cfg, tmp_path / "out", tmp_path / "raw")

    docs = manifest["documents"]
    assert [d["work_id"] for d in docs] == ["000001", "000002", "000003"]
    first = docs[0]
    assert first["title"] == "一の話" and first["author"] == "太宰治"
    assert first["teihon"].startswith("一の話全集、テスト書房") and first["provenance"].startswith("底本")
    assert first["source"] == http_server.url("cards/000035/files/1_ruby_1.zip")
    assert first["origin"] == "aozora:author=35,879"
    assert (tmp_path / "out" / "docs" / "1_ruby_1.txt").read_text(encoding="utf-8").startswith("一の話の本文である。")
    counts = manifest["counts"]
    assert (counts["files"], counts["documents"], counts["failed"]) == (3, 3, 0)
    assert (counts["skipped_no_url"], counts["skipped_external_url"]) == (1, 1)
    assert {s["work_id"] for s in manifest["skipped"]} == {"000005", "000006"}
    works = sorted(p for p in http_server.requests if "/files/" in p)
    assert works == ["/cards/000035/files/1_ruby_1.zip", "/cards/000035/files/2_ruby_1.zip",
                     "/cards/000879/files/3_ruby_1.zip"]

    # a re-run downloads no work again (the catalogue is read fresh)
    again = download_corpus(cfg, tmp_path / "again", tmp_path / "raw")
    assert sorted(p for p in http_server.requests if "/files/" in p) == works
    assert again["fingerprint"] == manifest["fingerprint"]


def test_local_directory_as_base_url_gives_the_same_corpus(tmp_path: Path, http_server) -> None:
    write_site(http_server.root)
    over_http = download_corpus(
        DownloadConfig(sources=["aozora:all"], aozora_base_url=http_server.url("")), tmp_path / "a", tmp_path / "raw"
    )
    local = download_corpus(
        DownloadConfig(sources=["aozora:all"], aozora_base_url=str(http_server.root)), tmp_path / "b", tmp_path / "raw"
    )
    assert local["fingerprint"] == over_http["fingerprint"]
    assert [d["work_id"] for d in local["documents"]] == ["000001", "000002", "000003"]


def test_a_few_failures_in_a_selection_are_listed_past_the_threshold_fatal(tmp_path: Path, http_server) -> None:
    write_site(http_server.root, missing=(2,))  # work 2's ZIP is gone: HTTP 404
    base = http_server.url("")
    manifest = download_corpus(
        DownloadConfig(sources=["aozora:all"], aozora_base_url=base, max_failed_fraction=0.5), tmp_path / "ok", tmp_path / "raw"
    )
    assert [d["work_id"] for d in manifest["documents"]] == ["000001", "000003"]
    (failure,) = manifest["failures"]
    assert failure["work_id"] == "000002" and "404" in failure["error"] and not failure["transient"]
    assert manifest["counts"]["failed"] == 1

    with pytest.raises(SourceError, match=r"1 of 3 selected files failed .*max_failed_fraction=0.1"):
        download_corpus(DownloadConfig(sources=["aozora:all"], aozora_base_url=base, max_failed_fraction=0.1),
                        tmp_path / "strict", tmp_path / "raw")
    assert not (tmp_path / "strict").exists()

    # the same file named explicitly fails the stage whatever the threshold
    with pytest.raises(SourceError, match="404"):
        download_corpus(DownloadConfig(sources=[base + "cards/000035/files/2_ruby_1.zip"], max_failed_fraction=1.0),
                        tmp_path / "named", tmp_path / "raw")


def test_transient_errors_are_retried_per_file(tmp_path: Path, http_server) -> None:
    write_site(http_server.root)
    http_server.flaky_failures = 2
    url = http_server.url("flaky/cards/000035/files/1_ruby_1.zip")
    manifest = download_corpus(DownloadConfig(sources=[url], retries=2, retry_backoff_s=0.01), tmp_path / "o", tmp_path / "r")
    assert manifest["counts"]["documents"] == 1
    assert http_server.requests.count("/flaky/cards/000035/files/1_ruby_1.zip") == 3


def test_directory_and_glob_sources(tmp_path: Path) -> None:
    write_site(tmp_path / "site")  # every file, whatever the catalogue says (work 4 included)
    cards = tmp_path / "site" / "cards"
    (cards / "notes.md").write_text("not a corpus file")
    by_dir = download_corpus(DownloadConfig(sources=[str(cards)]), tmp_path / "d", tmp_path / "raw")
    assert [d["doc_id"] for d in by_dir["documents"]] == ["1_ruby_1", "2_ruby_1", "4_ruby_1", "3_ruby_1"]
    by_glob = download_corpus(DownloadConfig(sources=[str(cards / "000035" / "files" / "*.zip")]), tmp_path / "g", tmp_path / "raw")
    assert [d["doc_id"] for d in by_glob["documents"]] == ["1_ruby_1", "2_ruby_1", "4_ruby_1"]
    assert download_key(DownloadConfig(sources=[str(cards)])) != download_key(DownloadConfig(sources=[str(cards / "000035")]))
    with pytest.raises(SourceError, match="matches no .zip or .txt file"):
        check_sources(DownloadConfig(sources=[str(tmp_path / "site" / "*.pdf")]))


def test_jsonl_and_parquet_text_columns(tmp_path: Path) -> None:
    texts = ["ＡＢＣの記事である。次の文だ。\n\n二段落目。", "", "別の記事。"]
    jsonl = tmp_path / "wiki.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": t}, ensure_ascii=False) for i, t in enumerate(texts)) + "\n",
                     encoding="utf-8")
    parquet = tmp_path / "web.parquet"
    pq.write_table(pa.table({"text": texts}), parquet)

    from_jsonl = download_corpus(DownloadConfig(sources=[f"jsonl:{jsonl}?field=body"]), tmp_path / "j", tmp_path / "raw")
    ids = [d["doc_id"] for d in from_jsonl["documents"]]
    assert ids == ["wiki-00000000", "wiki-00000002"]
    # NFKC (ＡＢＣ -> ABC) and one paragraph per line, no Aozora cleaning
    assert (tmp_path / "j" / "docs" / f"{ids[0]}.txt").read_text(encoding="utf-8") == "ABCの記事である。次の文だ。\n二段落目。\n"
    assert from_jsonl["skipped"] == [{"source": f"jsonl:{jsonl}?field=body#1", "reason": "no text after cleaning"}]

    from_parquet = download_corpus(DownloadConfig(sources=[str(parquet)]), tmp_path / "p", tmp_path / "raw")
    assert [d["text_sha256"] for d in from_parquet["documents"]] == [d["text_sha256"] for d in from_jsonl["documents"]]
    with pytest.raises(SourceError, match="no column 'body'"):
        download_corpus(DownloadConfig(sources=[f"parquet:{parquet}?field=body"]), tmp_path / "x", tmp_path / "raw")
    with pytest.raises(SourceError, match="no field 'text'"):
        download_corpus(DownloadConfig(sources=[str(jsonl)]), tmp_path / "y", tmp_path / "raw")


def test_missing_local_sources_are_found_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        check_sources(DownloadConfig(sources=["embedded", str(tmp_path / "nope.zip")]))
    with pytest.raises(SourceError, match="no catalogue at"):
        check_sources(DownloadConfig(sources=["aozora:all"], aozora_base_url=str(tmp_path)))
    check_sources(DownloadConfig(sources=["aozora:all"]))  # the site itself is not contacted here


def test_cli_reports_a_missing_source_in_one_line_before_any_server(tmp_path: Path) -> None:
    import subprocess
    import sys

    missing = tmp_path / "nope.zip"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "pretrain", "--source", "embedded", "--source", str(missing),
         "--workdir", str(tmp_path / "work")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"melos: source {str(missing)!r}: no such file {str(missing)!r}"]
    assert not (tmp_path / "work").exists() and not (tmp_path / "mlflow.db").exists()


def test_download_task_logs_failures_the_dataset_and_progress(prefect_harness, http_server, tmp_path, monkeypatch):
    """Under Prefect and MLflow: a catalogue run with one missing work finishes, lists the
    failure in MLflow, records the corpus as a dataset input, and reports progress."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks import tracking
    from tasks.download import download_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_site(http_server.root, missing=(2,))
    parent = tracking.start_parent("melos-sources", "test", {})
    cfg = DownloadConfig(sources=["aozora:all"], aozora_base_url=http_server.url(""), max_failed_fraction=0.5)

    @flow
    def one_stage():
        return download_stage(cfg=cfg, workdir=str(tmp_path / "work"), parent_run_id=parent)

    state = one_stage(return_state=True)
    record, flow_run_id = state.result(), state.state_details.flow_run_id
    assert record["failed"] == 1 and record["counts"]["documents"] == 2
    client = tracking.client()
    run = client.get_run(record["mlflow_run_id"])
    assert run.data.metrics["download/failed"] == 1 and run.data.metrics["download/skipped_external_url"] == 1
    problems = json.loads(Path(run.info.artifact_uri.removeprefix("file://"), "download_problems.json").read_text())
    assert [f["work_id"] for f in problems["failures"]] == ["000002"]
    for run_id in (record["mlflow_run_id"], parent):
        (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
        assert dataset_input.dataset.digest == record["fingerprint"]
        assert json.loads(dataset_input.dataset.profile)["documents"] == 2

    async def progress_artifacts():
        async with get_client() as prefect:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            return await prefect.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["melos-download-progress"]))
            )

    import asyncio

    # this flow run's (the test server also holds other tests' runs, in no set order)
    artifacts = [a for a in asyncio.run(progress_artifacts()) if a.flow_run_id == flow_run_id]
    assert artifacts and artifacts[-1].type == "progress" and float(artifacts[-1].data) == 100.0
    tracking.end_run(parent)
