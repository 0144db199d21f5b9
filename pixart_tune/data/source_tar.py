"""The `webdataset` source: tar shards of <base>.<ext> members, streamed, never extracted."""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Iterator
from pathlib import Path

from .examples import Example, InlineBytes, Skipped, TarMemberBytes
from .sources import (
    LAYOUTS,
    DataError,
    _decode_caption,
    _is_image_name,
    _is_tar_name,
    _Problem,
)


def read_webdataset(path: str) -> Iterator[Example | Skipped]:
    """Samples from every shard in order; each shard is streamed, never extracted."""
    for shard in _shard_paths(path):
        try:
            for base, members in _grouped_members(shard):
                yield _tar_sample(shard, base, members)
        except (tarfile.TarError, OSError) as e:
            yield Skipped(str(shard), f"unreadable tar shard ({e}); the rest of this shard is skipped")


def _shard_paths(path: str) -> list[Path]:
    """The shards named by a .tar path, a folder of shards, or a glob such as 'shards/*.tar'."""
    p = Path(path)
    if "{" in path and not p.exists():
        raise DataError(path, "brace patterns such as {000..009} are not supported", hint="Use a glob or a folder.")
    if p.is_dir():
        shards = sorted(f for f in p.iterdir() if f.is_file() and _is_tar_name(f.name))
    elif p.exists():
        shards = [p]
    else:
        shards = sorted(Path(m) for m in glob.glob(path) if _is_tar_name(m))
    if not shards:
        raise FileNotFoundError(f"no .tar shards found at {path}\n{LAYOUTS}")
    return shards


def _grouped_members(shard: Path) -> Iterator[tuple[str, dict[str, object]]]:
    """(base, {ext: payload}) per sample; WebDataset keeps a sample's members next to each other."""
    compressed = _is_compressed(shard)
    # Plain tars are opened seekable so image members can be referenced by byte range; compressed
    # ones can only be streamed, so their image bytes are read into memory as we pass them.
    with tarfile.open(shard, "r|*" if compressed else "r:") as tar:
        base, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            member_base, ext = _split_member_name(member.name)
            if member_base is None:
                continue
            if member_base != base and members:
                yield base, members
                members = {}
            base = member_base
            members[ext.lower()] = _member_payload(tar, member, shard, ext, compressed)
        if members:
            yield base, members


def _split_member_name(name: str) -> tuple[str | None, str]:
    """WebDataset rule: the base runs up to the first dot of the file name ('a/b.seg.png' -> 'a/b', 'seg.png')."""
    folder, _, filename = name.rpartition("/")
    if filename.startswith(".") or "." not in filename:
        return None, ""  # hidden files (e.g. macOS '._x') and extension-less members carry no sample
    stem, _, ext = filename.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _member_payload(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: Path, ext: str, compressed: bool):
    """Caption bytes for .txt, an ImageBytes for images, None for members we do not use."""
    if ext.lower() == "txt":
        return tar.extractfile(member).read()
    if _is_image_name("." + ext):
        if compressed:
            return InlineBytes(tar.extractfile(member).read())
        return TarMemberBytes(str(shard), member.offset_data, member.size)
    return None


def _is_compressed(path: Path) -> bool:
    """True for gzip, bzip2 or xz data, whatever the file is called."""
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def _tar_sample(shard: Path, base: str, members: dict[str, object]) -> Example | Skipped:
    """Turn one member group into an Example, or say what is missing."""
    origin = f"{shard}:{base}"
    images = [ext for ext in members if _is_image_name("." + ext)]
    if len(images) != 1:
        found = ", ".join(f"{base}.{ext}" for ext in members)
        what = "no image member of an accepted type" if not images else "several image members for one sample"
        return Skipped(origin, f"{what} (found: {found})")
    if "txt" not in members:
        return Skipped(origin, f"no caption member {base}.txt")
    try:
        caption = _decode_caption(members["txt"], f"caption member {base}.txt")
    except _Problem as p:
        return Skipped(origin, p.reason)
    return Example(key=f"{shard.name}/{base}", caption=caption, origin=origin, image=members[images[0]])
