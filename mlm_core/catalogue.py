"""Aozora Bunko's catalogue (``list_person_all_extended_utf8.zip``) and selections from it.

The catalogue is a ZIP holding one CSV: UTF-8 with a BOM, every field quoted, 55 columns,
one row per work × person (author, translator, editor, ...). A selection such as
``aozora:author=35,879`` keeps, by default, the rows of public-domain works
(作品著作権フラグ なし) in the author role (著者), so a translator's row never duplicates a
work; a work with two authors stays one work, with both names.
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

CATALOGUE_PATH = "index_pages/list_person_all_extended_utf8.zip"
AOZORA_HOSTS = ("www.aozora.gr.jp", "aozora.gr.jp")
SELECTORS = ("author", "work", "all")

# Column names of the extended catalogue that Melos reads.
COL_WORK_ID = "作品ID"
COL_TITLE = "作品名"
COL_SUBTITLE = "副題"
COL_WORK_COPYRIGHT = "作品著作権フラグ"
COL_CARD_URL = "図書カードURL"
COL_PERSON_ID = "人物ID"
COL_FAMILY, COL_GIVEN = "姓", "名"
COL_ROLE = "役割フラグ"
COL_TEXT_URL = "テキストファイルURL"
TEIHON_COLUMNS = ("底本名1", "底本出版社名1", "底本初版発行年1", "入力に使用した版1", "校正に使用した版1")
REQUIRED = (COL_WORK_ID, COL_TITLE, COL_WORK_COPYRIGHT, COL_PERSON_ID, COL_ROLE, COL_TEXT_URL)


class CatalogueError(ValueError):
    """A selection or catalogue that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Selection:
    """``aozora:author=35,879`` -> Selection("author", (35, 879))."""

    by: str
    ids: tuple[int, ...] = ()

    @property
    def spec(self) -> str:
        return "aozora:all" if self.by == "all" else f"aozora:{self.by}=" + ",".join(str(i) for i in self.ids)


@dataclass
class Work:
    work_id: str
    title: str
    authors: list[str]
    person_ids: list[str]
    url: str  # the テキストファイルURL as the catalogue gives it
    card_url: str
    teihon: str  # 底本 provenance: edition, publisher, year, editions used

    @property
    def author(self) -> str:
        return "・".join(self.authors)


def parse_selection(spec: str) -> Selection:
    """``aozora:all``, ``aozora:author=35,879`` or ``aozora:work=1567`` (ids with or without zeros)."""
    body = spec.strip()[len("aozora:"):].strip()
    if body == "all":
        return Selection("all")
    by, sep, ids = body.partition("=")
    by = by.strip()
    if not sep or by not in ("author", "work"):
        raise CatalogueError(
            f"source {spec!r}: unknown Aozora selection; use aozora:all, aozora:author=ID[,ID...] or aozora:work=ID[,ID...]"
        )
    try:
        parsed = tuple(sorted({int(i) for i in ids.split(",") if i.strip()}))
    except ValueError:
        raise CatalogueError(f"source {spec!r}: ids must be numbers, as in aozora:{by}=35,879") from None
    if not parsed:
        raise CatalogueError(f"source {spec!r}: no {by} id given; e.g. aozora:{by}=35")
    return Selection(by, parsed)


def read_catalogue(raw: bytes, name: str = CATALOGUE_PATH) -> list[dict[str, str]]:
    """The rows of the catalogue ZIP as dicts keyed by the (Japanese) header."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        members = [i for i in archive.infolist() if i.filename.lower().endswith(".csv")]
        if len(members) != 1:
            raise CatalogueError(f"catalogue {name!r}: expected one .csv member, found {len(members)}")
        text = archive.read(members[0]).decode("utf-8-sig")
    except (zipfile.BadZipFile, UnicodeDecodeError, EOFError) as exc:
        raise CatalogueError(f"catalogue {name!r}: not a UTF-8 CSV in a ZIP ({exc}); check the base URL") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise CatalogueError(f"catalogue {name!r}: missing columns {missing}; is it list_person_all_extended_utf8?")
    return list(reader)


def _teihon(row: dict[str, str]) -> str:
    return "、".join(v for c in TEIHON_COLUMNS if (v := (row.get(c) or "").strip()))


def select_works(rows: list[dict[str, str]], selection: Selection, *, public_domain_only: bool = True,
                 role: str = "著者") -> list[Work]:
    """The works a selection names, in catalogue work-id order, one entry per work."""
    works: dict[str, Work] = {}
    for row in rows:
        if row[COL_ROLE] != role:
            continue
        if public_domain_only and row[COL_WORK_COPYRIGHT] != "なし":
            continue
        work_id, person_id = row[COL_WORK_ID].strip(), row[COL_PERSON_ID].strip()
        if selection.by == "author" and int(person_id or -1) not in selection.ids:
            continue
        if selection.by == "work" and int(work_id or -1) not in selection.ids:
            continue
        name = f"{row.get(COL_FAMILY, '')}{row.get(COL_GIVEN, '')}".strip()
        if work_id in works:  # a second author of the same work
            works[work_id].authors.append(name)
            works[work_id].person_ids.append(person_id)
            continue
        title = row[COL_TITLE].strip()
        if (row.get(COL_SUBTITLE) or "").strip():
            title = f"{title} {row[COL_SUBTITLE].strip()}"
        works[work_id] = Work(
            work_id=work_id, title=title, authors=[name], person_ids=[person_id],
            url=row[COL_TEXT_URL].strip(), card_url=(row.get(COL_CARD_URL) or "").strip(), teihon=_teihon(row),
        )
    return [works[k] for k in sorted(works, key=lambda w: (int(w) if w.isdigit() else 0, w))]


def rebase_url(url: str, base_url: str) -> str | None:
    """The catalogue URL of a file, moved under ``base_url``; None for an external URL.

    ``base_url`` is the site, a mirror (``http://127.0.0.1:8765/``) or a local directory;
    the result is then a URL or a local path.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.netloc.lower() not in AOZORA_HOSTS:
        return None
    return join_base(base_url, parsed.path.lstrip("/"))


def join_base(base_url: str, path: str) -> str:
    """``path`` under a base that is a URL or a local directory."""
    if urlparse(base_url).scheme in ("http", "https"):
        return base_url.rstrip("/") + "/" + path
    return str(Path(base_url).expanduser() / path)
