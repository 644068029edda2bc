"""Atomic file writes, content hashing and fingerprints shared by every stage.

A stage never leaves a file that looks finished after a crash: everything is written
under a temporary name in the target directory and renamed into place (rename is
atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A short, stable hash of JSON-able parts (configs, upstream fingerprints, versions)."""
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()[:length]


def _umask() -> int:
    """The process's umask (Linux: read, not set; elsewhere set and put back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: Path, directory: bool = False) -> None:
    """What ``open()`` / ``mkdir()`` would have given: temporary files and directories are made
    owner-only (0600/0700), which would leave exported models unreadable to anyone else."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            usual_mode(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], keep_existing: str | None = None) -> Iterator[Path]:
    """Build a whole directory under a temporary name, then swap it into place.

    Readers see either the previous complete directory or the new complete one, never a
    half-written one. The previous directory, if any, is removed only after the new one
    is complete.

    ``keep_existing`` names the file that describes a finished directory (its manifest).
    If the directory in place has the same description as ours, another run produced the
    same output meanwhile: it is kept and ours dropped, since a run may already be reading
    it and must never see it moved away. A different one is replaced as usual.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    usual_mode(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing is not None and _same_file(target / keep_existing, tmp / keep_existing):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    _swap_in(tmp, target)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except FileNotFoundError:
        return False


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``, moving a complete earlier ``target`` aside first.

    Producers racing for the same target (two runs making the same stage) each retry until
    their rename lands: the last one wins whole, and no mix of the two is ever visible.
    A rename onto a non-empty directory fails (ENOTEMPTY/EEXIST), which is the signal that
    another producer got there first.
    """
    while True:
        try:
            os.replace(tmp, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        # a unique empty directory to rename the old target onto (rename onto an empty dir is allowed)
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        try:
            os.replace(target, old)
        except FileNotFoundError:  # another producer moved it aside already
            old.rmdir()
            continue
        except OSError:
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str], *, remove: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` for the block, waiting for it; with
    ``remove`` the file is removed at the end of the block (while still held).

    Processes making the same output take turns with it. A waiter woken on a file that was
    removed meanwhile starts over on the new one, so two processes never hold it at once. The
    kernel drops the lock of a killed holder; its file stays and is simply taken next time.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(target, "a+b")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                held = os.fstat(fh.fileno()).st_ino == os.stat(target).st_ino
            except FileNotFoundError:
                held = False
        except BaseException:
            fh.close()
            raise
        if held:
            break
        fh.close()
    try:
        yield
    finally:
        if remove:
            target.unlink(missing_ok=True)
        fh.close()
