"""Stage 1: fetch corpus sources and turn them into cleaned UTF-8 documents.

A source is ``embedded`` (the 走れメロス ZIP shipped with the package), a local ``.zip`` /
``.txt`` path, or an http(s) URL of an Aozora Bunko ZIP. Every failure names the source
and the problem; network failures raise ``TransientSourceError`` so the orchestrator can
retry them, everything else raises ``SourceError`` (retrying a 404 cannot help).

ZIP members are read in memory and never extracted by name, and a member whose path would
leave the archive (``../``, absolute paths) rejects the archive, so nothing is ever written
outside the output directory.
"""

from __future__ import annotations

import glob as globmod
import io
import json
import posixpath
import re
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlparse

from .aozora import TextDecodeError, clean_aozora, clean_plain, decode_text
from .catalogue import CATALOGUE_PATH, CatalogueError, join_base, parse_selection, read_catalogue, rebase_url, select_works
from .config import EMBEDDED_SOURCE, DownloadConfig
from .errors import UserError
from .io import atomic_dir, atomic_path, atomic_write_json, exclusive, fingerprint, sha256_bytes, sha256_file
from .pause import pause_point

EMBEDDED_ZIP = Path(__file__).parent / "corpus" / "1567_ruby_4948.zip"
TEXT_SUFFIXES = (".txt",)
_USER_AGENT = "melos-corpus-download/0.1 (+https://github.com/melos)"


class SourceError(UserError, ValueError):
    """A source that cannot become documents; the message names the source and the fix."""


class TransientSourceError(SourceError):
    """A network failure (timeout, connection reset, HTTP 5xx/429) that a retry may fix."""


@dataclass(frozen=True)
class Source:
    kind: str  # "embedded" | "path" | "url" | "files" (directory or glob) | "aozora" | "table"
    location: str  # path, URL, glob, or the catalogue selection
    name: str  # what users wrote, used in messages
    table_format: str | None = None  # "jsonl" | "parquet" for kind "table"
    text_field: str | None = None

    @property
    def stem(self) -> str:
        base = posixpath.basename(urlparse(self.location).path) if self.kind == "url" else Path(self.location).name
        return Path(unquote(base)).stem or "document"


@dataclass(frozen=True)
class Item:
    """One file to fetch and read, with what the catalogue says about it."""

    source: Source  # kind "embedded" | "path" | "url"
    origin: str  # the source spec the file came from
    explicit: bool  # named by the user (a failure is fatal) or part of a selection
    meta: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class Document:
    doc_id: str
    source: str
    member: str | None
    raw_sha256: str
    raw_bytes: int
    text_chars: int
    text_sha256: str
    title: str | None
    author: str | None
    provenance: str | None
    work_id: str | None = None
    teihon: str | None = None
    origin: str | None = None


_GLOB_CHARS = re.compile(r"[*?\[]")
_TABLE_PREFIXES = ("jsonl:", "parquet:")


def _table_source(spec: str, fmt: str, rest: str) -> Source:
    path, _, query = rest.partition("?")
    params = parse_qs(query)
    unknown = sorted(set(params) - {"field"})
    if unknown:
        raise SourceError(f"source {spec!r}: unknown option(s) {unknown}; only ?field=COLUMN is understood")
    text_field = params.get("field", ["text"])[-1]
    if not path:
        raise SourceError(f"source {spec!r}: no file given; e.g. {fmt}:corpus.{fmt}?field=text")
    return Source("table", str(Path(path).expanduser()), spec, table_format=fmt, text_field=text_field)


