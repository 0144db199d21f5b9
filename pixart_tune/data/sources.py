"""Dataset sources: read a folder, metadata file, Hugging Face dataset or tar shards into Examples.

Every source yields the same thing: `Example` for each usable image + caption pair, `Skipped` (with a
reason) for each one that is not. Sources check the *layout* (caption present, path inside the
dataset, no duplicates); the image *contents* are checked later by `images.load_image`.

    for item in iter_source("data/sample"):
        ...  # Example(key="astronaut.jpg", caption="...", ...) or Skipped(origin, reason)
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from pixart_tune.data.examples import Example, FileBytes, Skipped, image_digest

if TYPE_CHECKING:  # the memo lives with the feature cache, which imports this module
    from pixart_tune.cache.digest_memo import DigestMemo

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CACHE_DIR_NAME = ".pixart_tune_cache"  # the feature cache lives inside the dataset folder by default
# Files that sit next to images but are clearly not samples; anything else unknown is reported.
NOT_DATA_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".csv", ".yaml", ".yml", ".toml", ".html", ".pdf")
NOT_DATA_NAMES = ("LICENSE", "README", "Thumbs.db", "desktop.ini")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
HF_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SOURCES = ("auto", "folder", "metadata", "hf", "webdataset")

LAYOUTS = """accepted dataset layouts:
  - folder: images (jpg, jpeg, png, webp, bmp, tif, tiff, gif) with same-name .txt captions, subfolders allowed
  - metadata: metadata.jsonl or metadata.csv with a file_name and a text (or caption) column, beside the images
  - hf: a datasets save_to_disk folder, .parquet file(s), or a Hub dataset id (with source=hf)
  - webdataset: .tar shards holding <name>.jpg + <name>.txt pairs (one shard, a folder of shards, or a glob)"""

SKIP_HINT = "Fix or remove this sample, or set data.on_error=skip to skip bad samples (they are listed)."


class DataError(ValueError):
    """A sample or a whole dataset cannot be used; the message says where, why and what to do."""

    def __init__(self, origin: str, reason: str, hint: str = SKIP_HINT):
        self.origin = origin
        self.reason = reason
        super().__init__(f"{origin}: {reason}\n{hint}")


class _Problem(Exception):
    """Internal: why one sample is unusable; readers turn it into a Skipped."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def iter_source(
    path: str | os.PathLike,
    source: str = "auto",
    *,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    on_error: str = "skip",
    digest_memo: DigestMemo | None = None,
) -> Iterator[Example | Skipped]:
    """Yield an Example or a Skipped for every sample found at `path`, in a deterministic order.

    `digest_memo` (cache/digest_memo.py): digests remembered from earlier runs, used where a file's
    identity is unchanged instead of reading and hashing it; new ones are recorded into it."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if on_error not in ("skip", "error"):
        raise ValueError(f"on_error must be 'skip' or 'error', not {on_error!r}")
    text = os.fspath(path)
    # Layout problems (missing path, unknown layout) are raised here, at call time, not at first next().
    kind = detect_source(text) if source == "auto" else source
    if kind in ("folder", "metadata") and not Path(text).is_dir():
        raise _not_found("dataset folder", text)
    return _checked(text, kind, _reader(text, kind, image_column, caption_column, split), on_error, digest_memo)


def _reader(text: str, kind: str, image_column: str, caption_column: str, split: str):
    """The raw reader for one layout."""
    if kind == "folder":
        return _read_folder(Path(text))
    if kind == "metadata":
        return _read_metadata(Path(text), caption_column)
    if kind == "hf":
        from .source_hf import read_hf

        return read_hf(text, image_column, caption_column, split)
    from .source_tar import read_webdataset

    return read_webdataset(text)


def _checked(text: str, kind: str, items: Iterable[Example | Skipped], on_error: str,
             memo: DigestMemo | None = None) -> Iterator[Example | Skipped]:  # fmt: skip
    """Drop repeats, apply the on_error policy, and refuse a dataset where nothing was found."""
    found = 0
    for item in _drop_repeats(items, memo):
        found += 1
        if isinstance(item, Skipped) and on_error == "error":
            raise DataError(item.origin, item.reason)
        yield item
    if found == 0:
        raise DataError(text, f"no samples found (read as '{kind}')", hint=LAYOUTS)


def _not_found(what: str, text: str, tail: str = "") -> FileNotFoundError:
    # A recipe's relative data.path is read from where the command runs, not from the recipe's folder.
    where = "" if Path(text).is_absolute() else f" (a relative path: read from the current directory, {Path.cwd()})"
    return FileNotFoundError(f"{what} not found: {text}{where}; set data.path to the dataset's folder, file or glob\n"
                             f"{LAYOUTS}{tail}")  # fmt: skip


def detect_source(path: str | os.PathLike) -> str:
    """Guess the layout at `path`: 'metadata', 'webdataset', 'hf' or 'folder' (see LAYOUTS)."""
    text = os.fspath(path)
    p = Path(text)
    if not p.exists():
        if _has_glob(text) and glob.glob(text):
            return "webdataset"
        raise _not_found("dataset path", text, "\nFor a Hugging Face Hub dataset id, set data.source=hf.")
    if p.is_file():
        if _is_tar_name(p.name):
            return "webdataset"
        if p.suffix.lower() == ".parquet":
            return "hf"
        raise DataError(text, "this single file is neither a .tar shard nor a .parquet file", hint=LAYOUTS)
    if any((p / name).is_file() for name in METADATA_FILES):
        return "metadata"
    if any((p / name).is_file() for name in HF_SAVED_MARKERS):
        return "hf"
    data_files = [f for f in p.iterdir() if f.is_file() and not _is_obviously_not_data(f)]
    if data_files and all(_is_tar_name(f.name) for f in data_files):
        return "webdataset"
    if data_files and all(f.suffix.lower() == ".parquet" for f in data_files):
        return "hf"
    return "folder"


def _drop_repeats(items: Iterable[Example | Skipped], memo: DigestMemo | None = None) -> Iterator[Example | Skipped]:
    """Skip exact duplicates (same image bytes AND same caption) and reused keys."""
    # This reads every image once to hash it (unless the memo remembers its digest); the digests are
    # all that is kept, and each Example carries its own, so the cache does not read and hash it again.
    first_key_of: dict[tuple[str, str], str] = {}  # (image digest, caption) -> key of its first occurrence
    origin_of_key: dict[str, str] = {}
    for item in items:
        if isinstance(item, Skipped):
            yield item
            continue
        digest, memo_key = memo.lookup(item.image) if memo is not None else (None, None)
        if digest is None:
            try:
                data = item.read_bytes()
            except OSError as e:
                yield Skipped(item.origin, f"cannot read the image: {e}")
                continue
            digest = image_digest(data)
            if memo is not None:
                memo.record(memo_key, digest)
        content = (digest, item.caption)
        if content in first_key_of:
            yield Skipped(item.origin, f"duplicate of {first_key_of[content]} (same image bytes and caption)")
        elif item.key in origin_of_key:
            yield Skipped(item.origin, f"key {item.key!r} already used by {origin_of_key[item.key]}")
        else:
            first_key_of[content] = item.key
            origin_of_key[item.key] = item.origin
            yield dataclasses.replace(item, digest=digest)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _is_obviously_not_data(path: Path) -> bool:
    """Hidden files, notes, licences and OS junk: ignored without a Skipped entry."""
    name = path.name
    return name.startswith(".") or name.lower().endswith(NOT_DATA_SUFFIXES) or name in NOT_DATA_NAMES


def _decode_caption(data: bytes, what: str) -> str:
    """Decode caption bytes as UTF-8 (a leading BOM is dropped) and strip surrounding whitespace."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Problem(f"{what} is not UTF-8 text (bad byte at position {e.start}); re-save it as UTF-8") from None
    return _checked_caption(text, what)


