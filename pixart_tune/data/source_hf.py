"""The `hf` source: Hugging Face datasets (a save_to_disk folder, parquet files, or a Hub id)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from .examples import Example, FileBytes, ImageBytes, InlineBytes, Skipped
from .sources import (
    HF_SAVED_MARKERS,
    LAYOUTS,
    DataError,
    _checked_caption,
    _Problem,
)


def read_hf(path: str, image_column: str, caption_column: str, split: str) -> Iterator[Example | Skipped]:
    """One sample per row; key is '<split>/<row index, 8 digits>'."""
    dataset, root = _load_hf(path, split)
    columns = dataset.column_names
    if image_column not in columns:
        raise DataError(path, f"no image column {image_column!r} (columns: {columns})", hint="Set data.image_column.")
    if caption_column not in columns and caption_column == "text" and "caption" in columns:
        caption_column = "caption"
    if caption_column not in columns:
        raise DataError(
            path, f"no caption column {caption_column!r} (columns: {columns})", hint="Set data.caption_column."
        )
    dataset = _undecoded_images(dataset.select_columns([image_column, caption_column]), image_column)
    for index, row in enumerate(dataset):
        origin = f"{path} [{split}] row {index}"
        try:
            image = _hf_image_bytes(row[image_column], root)
            caption = _checked_caption(row[caption_column], f"caption ({caption_column})")
        except _Problem as p:
            yield Skipped(origin, p.reason)
            continue
        yield Example(key=f"{split}/{index:08d}", caption=caption, origin=origin, image=image)


def _load_hf(path: str, split: str):
    """(datasets.Dataset, folder for relative image paths or None) for a local or Hub dataset."""
    import datasets  # lazy: importing datasets costs about a second

    p = Path(path)
    if p.is_dir() and any((p / name).is_file() for name in HF_SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(p))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(path, f"no split {split!r} (splits: {list(loaded)})", hint="Set data.split.")
            loaded = loaded[split]
        return loaded, p
    if p.exists():
        files = [p] if p.is_file() else sorted(p.glob("*.parquet"))
        if not files or any(f.suffix.lower() != ".parquet" for f in files):
            raise DataError(path, "not a save_to_disk folder nor parquet file(s)", hint=LAYOUTS)
        loaded = datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split)
        return loaded, p if p.is_dir() else p.parent
    # Not on disk: a Hub dataset id such as "user/my-photos" (downloaded into the HF cache).
    try:
        return datasets.load_dataset(path, split=split), None
    except (ConnectionError, FileNotFoundError) as exc:  # offline, no such dataset, or no access to it
        raise DataError(path, f"could not load it as a Hub dataset ({type(exc).__name__}: {exc})",
                        hint="Check the id, the network and your login (hf auth login); HF_HUB_OFFLINE=1 reads only "
                             "datasets already in the local cache. Or set data.path to a local save_to_disk folder or "
                             "parquet file(s).") from exc  # fmt: skip


def _undecoded_images(dataset, image_column: str):
    """Ask `datasets` for the stored bytes rather than decoded PIL images (faster; bytes are hashed)."""
    import datasets

    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _hf_image_bytes(value: object, root: Path | None) -> ImageBytes:
    """Image bytes from a {'bytes','path'} dict, raw bytes, a path string or a PIL image."""
    if value is None:
        raise _Problem("no image in this row")
    if isinstance(value, dict):
        if value.get("bytes"):
            return InlineBytes(value["bytes"])
        if value.get("path"):
            return _hf_file(value["path"], root)
        raise _Problem("image entry holds neither bytes nor a path")
    if isinstance(value, bytes | bytearray):
        return InlineBytes(bytes(value))
    if isinstance(value, str):
        return _hf_file(value, root)
    if isinstance(value, Image.Image):
        # Re-encoded losslessly: the original encoded bytes are gone once a PIL image was built.
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return InlineBytes(buffer.getvalue())
    raise _Problem(f"image value of type {type(value).__name__} is not an image, bytes or path")


def _hf_file(path_text: str, root: Path | None) -> FileBytes:
    """An image path from a dataset row; relative paths are taken from the dataset's folder."""
    path = Path(path_text)
    if not path.is_absolute() and root is not None:
        path = root / path
    if not path.is_file():
        raise _Problem(f"image file not found: {path}")
    return FileBytes(str(path))