def parse_source(spec: str) -> Source:
    spec = spec.strip()
    if spec == EMBEDDED_SOURCE:
        return Source("embedded", str(EMBEDDED_ZIP), spec)
    if spec.startswith("aozora:"):
        try:
            parse_selection(spec)
        except CatalogueError as exc:
            raise SourceError(str(exc)) from None
        return Source("aozora", spec, spec)
    for prefix in _TABLE_PREFIXES:
        if spec.startswith(prefix):
            return _table_source(spec, prefix[:-1], spec[len(prefix):])
    try:
        parsed = urlparse(spec)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise SourceError(f"source {spec!r}: malformed URL ({exc})") from exc
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not parsed.netloc:
            raise SourceError(f"source {spec!r}: the URL has no host; expected http(s)://host/path")
        return Source("url", spec, spec)
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise SourceError(
            f"source {spec!r}: unsupported URL scheme {scheme!r}; use http(s), a local path, 'aozora:...', "
            "'jsonl:...', 'parquet:...' or 'embedded'"
        )
    path = str(Path(spec).expanduser())
    if path.lower().endswith((".jsonl", ".parquet")):
        return _table_source(spec, "jsonl" if path.lower().endswith(".jsonl") else "parquet", spec)
    if _GLOB_CHARS.search(spec) or Path(path).is_dir():
        return Source("files", path, spec)
    return Source("path", path, spec)


def _files_of(source: Source) -> list[Path]:
    """The .zip/.txt files of a directory (recursively) or a glob, sorted."""
    if Path(source.location).is_dir():
        found = [p for p in Path(source.location).rglob("*") if p.is_file()]
    else:
        found = [Path(p) for p in globmod.glob(source.location, recursive=True) if Path(p).is_file()]
    found = sorted(p for p in found if p.suffix.lower() in (".zip", *TEXT_SUFFIXES))
    if not found:
        raise SourceError(f"source {source.name!r}: matches no .zip or .txt file; check the directory or pattern")
    return found


def source_key(source: Source, cfg: DownloadConfig | None = None) -> str:
    """What identifies a source's content without downloading it (for cache keys).

    Local files are hashed (cheap, and an edited file must not hit the cache); a URL is
    identified by itself, as Aozora publishes a revised text under a new file name; a
    catalogue selection by itself and the base URL it is read from.
    """
    if source.kind == "url":
        return source.location
    if source.kind == "aozora":
        base = cfg.aozora_base_url if cfg is not None else DownloadConfig().aozora_base_url
        return f"{source.location}@{base}"
    if source.kind == "files":
        return fingerprint([(str(p), sha256_file(p)) for p in _files_of(source)])
    path = Path(source.location)
    if not path.is_file():
        raise SourceError(f"source {source.name!r}: no such file {str(path)!r}")
    digest = f"sha256:{sha256_file(path)}"
    return f"{digest}?field={source.text_field}" if source.kind == "table" else digest


def _name_not_resolved(exc: BaseException) -> bool:
    """Whether a connection failed on the host name (DNS), not on the connection itself."""
    import socket

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return any(m in text for m in ("Name or service not known", "nodename nor servname", "name resolution",
                                   "No address associated", "getaddrinfo failed"))


def _peek(source: Source) -> None:
    """What a named local file shows at a glance (its size, its first bytes, a table's first
    row or schema) checked before anything starts; the full read during the run finds the rest."""
    if source.kind not in ("path", "table"):
        return
    path = Path(source.location)
    if path.stat().st_size == 0:
        raise SourceError(f"source {source.name!r}: the file is empty; give a file with text in it")
    if source.kind == "path" and path.suffix.lower() == ".zip" and not zipfile.is_zipfile(path):
        raise SourceError(f"source {source.name!r}: not a ZIP archive; give an Aozora Bunko .zip, or a .txt file")
    if source.kind == "table":
        first = next(iter(_read_table(source)), None)
        if first is None:
            raise SourceError(f"source {source.name!r}: holds no rows; give a file with text in it")