def _checked_caption(value: object, what: str) -> str:
    """A caption must be non-empty text."""
    if not isinstance(value, str):
        raise _Problem(f"{what} is {type(value).__name__}, not text")
    if not value.strip():
        raise _Problem(f"{what} is empty")
    return value.strip()


# ---------------------------------------------------------------------------------------------
# folder: image files with same-stem .txt captions
# ---------------------------------------------------------------------------------------------


def _read_folder(root: Path) -> Iterator[Example | Skipped]:
    """Images anywhere under `root`, each captioned by the .txt file of the same stem beside it."""
    for file in _walk_files(root):
        if file.name.startswith("."):
            continue  # hidden files, e.g. macOS '._photo.jpg' resource forks, are never samples
        if _is_image_name(file.name):
            yield _folder_example(root, file)
        elif not _is_obviously_not_data(file):
            yield Skipped(
                str(file),
                f"not an image type ({file.suffix or 'no extension'}); accepted: {', '.join(IMAGE_EXTENSIONS)}",
            )


def _walk_files(root: Path) -> list[Path]:
    """All files under root, hidden folders (and so the cache folder) excluded, sorted by POSIX path."""
    files = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != CACHE_DIR_NAME]
        files.extend(Path(folder) / name for name in filenames)
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _folder_example(root: Path, image: Path) -> Example | Skipped:
    """Pair one image with its caption file, or say why not."""
    caption_file = image.with_suffix(".txt")
    if not caption_file.is_file():
        return Skipped(str(image), f"no caption file {caption_file.name} beside the image")
    try:
        caption = _decode_caption(caption_file.read_bytes(), f"caption file {caption_file.name}")
    except _Problem as p:
        return Skipped(str(image), p.reason)
    key = image.relative_to(root).as_posix()
    return Example(key=key, caption=caption, origin=str(image), image=FileBytes(str(image)))


