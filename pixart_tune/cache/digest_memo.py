"""Remembered image digests, so a re-run does not read and hash every image again.

Every run looks up each image's SHA-256 (duplicates and cache keys are judged by it). For a large
dataset that means reading all of it at start-up: 100k photos of 1.5 MB are 150 GB. The memo maps a
file's identity as the filesystem reports it -- path, size, inode, modification and status-change
times in ns -- to the digest found last time, and a file whose identity changed is read and hashed
again (git's rule). The status-change time is set by the kernel on every write and cannot be set
back by tools that restore modification times, so rewritten content always shows. Tar members are
keyed by their shard's identity and byte range. Bytes held in memory (Hugging Face rows) have no
such identity and are always hashed.

The memo lives in the feature cache's folder (`digests.json`), is written atomically, and a missing
or unreadable one is simply rebuilt. A stale entry cannot poison the cache: images still to be
encoded are hashed again when decoded, and a mismatch rejects the image with a message.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data.examples import FileBytes, ImageBytes, TarMemberBytes
from .store import read_json, write_json

MEMO_NAME = "digests.json"
_VERSION = 1


def _identity(path: str) -> str | None:
    """'size:inode:mtime_ns:ctime_ns' of a file, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class DigestMemo:
    """{identity key: sha256 hex}, loaded from and saved to `folder / digests.json`."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / MEMO_NAME
        self.entries: dict[str, str] = {}
        self.changed = False
        self.hits = 0
        raw = read_json(self.path)  # None: no memo yet, or an unreadable one (rewritten on save())
        if raw is not None and raw.get("version") == _VERSION and isinstance(raw.get("digests"), dict):
            self.entries = {str(k): str(v) for k, v in raw["digests"].items()}

    @staticmethod
    def key(image: ImageBytes) -> str | None:
        """The identity of the bytes `image` points at, or None where there is none to trust."""
        if isinstance(image, FileBytes):
            ident = _identity(image.path)
            return None if ident is None else f"file:{os.path.abspath(image.path)}:{ident}"
        if isinstance(image, TarMemberBytes):
            ident = _identity(image.tar_path)
            return None if ident is None else f"tar:{os.path.abspath(image.tar_path)}:{ident}:{image.offset}:{image.size}"
        return None

    def lookup(self, image: ImageBytes) -> tuple[str | None, str | None]:
        """(digest or None, key): the remembered digest where the identity is unchanged."""
        key = self.key(image)
        digest = None if key is None else self.entries.get(key)
        self.hits += digest is not None
        return digest, key

    def record(self, key: str | None, digest: str) -> None:
        if key is not None and self.entries.get(key) != digest:
            self.entries[key] = digest
            self.changed = True

    def save(self) -> None:
        """Write the memo if anything was added (temporary file + rename: never half written)."""
        if not self.changed:
            return
        write_json(self.path, {"version": _VERSION, "digests": self.entries})
        self.changed = False
