"""Dataset sources: every layout yields the same Examples; every problem becomes a Skipped or DataError."""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pixart_tune.data.examples import (
    Example,
    FileBytes,
    InlineBytes,
    Skipped,
    TarMemberBytes,
)
from pixart_tune.data.images import BadImage, load_image
from pixart_tune.data.sources import DataError, detect_source, iter_source

REPO = Path(__file__).resolve().parents[1]


def image_bytes(shade: int, fmt: str = "PNG", size=(72, 64)) -> bytes:
    """A small image whose bytes differ per shade."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 255 - shade, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def split(items) -> tuple[dict[str, Example], dict[str, str]]:
    """({key: Example}, {origin: reason}) from iter_source output."""
    examples, skipped = {}, {}
    for item in items:
        if isinstance(item, Example):
            examples[item.key] = item
        else:
            assert isinstance(item, Skipped)
            skipped[item.origin] = item.reason
    return examples, skipped


def reason_for(skipped: dict[str, str], fragment: str) -> str:
    """The reason of the one Skipped whose origin contains `fragment`."""
    hits = [reason for origin, reason in skipped.items() if fragment in origin]
    assert len(hits) == 1, (fragment, skipped)
    return hits[0]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' parquet cache inside the test folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


# --- folder -----------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    write(root / "a.png", image_bytes(1))
    write(root / "a.txt", "  A red square\n")
    write(root / "sub" / "b.jpg", image_bytes(2, "JPEG"))
    write(root / "sub" / "b.txt", "\ufeffa photo with a BOM")  # Windows Notepad style
    write(root / "c.png", image_bytes(3))  # no caption
    write(root / "d.png", image_bytes(4))
    write(root / "d.txt", b"caf\xe9 latin-1")  # not UTF-8
    write(root / "e.png", image_bytes(5))
    write(root / "e.txt", "   \n")  # empty
    write(root / "f.png", image_bytes(1))
    write(root / "f.txt", "A red square")  # same bytes and caption as a.png
    write(root / "g.png", image_bytes(1))
    write(root / "g.txt", "another caption")  # same bytes, other caption: kept
    write(root / "clip.mp4", b"\0\0\0 ftyp")
    write(root / "notes.md", "# notes")
    write(root / ".hidden.png", image_bytes(9))
    write(root / ".pixart_tune_cache" / "x.png", image_bytes(8))
    write(root / ".pixart_tune_cache" / "x.txt", "cached")
    return root


def test_folder(folder):
    assert detect_source(folder) == "folder"
    items = list(iter_source(folder))
    examples, skipped = split(items)
    assert list(examples) == ["a.png", "g.png", "sub/b.jpg"]  # sorted POSIX relative paths
    assert examples["a.png"].caption == "A red square"
    assert examples["sub/b.jpg"].caption == "a photo with a BOM"
    assert examples["a.png"].read_bytes() == image_bytes(1)
    assert examples["a.png"].origin == str(folder / "a.png")
    assert "no caption file c.txt" in reason_for(skipped, "c.png")
    assert "not UTF-8" in reason_for(skipped, "d.png")
    assert "empty" in reason_for(skipped, "e.png")
    assert reason_for(skipped, "f.png").startswith("duplicate of a.png")
    assert "not an image type (.mp4)" in reason_for(skipped, "clip.mp4")
    # used + skipped = found: 7 image files and 1 unknown file; notes, hidden files and cache ignored.
    assert len(items) == len(examples) + len(skipped) == 8


def test_folder_on_error_raises_naming_the_file(folder):
    with pytest.raises(DataError) as info:
        list(iter_source(folder, on_error="error"))
    message = str(info.value)
    assert str(folder / "c.png") in message and "no caption file" in message and "on_error=skip" in message


def test_examples_pickle_and_read_in_another_process_shape(folder):
    examples, _ = split(iter_source(folder))
    restored = pickle.loads(pickle.dumps(list(examples.values())))
    assert [e.read_bytes() for e in restored] == [e.read_bytes() for e in examples.values()]
    assert isinstance(restored[0].image, FileBytes)


def test_missing_path_names_path_and_layouts(tmp_path):
    missing = tmp_path / "nope"
    for source in ("auto", "folder", "metadata"):
        with pytest.raises(FileNotFoundError) as info:
            iter_source(missing, source)
        assert str(missing) in str(info.value) and "accepted dataset layouts" in str(info.value)
        assert "data.path" in str(info.value) and "current directory" not in str(info.value)


def test_a_missing_relative_path_names_the_directory_it_was_read_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"read from the current directory, {tmp_path}")):
        iter_source("data/sample")


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no samples found"):
        list(iter_source(tmp_path))


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="on_error"):
        iter_source(folder, on_error="ignore")
    with pytest.raises(ValueError, match="unknown data source"):
        iter_source(folder, source="csv")


def test_bad_images_are_examples_here_and_badimage_when_loaded(tmp_path):
    """The source checks layout; load_image checks contents. Every file ends up counted once."""
    good = image_bytes(7, "JPEG", size=(96, 80))
    files = {"good.jpg": good, "zero.jpg": b"", "cut.jpg": good[: len(good) // 2], "text.jpg": b"hello"}
    for name, data in files.items():
        write(tmp_path / name, data)
        write(tmp_path / name.replace(".jpg", ".txt"), f"caption of {name}")
    used, bad = [], []
    for example in iter_source(tmp_path):
        try:
            used.append(load_image(example.read_bytes(), example.origin))
        except BadImage as e:
            bad.append(e.reason)
    assert len(used) == 1 and used[0].size == (96, 80) and len(used) + len(bad) == len(files)
    assert sorted(r.split(" ")[0] for r in bad) == ["empty", "not", "truncated"]  # zero, text, cut


def test_shipped_sample_set():
    examples, skipped = split(iter_source(REPO / "data" / "sample"))
    assert len(examples) == 9 and not skipped
    cat = load_image(examples["cat.jpg"].read_bytes(), "cat.jpg")
    assert cat.mode == "RGB" and "cat" in examples["cat.jpg"].caption


# --- metadata.jsonl / metadata.csv ------------------------------------------------------------


@pytest.fixture
def meta_root(tmp_path) -> Path:
    root = tmp_path / "ds"
    write(root / "img" / "one.png", image_bytes(10))
    write(root / "two.png", image_bytes(11))
    write(root / "notes.txt", "not an image")
    write(tmp_path / "outside.png", image_bytes(12))
    os.symlink(tmp_path / "outside.png", root / "link.png")
    return root


def test_metadata_jsonl(meta_root):
    lines = [
        '{"file_name": "img/one.png", "text": "first"}',
        '{"file_name": "./two.png", "caption": "second via caption column"}',
        '{"file_name": "../outside.png", "text": "escape"}',
        f'{{"file_name": "{meta_root.parent / "outside.png"}", "text": "absolute"}}',
        '{"file_name": "link.png", "text": "symlink out"}',
        '{"file_name": "missing.png", "text": "gone"}',
        '{"file_name": "notes.txt", "text": "not image"}',
        "{not json",
        '{"file_name": "img/one.png"}',
        '{"file_name": "two.png", "text": ""}',
        "",
        '{"text": "no file"}',
    ]
    write(meta_root / "metadata.jsonl", "\n".join(lines) + "\n")
    assert detect_source(meta_root) == "metadata"
    items = list(iter_source(meta_root))
    examples, skipped = split(items)
    assert list(examples) == ["img/one.png", "two.png"]
    assert examples["two.png"].caption == "second via caption column"
    assert examples["img/one.png"].read_bytes() == image_bytes(10)
    meta = str(meta_root / "metadata.jsonl")
    assert "contains '..'" in skipped[f"{meta}:3 (../outside.png)"]
    assert "absolute path" in reason_for(skipped, ":4 ")
    assert "outside the dataset folder" in skipped[f"{meta}:5 (link.png)"]
    assert "not found" in skipped[f"{meta}:6 (missing.png)"]
    assert "not an image type" in skipped[f"{meta}:7 (notes.txt)"]
    assert "not valid JSON" in skipped[f"{meta}:8"]
    assert "no 'text' field (nor 'caption')" in skipped[f"{meta}:9 (img/one.png)"]
    assert "empty" in skipped[f"{meta}:10 (two.png)"]
    assert "no file_name" in skipped[f"{meta}:12"]
    assert len(items) == 11  # every non-blank line accounted for


def test_metadata_csv_with_custom_caption_column(meta_root):
    write(meta_root / "metadata.csv", 'file_name,prompt\nimg/one.png,"one, with a comma"\ntwo.png,two\nlink.png,x\n')
    examples, skipped = split(iter_source(meta_root, caption_column="prompt"))
    assert examples["img/one.png"].caption == "one, with a comma" and examples["two.png"].caption == "two"
    assert "outside the dataset folder" in skipped[f"{meta_root / 'metadata.csv'}:4 (link.png)"]
    with pytest.raises(DataError, match="no 'text' caption column"):
        list(iter_source(meta_root))
    with pytest.raises(DataError, match="metadata.csv:4 .*outside the dataset folder"):
        list(iter_source(meta_root, caption_column="prompt", on_error="error"))


def test_metadata_csv_without_file_name_column(meta_root):
    write(meta_root / "metadata.csv", "path,text\ntwo.png,two\n")
    with pytest.raises(DataError, match="no file_name column"):
        list(iter_source(meta_root))


# --- Hugging Face datasets --------------------------------------------------------------------


def make_hf_dataset():
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {
        "image": [
            {"bytes": image_bytes(20), "path": None},
            {"bytes": image_bytes(21), "path": None},
            None,
            {"bytes": image_bytes(20), "path": None},
        ],
        "text": ["first", "second", "no image", "first"],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def check_hf_items(items, prefix="train"):
    examples, skipped = split(items)
    assert list(examples) == [f"{prefix}/00000000", f"{prefix}/00000001"]
    assert examples[f"{prefix}/00000000"].read_bytes() == image_bytes(20)
    assert examples[f"{prefix}/00000001"].caption == "second"
    assert isinstance(examples[f"{prefix}/00000000"].image, InlineBytes)
    assert "no image" in reason_for(skipped, "row 2")
    assert reason_for(skipped, "row 3").startswith(f"duplicate of {prefix}/00000000")


def test_hf_save_to_disk(tmp_path, hf_cache):
    make_hf_dataset().save_to_disk(str(tmp_path / "saved"))
    assert detect_source(tmp_path / "saved") == "hf"
    check_hf_items(iter_source(tmp_path / "saved"))


def test_hf_dataset_dict_picks_split(tmp_path, hf_cache):
    import datasets

    datasets.DatasetDict({"validation": make_hf_dataset()}).save_to_disk(str(tmp_path / "dd"))
    check_hf_items(iter_source(tmp_path / "dd", split="validation"), prefix="validation")
    with pytest.raises(DataError, match="no split 'train'"):
        list(iter_source(tmp_path / "dd"))


def test_an_unreachable_hub_dataset_is_a_data_error(monkeypatch):
    """A Hub id that cannot be loaded (offline here; or unknown, or private) names the id and the ways
    out, as a DataError (the CLI's one-line errors), not datasets' ConnectionError traceback."""
    import datasets

    def offline(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"(?s)owner/photos: could not load it as a Hub dataset \(ConnectionError: .*HF_HUB_OFFLINE"):
        list(iter_source("owner/photos", source="hf"))


def test_hf_parquet_file_and_folder(tmp_path, hf_cache):
    write(tmp_path / "pq" / "README.md", "exported from the Hub")
    make_hf_dataset().to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    assert detect_source(tmp_path / "pq" / "part-0.parquet") == "hf"
    assert detect_source(tmp_path / "pq") == "hf"
    check_hf_items(iter_source(tmp_path / "pq" / "part-0.parquet"))
    check_hf_items(iter_source(tmp_path / "pq", source="hf"))


def test_hf_path_column_and_custom_columns(tmp_path, hf_cache):
    import datasets

    write(tmp_path / "pics" / "p.png", image_bytes(30))
    rows = {"file": ["pics/p.png", "pics/missing.png"], "caption": ["relative path", "gone"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "paths.parquet"))
    examples, skipped = split(iter_source(tmp_path / "paths.parquet", image_column="file"))
    assert examples["train/00000000"].read_bytes() == image_bytes(30)  # 'caption' used: 'text' absent
    assert examples["train/00000000"].caption == "relative path"
    assert "image file not found" in reason_for(skipped, "row 1")
    with pytest.raises(DataError, match="no image column 'image'"):
        list(iter_source(tmp_path / "paths.parquet"))


def test_hf_decoded_pil_column(tmp_path, hf_cache):
    """A column of PIL images (datasets.Image with decode) reads back the stored bytes, undecoded."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (70, 70), (1, 2, 3))], "text": ["pil"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "pil"))
    (example,) = list(iter_source(tmp_path / "pil"))
    assert load_image(example.read_bytes(), "pil").getpixel((5, 5)) == (1, 2, 3)


# --- webdataset tar shards --------------------------------------------------------------------


def make_shard(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


SHARD_MEMBERS = {
    "000.jpg": image_bytes(40, "JPEG"),
    "000.txt": b"zero",
    "001.png": image_bytes(41),
    "001.txt": b"one",
    "001.json": b"{}",
    "002.jpg": image_bytes(42, "JPEG"),  # no caption
    "003.txt": b"caption only",
    "004.png": image_bytes(44),
    "004.txt": b"\xff\xfe",  # not UTF-8
    "sub/005.seg.png": image_bytes(45),
    "sub/005.txt": b"nested",  # webdataset rule: base ends at the first dot
    "007.jpg": image_bytes(47, "JPEG"),
    "007.png": image_bytes(48),
    "007.txt": b"two images",
    "006.heic": b"...",
    "006.txt": b"unsupported type",
}


def test_webdataset_single_plain_shard(tmp_path):
    shard = make_shard(tmp_path / "shard-000.tar", SHARD_MEMBERS)
    assert detect_source(shard) == "webdataset"
    items = list(iter_source(shard))
    examples, skipped = split(items)
    assert list(examples) == ["shard-000.tar/000", "shard-000.tar/001", "shard-000.tar/sub/005"]
    assert examples["shard-000.tar/001"].caption == "one"
    assert isinstance(examples["shard-000.tar/001"].image, TarMemberBytes)  # referenced, not copied
    assert examples["shard-000.tar/001"].read_bytes() == image_bytes(41)
    assert "no caption member 002.txt" in skipped[f"{shard}:002"]
    assert "no image member" in skipped[f"{shard}:003"]
    assert "not UTF-8" in skipped[f"{shard}:004"]
    assert examples["shard-000.tar/sub/005"].caption == "nested"
    assert "no image member of an accepted type" in skipped[f"{shard}:006"]
    assert "several image members" in skipped[f"{shard}:007"]
    assert len(items) == 8


def test_webdataset_folder_glob_and_gzip(tmp_path):
    make_shard(tmp_path / "shards" / "a.tar", {"x.jpg": image_bytes(50, "JPEG"), "x.txt": b"ex"})
    make_shard(tmp_path / "shards" / "b.tar.gz", {"y.png": image_bytes(51), "y.txt": b"why"}, mode="w:gz")
    write(tmp_path / "shards" / "README.md", "two shards")
    assert detect_source(tmp_path / "shards") == "webdataset"
    examples, _ = split(iter_source(tmp_path / "shards"))
    assert list(examples) == ["a.tar/x", "b.tar.gz/y"]
    assert isinstance(examples["b.tar.gz/y"].image, InlineBytes)  # compressed: streamed, kept in memory
    restored = pickle.loads(pickle.dumps(examples["a.tar/x"]))
    assert restored.read_bytes() == image_bytes(50, "JPEG")
    examples, _ = split(iter_source(str(tmp_path / "shards" / "*.tar")))
    assert list(examples) == ["a.tar/x"]


def test_webdataset_on_error(tmp_path):
    shard = make_shard(tmp_path / "s.tar", {"a.jpg": image_bytes(60, "JPEG")})
    with pytest.raises(DataError, match=r"s.tar:a: no caption member a.txt"):
        list(iter_source(shard, on_error="error"))