# ---------------------------------------------------------------------------------------------
# metadata: Hugging Face imagefolder convention (metadata.jsonl / metadata.csv + file_name column)
# ---------------------------------------------------------------------------------------------


def _read_metadata(root: Path, caption_column: str) -> Iterator[Example | Skipped]:
    """One sample per metadata row; file_name is a path relative to the metadata file's folder."""
    meta = _metadata_file(root)
    rows = _jsonl_rows(meta) if meta.suffix == ".jsonl" else _csv_rows(meta, caption_column)
    for line_no, row in rows:
        origin = f"{meta}:{line_no}"
        try:
            if isinstance(row, _Problem):
                raise row
            file_name = row.get("file_name")
            if not isinstance(file_name, str) or not file_name.strip():
                raise _Problem("no file_name in this row")
            origin = f"{origin} ({file_name})"
            key, image = _inside_root(root, file_name)
            caption = _checked_caption(_caption_value(row, caption_column), f"caption ({caption_column})")
        except _Problem as p:
            yield Skipped(origin, p.reason)
            continue
        yield Example(key=key, caption=caption, origin=origin, image=FileBytes(str(image)))


def _metadata_file(root: Path) -> Path:
    """The one metadata file at the dataset root."""
    present = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if not present:
        raise DataError(str(root), "no metadata.jsonl or metadata.csv here", hint=LAYOUTS)
    if len(present) > 1:
        raise DataError(str(root), "both metadata.jsonl and metadata.csv exist", hint="Keep only one of them.")
    return present[0]


def _jsonl_rows(meta: Path) -> Iterator[tuple[int, dict | _Problem]]:
    """(line number, parsed object or problem) for every non-blank line."""
    text = _read_metadata_text(meta)
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, _Problem(f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        yield line_no, row if isinstance(row, dict) else _Problem("line is not a JSON object")


def _csv_rows(meta: Path, caption_column: str) -> Iterator[tuple[int, dict]]:
    """(line number, row dict) for every CSV row; a header without the needed columns is an error."""
    reader = csv.DictReader(io.StringIO(_read_metadata_text(meta), newline=""))
    header = reader.fieldnames or []
    if "file_name" not in header:
        raise DataError(str(meta), f"no file_name column (columns: {header})", hint=LAYOUTS)
    if caption_column not in header and not (caption_column == "text" and "caption" in header):
        raise DataError(
            str(meta),
            f"no {caption_column!r} caption column (columns: {header})",
            hint="Set data.caption_column to the column that holds the captions.",
        )
    for row in reader:
        yield reader.line_num, row


def _read_metadata_text(meta: Path) -> str:
    """The whole metadata file as text; it must be UTF-8."""
    try:
        return meta.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(str(meta), f"not UTF-8 text (bad byte at position {e.start})", hint="Re-save it as UTF-8.") from None


def _caption_value(row: dict, caption_column: str) -> object:
    """The caption field; 'caption' is accepted when the default 'text' column is absent."""
    if caption_column in row:
        return row[caption_column]
    if caption_column == "text" and "caption" in row:
        return row["caption"]
    also = " (nor 'caption')" if caption_column == "text" else ""
    raise _Problem(f"no {caption_column!r} field{also}; set data.caption_column to the caption field")


def _inside_root(root: Path, file_name: str) -> tuple[str, Path]:
    """(key, path) for a file_name that stays inside root; metadata must not reach other files."""
    if PurePosixPath(file_name).is_absolute() or PureWindowsPath(file_name).is_absolute():
        raise _Problem("file_name is an absolute path; it must be relative to the dataset folder")
    relative = PurePosixPath(file_name.replace("\\", "/"))
    if ".." in relative.parts:
        raise _Problem("file_name contains '..'; it must stay inside the dataset folder")
    path = root / relative
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise _Problem(f"file_name resolves to {path.resolve()}, outside the dataset folder {real_root} (symlink?)")
    if not path.is_file():
        raise _Problem(f"image file not found: {path}")
    if not _is_image_name(path.name):
        raise _Problem(f"not an image type ({path.suffix or 'no extension'}); accepted: {', '.join(IMAGE_EXTENSIONS)}")
    return relative.as_posix(), path
