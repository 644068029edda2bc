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

import io
import posixpath
import re
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from .aozora import TextDecodeError, clean_aozora, decode_text
from .config import EMBEDDED_SOURCE, DownloadConfig
from .io import atomic_dir, atomic_path, atomic_write_json, fingerprint, sha256_bytes, sha256_file

EMBEDDED_ZIP = Path(__file__).parent / "corpus" / "1567_ruby_4948.zip"
TEXT_SUFFIXES = (".txt",)
_USER_AGENT = "melos-corpus-download/0.1 (+https://github.com/melos)"


class SourceError(ValueError):
    """A source that cannot become documents; the message names the source and the fix."""


class TransientSourceError(SourceError):
    """A network failure (timeout, connection reset, HTTP 5xx/429) that a retry may fix."""


@dataclass(frozen=True)
class Source:
    kind: str  # "embedded" | "path" | "url"
    location: str  # path or URL
    name: str  # what users wrote, used in messages

    @property
    def stem(self) -> str:
        base = posixpath.basename(urlparse(self.location).path) if self.kind == "url" else Path(self.location).name
        return Path(unquote(base)).stem or "document"


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


def parse_source(spec: str) -> Source:
    spec = spec.strip()
    if spec == EMBEDDED_SOURCE:
        return Source("embedded", str(EMBEDDED_ZIP), spec)
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
        raise SourceError(f"source {spec!r}: unsupported URL scheme {scheme!r}; use http(s), a local path or 'embedded'")
    return Source("path", str(Path(spec).expanduser()), spec)


def source_key(source: Source) -> str:
    """What identifies a source's content without downloading it (for cache keys).

    Local files are hashed (cheap, and an edited file must not hit the cache); a URL is
    identified by itself, as Aozora publishes a revised text under a new file name.
    """
    if source.kind == "url":
        return source.location
    path = Path(source.location)
    if not path.is_file():
        raise SourceError(f"source {source.name!r}: no such file {str(path)!r}")
    return f"sha256:{sha256_file(path)}"


def fetch_url(url: str, dest: Path, *, timeout_s: float, max_bytes: int) -> None:
    """Stream ``url`` into ``dest`` atomically, enforcing a timeout and a size limit."""
    import httpx  # imported here: only URL sources need it

    try:
        with httpx.Client(
            timeout=httpx.Timeout(timeout_s), follow_redirects=True, headers={"User-Agent": _USER_AGENT}
        ) as client, client.stream("GET", url) as response:
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
    except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise TransientSourceError(f"source {url!r}: network error: {exc}") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # bad URL, redirect loop, ...: a retry cannot help
        raise SourceError(f"source {url!r}: {type(exc).__name__}: {exc}") from exc


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


def _cache_path(source: Source, raw_cache: Path) -> Path:
    return raw_cache / f"{fingerprint(source.location)}-{source.stem}.bin"


def load_raw(source: Source, cfg: DownloadConfig, raw_cache: Path) -> bytes:
    """The raw bytes of a source; URLs are fetched once into ``raw_cache`` (so a retry
    of the stage only refetches what failed)."""
    if source.kind != "url":
        try:
            return Path(source.location).read_bytes()
        except OSError as exc:
            raise SourceError(f"source {source.name!r}: cannot read {source.location!r} ({exc.strerror})") from exc
    cached = _cache_path(source, raw_cache)
    if not cached.exists():
        fetch_url(source.location, cached, timeout_s=cfg.timeout_s, max_bytes=cfg.max_bytes)
    return cached.read_bytes()


def download_corpus(cfg: DownloadConfig, out_dir: Path, raw_cache: Path) -> dict:
    """Run stage 1 into ``out_dir`` (``docs/*.txt`` + ``manifest.json``); returns the manifest."""
    sources = [parse_source(s) for s in cfg.sources]
    keys = [source_key(s) for s in sources]
    documents: list[Document] = []
    seen_text: dict[str, str] = {}
    taken: set[str] = set()
    skipped: list[dict] = []
    with atomic_dir(out_dir) as tmp:
        (tmp / "docs").mkdir()
        for source in sources:
            raw = load_raw(source, cfg, raw_cache)
            raw_sha = sha256_bytes(raw)
            try:
                members = read_members(raw, source, cfg.max_bytes)
                texts = []
                for member, data in members:
                    label = source.name if member is None else f"{source.name}!{member}"
                    try:
                        texts.append((member, label, decode_text(data, label, cfg.encoding)))
                    except TextDecodeError as exc:
                        raise SourceError(f"{exc}; pass --encoding to name the file's encoding") from exc
            except SourceError:
                # A body that is no usable archive (an error page, a cut transfer) must not
                # stay in the cache, or every later run would fail on it without refetching.
                if source.kind == "url":
                    _cache_path(source, raw_cache).unlink(missing_ok=True)
                raise
            for member, label, text in texts:
                parsed = clean_aozora(text)
                body = parsed.body
                if not body.strip():
                    skipped.append({"source": label, "reason": "no text after cleaning"})
                    continue
                text_sha = sha256_bytes(body.encode("utf-8"))
                if text_sha in seen_text:
                    skipped.append({"source": label, "reason": f"same text as {seen_text[text_sha]}"})
                    continue
                doc_id = _doc_id(source, member, len(members), taken)
                seen_text[text_sha] = doc_id
                (tmp / "docs" / f"{doc_id}.txt").write_text(body + "\n", encoding="utf-8")
                documents.append(
                    Document(
                        doc_id=doc_id,
                        source=source.name,
                        member=member,
                        raw_sha256=raw_sha,
                        raw_bytes=len(raw),
                        text_chars=len(body),
                        text_sha256=text_sha,
                        title=parsed.title,
                        author=parsed.author,
                        provenance=parsed.footer,
                    )
                )
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
                "documents": len(documents),
                "raw_bytes": sum(d.raw_bytes for d in documents),
                "characters": sum(d.text_chars for d in documents),
                "skipped": len(skipped),
            },
            "documents": [asdict(d) for d in documents],
            "skipped": skipped,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def download_key(cfg: DownloadConfig) -> str:
    """Sources' content identities + settings -> the stage's key (and output directory)."""
    return fingerprint("download", [source_key(parse_source(s)) for s in cfg.sources], cfg.fingerprint_fields())
