"""What every dataset source yields: `Example` (one usable image + caption) or `Skipped` (why not).

An Example does not hold a decoded image. It holds a small, picklable *reference* to the image bytes
(a file path, a byte range inside a tar shard, or the bytes themselves when nothing else exists),
so that a list of Examples is cheap to keep and can be sent to decoding worker processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path


def image_digest(data: bytes) -> str:
    """SHA-256 (hex) of encoded image bytes: what duplicates and cache keys are judged by."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FileBytes:
    """Image bytes stored in a file on disk."""

    path: str

    def read(self) -> bytes:
        """Return the whole file."""
        return Path(self.path).read_bytes()


@dataclass(frozen=True)
class TarMemberBytes:
    """Image bytes stored uncompressed inside a tar shard, at a known byte range."""

    tar_path: str
    offset: int  # where the member's data starts in the tar file (TarInfo.offset_data)
    size: int

    def read(self) -> bytes:
        """Seek to the member's data and read it; no extraction, no scan of the archive."""
        with open(self.tar_path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.tar_path}: expected {self.size} bytes at offset {self.offset}, got {len(data)}")
        return data


@dataclass(frozen=True)
class InlineBytes:
    """Image bytes held in memory (Hugging Face rows, compressed tar shards): nothing to point at."""

    data: bytes = field(repr=False)  # repr=False: printing an Example must not dump megabytes

    def read(self) -> bytes:
        """Return the stored bytes."""
        return self.data


ImageBytes = FileBytes | TarMemberBytes | InlineBytes


@dataclass(frozen=True)
class Example:
    """One image + caption pair, as found in the dataset (caption not yet processed)."""

    key: str  # stable and unique within the dataset, e.g. "cats/001.jpg" or "shard-0.tar/000017"
    caption: str  # raw caption text; see captions.process_caption for what training sees
    origin: str  # where a human finds it, for messages: a file path, "metadata.jsonl:12", ...
    image: ImageBytes
    # image_digest of the bytes, once someone has read them (iter_source does, to find duplicates),
    # so that later stages need not read and hash every image again.
    digest: str | None = field(default=None, compare=False)

    def read_bytes(self) -> bytes:
        """Return the encoded image bytes (JPEG, PNG, ...), undecoded."""
        return self.image.read()


@dataclass
class Skipped:
    """A sample that could not be used, and why; reported instead of silently dropped."""

    origin: str
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"