def check_sources(cfg: DownloadConfig) -> None:
    """Fail fast (before any server starts) on sources that cannot work: bad specs, missing
    local files, an empty directory, a local Aozora mirror without its catalogue."""
    for spec in cfg.sources:
        source = parse_source(spec)
        source_key(source, cfg)
        _peek(source)
        if source.kind == "aozora" and urlparse(cfg.aozora_base_url).scheme not in ("http", "https"):
            catalogue = Path(join_base(cfg.aozora_base_url, CATALOGUE_PATH))
            if not catalogue.is_file():
                raise SourceError(
                    f"source {spec!r}: no catalogue at {str(catalogue)!r}; aozora_base_url must be the site, "
                    "a mirror URL, or a directory holding index_pages/ and cards/"
                )


def http_client(timeout_s: float, connections: int = 8):
    """One HTTP client for many downloads (thread-safe; connections and TLS set-up are reused)."""
    import httpx  # imported here: only URL sources need it

    return httpx.Client(
        timeout=httpx.Timeout(timeout_s), follow_redirects=True, headers={"User-Agent": _USER_AGENT},
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


def fetch_url(url: str, dest: Path, *, timeout_s: float, max_bytes: int, client=None) -> None:
    """Stream ``url`` into ``dest`` atomically, enforcing a timeout and a size limit."""
    import httpx

    own = client is None
    client = http_client(timeout_s) if own else client
    try:
        with client.stream("GET", url) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise TransientSourceError(f"source {url!r}: HTTP {status} {response.reason_phrase} (will retry)")
            if status >= 400:
                raise SourceError(
                    f"source {url!r}: HTTP {status} {response.reason_phrase}; check the URL "
                    "(Aozora ZIPs live under /cards/<person id>/files/)"
                )
            with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
                received = 0
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    if received > max_bytes:
                        raise SourceError(
                            f"source {url!r}: larger than max_bytes={max_bytes}; raise the limit if this is intended"
                        )
                    fh.write(chunk)
    except httpx.TimeoutException as exc:
        raise TransientSourceError(f"source {url!r}: timed out after {timeout_s:g}s ({type(exc).__name__})") from exc
    except httpx.ConnectError as exc:
        host = urlparse(url).hostname
        if _name_not_resolved(exc):  # no retry: offline, or a misspelt host, stays so for the next minutes
            raise SourceError(f"source {url!r}: cannot resolve the host {host!r} (offline, or a misspelt host?); "
                              "check the URL and the network, or use a local .zip/.txt file") from exc
        raise TransientSourceError(f"source {url!r}: cannot connect to {host!r}: {exc}") from exc
    except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise TransientSourceError(f"source {url!r}: network error: {exc}") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # bad URL, redirect loop, ...: a retry cannot help
        raise SourceError(f"source {url!r}: {type(exc).__name__}: {exc}") from exc
    finally:
        if own:
            client.close()


def _safe_member_name(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and not re.match(r"^[A-Za-z]:", name)


def read_members(raw: bytes, source: Source, max_bytes: int) -> list[tuple[str | None, bytes]]:
    """The text payloads of one raw source: every ``.txt`` member of a ZIP, or the file itself."""
    is_zip = raw[:4] == b"PK\x03\x04" or raw[:4] == b"PK\x05\x06"
    location = urlparse(source.location).path if source.kind == "url" else source.location
    if not is_zip:
        if not location.lower().endswith(TEXT_SUFFIXES):
            head = raw[:16]
            raise SourceError(
                f"source {source.name!r}: not a ZIP archive (first bytes {head!r}); "
                "expected an Aozora Bunko ZIP (*_ruby_*.zip) or a .txt file"
            )
        return [(None, raw)]
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        infos = archive.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise SourceError(f"source {source.name!r}: corrupt ZIP archive ({exc})") from exc
    for info in infos:
        if not _safe_member_name(info.filename):
            raise SourceError(
                f"source {source.name!r}: unsafe member path {info.filename!r} in the ZIP "
                "(absolute or '..'); refusing the archive"
            )
    texts = [i for i in infos if not i.is_dir() and i.filename.lower().endswith(TEXT_SUFFIXES)]
    if not texts:
        names = ", ".join(i.filename for i in infos[:5]) or "nothing"
        raise SourceError(f"source {source.name!r}: the ZIP has no .txt member (it holds {names})")
    out: list[tuple[str | None, bytes]] = []
    for info in texts:
        if info.file_size > max_bytes:
            raise SourceError(
                f"source {source.name!r}: member {info.filename!r} unpacks to {info.file_size} bytes "
                f"> max_bytes={max_bytes}"
            )
        try:
            with archive.open(info) as fh:
                data = fh.read(max_bytes + 1)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as exc:  # CRC, truncation, bad deflate
            raise SourceError(f"source {source.name!r}: corrupt ZIP member {info.filename!r} ({exc})") from exc
        if len(data) > max_bytes:
            raise SourceError(f"source {source.name!r}: member {info.filename!r} exceeds max_bytes={max_bytes}")
        out.append((info.filename, data))
    return out


def _doc_id(source: Source, member: str | None, n_members: int, taken: set[str]) -> str:
    base = source.stem if member is None or n_members == 1 else f"{source.stem}-{PurePosixPath(member).stem}"
    base = re.sub(r"[^0-9A-Za-z_.-]+", "_", base).strip("._") or "document"
    doc_id, n = base, 2
    while doc_id in taken:
        doc_id, n = f"{base}-{n}", n + 1
    taken.add(doc_id)
    return doc_id


def _cache_path(url: str, raw_cache: Path) -> Path:
    """Where a URL's bytes are cached: named by the URL, content hash recorded beside it."""
    return raw_cache / f"{fingerprint(url)}-{Source('url', url, url).stem}.bin"


def _cached(url: str, raw_cache: Path) -> Path | None:
    """The cached copy of ``url`` if its bytes still match the content hash recorded with them."""
    path = _cache_path(url, raw_cache)
    digest = path.with_suffix(".sha256")
    if path.is_file() and digest.is_file() and digest.read_text().strip() == sha256_file(path):
        return path
    return None


def _forget(url: str, raw_cache: Path) -> None:
    path = _cache_path(url, raw_cache)
    path.unlink(missing_ok=True)
    path.with_suffix(".sha256").unlink(missing_ok=True)


class Fetcher:
    """URL downloads with bounded concurrency overall and per host, per-file retries with
    backoff on transient errors only, and a raw cache so a re-run downloads nothing."""

    def __init__(self, cfg: DownloadConfig, raw_cache: Path) -> None:
        self.cfg, self.raw_cache = cfg, raw_cache
        self._hosts: dict[str, threading.Semaphore] = {}
        self._lock = threading.Lock()
        self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _http(self):
        with self._lock:
            if self._client is None:
                self._client = http_client(self.cfg.timeout_s, self.cfg.concurrency)
            return self._client

    def _host_slot(self, url: str) -> threading.Semaphore:
        host = urlparse(url).netloc.lower()
        with self._lock:
            return self._hosts.setdefault(host, threading.Semaphore(self.cfg.per_host))

    def fetch(self, url: str, *, refresh: bool = False) -> Path:
        if not refresh and (hit := _cached(url, self.raw_cache)) is not None:
            return hit
        dest = _cache_path(url, self.raw_cache)
        for attempt in range(self.cfg.retries + 1):
            try:
                with self._host_slot(url):
                    fetch_url(url, dest, timeout_s=self.cfg.timeout_s, max_bytes=self.cfg.max_bytes, client=self._http())
                break
            except TransientSourceError:
                if attempt == self.cfg.retries:
                    raise
                time.sleep(self.cfg.retry_backoff_s * 2**attempt)
        # No fsync: the hash is checked on every read, so a torn write only means a refetch.
        with atomic_path(dest.with_suffix(".sha256")) as tmp:
            tmp.write_text(sha256_file(dest) + "\n")
        return dest


def load_raw(source: Source, fetcher: Fetcher) -> bytes:
    """The raw bytes of a file source (local, embedded, or a URL through the cache)."""
    if source.kind == "url":
        return fetcher.fetch(source.location).read_bytes()
    try:
        return Path(source.location).read_bytes()
    except OSError as exc:
        raise SourceError(f"source {source.name!r}: cannot read {source.location!r} ({exc.strerror})") from exc


def _catalogue_items(source: Source, cfg: DownloadConfig, fetcher: Fetcher) -> tuple[list[Item], list[dict]]:
    """The works an ``aozora:`` selection names, as items to fetch, and the rows skipped."""
    location = join_base(cfg.aozora_base_url, CATALOGUE_PATH)
    remote = urlparse(location).scheme in ("http", "https")
    if remote:
        path = fetcher.fetch(location, refresh=True)  # the catalogue grows: read it fresh each run
    else:
        path = Path(location)
        if not path.is_file():
            raise SourceError(f"source {source.name!r}: no catalogue at {location!r}; check aozora_base_url")
    try:
        works = select_works(read_catalogue(path.read_bytes(), location), parse_selection(source.location))
    except CatalogueError as exc:
        if remote:
            _forget(location, fetcher.raw_cache)
        raise SourceError(str(exc)) from None
    if not works:
        raise SourceError(
            f"source {source.name!r}: the catalogue at {location} lists no public-domain work for this selection; "
            "check the ids (author ids are 人物ID, work ids 作品ID)"
        )
    items, skipped = [], []
    for work in works:
        meta = (("work_id", work.work_id), ("title", work.title), ("author", work.author), ("teihon", work.teihon))
        where = rebase_url(work.url, cfg.aozora_base_url) if work.url else None
        if where is None:
            reason = "no text file URL" if not work.url else f"external URL {work.url}"
            skipped.append({"source": source.name, "work_id": work.work_id, "title": work.title, "reason": reason})
            continue
        kind = "url" if urlparse(where).scheme in ("http", "https") else "path"
        items.append(Item(Source(kind, where, where), source.name, explicit=False, meta=meta))
    return items, skipped


def plan_items(sources: list[Source], cfg: DownloadConfig, fetcher: Fetcher) -> tuple[list[Item], list[dict]]:
    """Every file the sources stand for, in source order; plus catalogue rows skipped."""
    items: list[Item] = []
    skipped: list[dict] = []
    for source in sources:
        if source.kind == "aozora":
            found, skip = _catalogue_items(source, cfg, fetcher)
            items += found
            skipped += skip
        elif source.kind == "files":
            items += [Item(Source("path", str(p), str(p)), source.name, explicit=False) for p in _files_of(source)]
        else:
            items.append(Item(source, source.name, explicit=True))
    return items, skipped


def _utf8_lines(fh, source: Source) -> Iterator[tuple[int, str]]:
    try:  # decoded a block at a time: the line at fault is not known
        yield from enumerate(fh)
    except UnicodeDecodeError:
        raise SourceError(f"source {source.name!r}: not UTF-8, as JSON Lines must be; convert the file "
                          "(e.g. iconv -f cp932 -t utf-8)") from None


def _read_table(source: Source) -> Iterator[tuple[int, str]]:
    """(row number, text) of a JSON Lines or Parquet corpus, streamed."""
    field = source.text_field or "text"
    path = Path(source.location)
    if source.table_format == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:
            raise SourceError(f"source {source.name!r}: not a readable Parquet file ({exc})") from exc
        if field not in pf.schema_arrow.names:
            raise SourceError(
                f"source {source.name!r}: no column {field!r} (it has {pf.schema_arrow.names}); pass ?field=COLUMN"
            )
        row = 0
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield row, value if isinstance(value, str) else ""
                row += 1
        return
    with open(path, encoding="utf-8") as fh:
        for row, line in _utf8_lines(fh, source):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"source {source.name!r}: line {row + 1} is not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise SourceError(f"source {source.name!r}: line {row + 1} has no field {field!r}; pass ?field=NAME")
            yield row, obj[field] if isinstance(obj[field], str) else ""


def _texts_of(item: Item, raw: bytes, cfg: DownloadConfig) -> list[tuple[str | None, str, str]]:
    """(member, label, decoded text) of each text payload of one file."""
    source = item.source
    texts = []
    for member, data in read_members(raw, source, cfg.max_bytes):
        label = source.name if member is None else f"{source.name}!{member}"
        try:
            texts.append((member, label, decode_text(data, label, cfg.encoding)))
        except TextDecodeError as exc:
            raise SourceError(f"{exc}; pass --encoding to name the file's encoding") from exc
    return texts


class _Corpus:
    """Documents as they are accepted: deduplicated by text, unique ids, written at once."""

    def __init__(self, docs_dir: Path) -> None:
        self.docs_dir = docs_dir
        self.documents: list[Document] = []
        self.skipped: list[dict] = []
        self._seen: dict[str, str] = {}
        self.taken: set[str] = set()

    def add(self, source: Source, member: str | None, n_members: int, label: str, body: str, **fields) -> None:
        if not body.strip():
            self.skipped.append({"source": label, "reason": "no text after cleaning"})
            return
        text_sha = sha256_bytes(body.encode("utf-8"))
        if text_sha in self._seen:
            self.skipped.append({"source": label, "reason": f"same text as {self._seen[text_sha]}"})
            return
        doc_id = fields.pop("doc_id", None) or _doc_id(source, member, n_members, self.taken)
        self._seen[text_sha] = doc_id
        (self.docs_dir / f"{doc_id}.txt").write_text(body + "\n", encoding="utf-8")
        self.documents.append(
            Document(doc_id=doc_id, source=source.name, member=member, text_chars=len(body), text_sha256=text_sha,
                     **fields)
        )


def _add_table(corpus: _Corpus, item: Item) -> None:
    source = item.source
    raw_sha = sha256_file(source.location)
    for row, text in _read_table(source):
        doc_id = _doc_id(source, f"{row:08d}", 2, corpus.taken)
        corpus.add(
            source, None, 1, f"{source.name}#{row}", clean_plain(text), doc_id=doc_id, raw_sha256=raw_sha,
            raw_bytes=len(text.encode("utf-8")), title=None, author=None, provenance=None, origin=item.origin,
        )


def _add_file(corpus: _Corpus, item: Item, raw: bytes, cfg: DownloadConfig) -> None:
    texts = _texts_of(item, raw, cfg)
    meta = dict(item.meta)
    raw_sha = sha256_bytes(raw)
    for member, label, text in texts:
        parsed = clean_aozora(text)
        corpus.add(
            item.source, member, len(texts), label, parsed.body, raw_sha256=raw_sha, raw_bytes=len(raw),
            title=meta.get("title") or parsed.title, author=meta.get("author") or parsed.author,
            provenance=parsed.footer, work_id=meta.get("work_id"), teihon=meta.get("teihon"), origin=item.origin,
        )


def _prefetch(items: list[Item], fetcher: Fetcher, pool: ThreadPoolExecutor) -> list[Future | None]:
    """Start every URL download (bounded by the pool and per-host slots); local files need none."""
    return [pool.submit(fetcher.fetch, i.source.location) if i.source.kind == "url" else None for i in items]


def download_corpus(
    cfg: DownloadConfig, out_dir: Path, raw_cache: Path, progress: Callable[[int, int], None] | None = None
) -> dict:
    """Run stage 1 into ``out_dir`` (``docs/*.txt`` + ``manifest.json``); returns the manifest.

    ``progress(done, total)`` is called as files are read (for progress bars).
    """
    sources = [parse_source(s) for s in cfg.sources]
    keys = [source_key(s, cfg) for s in sources]
    # Runs sharing a work directory (workers of one pool) take turns: one that finds the same
    # download finished by another keeps it, since others may be reading it. Replacing it
    # would move the documents away under a tokenize stage reading them.
    out_dir = Path(out_dir)
    with exclusive(out_dir.parent / f".{out_dir.name}.lock"):
        done = _finished(out_dir, cfg, keys)
        if done is not None:
            return done
        fetcher = Fetcher(cfg, raw_cache)
        try:
            return _download(cfg, sources, keys, fetcher, out_dir, raw_cache, progress)
        finally:
            fetcher.close()


def _finished(out_dir: Path, cfg: DownloadConfig, keys: list) -> dict | None:
    """The manifest of a complete earlier download of the same sources and settings, with no
    failed file and every document in place; else None."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (manifest.get("source_keys") != keys or manifest.get("config") != cfg.fingerprint_fields()
            or manifest.get("failures")):
        return None
    docs = out_dir / "docs"
    if not all((docs / f"{d['doc_id']}.txt").is_file() for d in manifest.get("documents", [])):
        return None
    return manifest


def _download(cfg, sources, keys, fetcher, out_dir, raw_cache, progress) -> dict:
    items, skipped_rows = plan_items(sources, cfg, fetcher)
    failures: list[dict] = []
    with atomic_dir(out_dir) as tmp, ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="melos-fetch") as pool:
        (tmp / "docs").mkdir()
        corpus = _Corpus(tmp / "docs")
        futures = _prefetch(items, fetcher, pool)
        try:
            for n, (item, future) in enumerate(zip(items, futures), 1):
                try:
                    if item.source.kind == "table":
                        _add_table(corpus, item)
                    else:
                        raw = future.result().read_bytes() if future is not None else load_raw(item.source, fetcher)
                        try:
                            _add_file(corpus, item, raw, cfg)
                        except SourceError:
                            # A body that is no usable archive (an error page, a cut transfer) must
                            # not stay in the cache, or every later run would fail on it.
                            if item.source.kind == "url":
                                _forget(item.source.location, raw_cache)
                            raise
                except SourceError as exc:
                    if item.explicit:
                        raise
                    failures.append({"source": item.source.name, "origin": item.origin, **dict(item.meta),
                                     "error": str(exc), "transient": isinstance(exc, TransientSourceError)})
                if progress is not None:
                    progress(n, len(items))
                pause_point("download")
        except BaseException:
            for f in futures:
                if f is not None:
                    f.cancel()
            raise
        selected = sum(not i.explicit for i in items)
        if failures and len(failures) > cfg.max_failed_fraction * selected:
            first = "; ".join(f["error"] for f in failures[:3])
            error = TransientSourceError if all(f["transient"] for f in failures) else SourceError
            raise error(
                f"{len(failures)} of {selected} selected files failed (more than max_failed_fraction="
                f"{cfg.max_failed_fraction:g}): {first}; fix the sources, or raise max_failed_fraction"
            )
        documents, skipped = corpus.documents, corpus.skipped + skipped_rows
        if not documents:
            reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:3])
            more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
            raise SourceError(
                f"the corpus is empty: none of the {len(sources)} source(s) produced any text ({reasons}{more}); "
                "check the sources hold prose"
            )
        manifest = {
            "stage": "download",
            "config": cfg.fingerprint_fields(),
            "source_keys": keys,
            "fingerprint": fingerprint("download-output", [(d.doc_id, d.text_sha256) for d in documents]),
            "counts": {
                "sources": len(sources),
                "files": len(items),
                "documents": len(documents),
                "raw_bytes": sum(d.raw_bytes for d in documents),
                "characters": sum(d.text_chars for d in documents),
                "skipped": len(skipped),
                "skipped_no_url": sum(s["reason"] == "no text file URL" for s in skipped_rows),
                "skipped_external_url": sum(s["reason"].startswith("external URL") for s in skipped_rows),
                "failed": len(failures),
            },
            "documents": [asdict(d) for d in documents],
            "skipped": skipped,
            "failures": failures,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def download_key(cfg: DownloadConfig) -> str:
    """Sources' content identities + settings -> the stage's key (and output directory)."""
    return fingerprint("download", [source_key(parse_source(s), cfg) for s in cfg.sources], cfg.fingerprint_fields())
