"""Content-addressed adapter blobs on disk: atomic writes, sha256 verification, deletion."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
TMP_DIR = "tmp"


class BlobError(Exception):
    """A blob cannot be handed out; names the sha so the caller can name the model."""

    def __init__(self, message: str, *, sha256: str) -> None:
        super().__init__(message)
        self.sha256 = sha256


class BlobMissing(BlobError):
    """No blob directory for this sha256."""


class BlobCorrupt(BlobError):
    """The blob's files no longer hash to its sha256."""


@dataclass(frozen=True)
class Blob:
    sha256: str
    size_bytes: int
    path: Path


class _DirHasher:
    """sha256 over a folder's files: per file, name + NUL + size + NUL + bytes.

    The size keeps file boundaries unambiguous (two folders must not hash alike by moving
    bytes from one file's tail to the next file's name).
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size_bytes = 0

    def start_file(self, name: str, size: int) -> None:
        self._h.update(name.encode() + b"\0" + str(size).encode() + b"\0")

    def update(self, chunk: bytes) -> None:
        self._h.update(chunk)
        self.size_bytes += len(chunk)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _regular_files(src: Path, names: Iterable[str] | None) -> list[Path]:
    """The top-level regular files of `src` (symlinks are never followed), by name."""
    if names is None:
        files = [p for p in src.iterdir() if p.is_file() and not p.is_symlink()]
    else:
        files = [src / n for n in names]
        for p in files:
            if p.is_symlink() or not p.is_file():
                raise FileNotFoundError(f"{p} is not a regular file")
    return sorted(files, key=lambda p: p.name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_dir(path: Path) -> tuple[str, int]:
    """(sha256, total bytes) of the regular files directly in `path`."""
    hasher = _DirHasher()
    for file in _regular_files(path, None):
        hasher.start_file(file.name, file.stat().st_size)
        with file.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                hasher.update(chunk)
    return hasher.hexdigest(), hasher.size_bytes


class BlobStore:
    """Adapter folders stored once per content under `root/<sha[:2]>/<sha>/`.

    Blobs are written into `root/tmp/` and renamed into place, so a reader never sees a
    half-written blob. Verified shas are cached in memory so hot paths do not rehash.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._verified: set[str] = set()
        self._lock = threading.Lock()

    def dir_for(self, sha256: str) -> Path:
        """Where a blob lives (existing or not)."""
        if not SHA256_RE.match(sha256):
            raise BlobMissing(f"not a sha256: {sha256!r}", sha256=sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.dir_for(sha256).is_dir()

    def put_dir(self, src: Path, *, names: Iterable[str] | None = None) -> Blob:
        """Store the regular files of `src` (or only `names`); idempotent per content.

        Args:
            src: a flat folder (subfolders and symlinks are ignored unless named).
            names: the file names to store; default: every regular file.

        Returns:
            The stored blob; an existing, intact blob with the same content is reused.
        """
        tmp = self.root / TMP_DIR / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            sha, size = self._copy_hashed(src, tmp, names)
            final = self.dir_for(sha)
            self._install(tmp, final, sha)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with self._lock:
            self._verified.add(sha)
        logger.info("stored blob %s (%d bytes) from %s", sha, size, src, extra={"blob": sha})
        return Blob(sha256=sha, size_bytes=size, path=final)

    def _copy_hashed(self, src: Path, dst: Path, names: Iterable[str] | None) -> tuple[str, int]:
        # Hash the bytes as they are copied, so the sha names exactly what was stored.
        hasher = _DirHasher()
        for file in _regular_files(src, names):
            hasher.start_file(file.name, file.stat().st_size)
            with file.open("rb") as fin, (dst / file.name).open("xb") as fout:
                while chunk := fin.read(CHUNK):
                    hasher.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
        _fsync_dir(dst)
        return hasher.hexdigest(), hasher.size_bytes

    def _install(self, tmp: Path, final: Path, sha: str) -> None:
        if final.is_dir():
            if sha in self._verified or self._rehash(final) == sha:
                return  # same content already stored: reuse it
            logger.warning("replacing corrupt blob %s", sha, extra={"blob": sha})
            self._discard(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another writer installed the same content first; theirs is as good as ours.
            return
        _fsync_dir(final.parent)

    def _discard(self, path: Path) -> None:
        trash = self.root / TMP_DIR / f"trash-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _rehash(path: Path) -> str:
        return hash_dir(path)[0]

    def verify(self, sha256: str, *, force: bool = False) -> Path:
        """The blob's folder after checking it exists and (once, or again with `force`) its hash.

        Raises:
            BlobMissing: no blob with this sha256.
            BlobCorrupt: the files on disk no longer hash to `sha256`.
        """
        path = self.dir_for(sha256)
        if not path.is_dir():
            with self._lock:
                self._verified.discard(sha256)
            raise BlobMissing(f"adapter blob {sha256} is missing", sha256=sha256)
        if not force and sha256 in self._verified:
            return path
        actual = self._rehash(path)
        if actual != sha256:
            with self._lock:
                self._verified.discard(sha256)
            logger.error(
                "blob %s is corrupt (hashes to %s)", sha256, actual, extra={"blob": sha256}
            )
            raise BlobCorrupt(f"adapter blob {sha256} is corrupt", sha256=sha256)
        with self._lock:
            self._verified.add(sha256)
        return path

    def path_for(self, sha256: str) -> Path:
        """The verified folder of a blob (hashed on first use, then trusted from memory)."""
        return self.verify(sha256, force=False)

    def delete(self, sha256: str) -> bool:
        """Remove a blob (the caller checks no version references it); False if absent."""
        path = self.dir_for(sha256)
        with self._lock:
            self._verified.discard(sha256)
        if not path.is_dir():
            return False
        self._discard(path)
        logger.info("deleted blob %s", sha256, extra={"blob": sha256})
        return True

    def cleanup_tmp(self, *, older_than_s: float = 3600.0) -> int:
        """Remove temp folders left by killed writers; returns how many were removed."""
        tmp_root = self.root / TMP_DIR
        if not tmp_root.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in tmp_root.iterdir():
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
