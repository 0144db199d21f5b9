"""The digest memo: a re-run does not read unchanged images again; changed ones are re-hashed."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
from test_cache import config, make_dataset, photo, write_example

from pixart_tune.cache import build_cache
from pixart_tune.cache.digest_memo import MEMO_NAME, DigestMemo
from pixart_tune.data import iter_source
from pixart_tune.data.examples import FileBytes, InlineBytes, TarMemberBytes, image_digest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Paths of image files read through FileBytes (what the memo saves)."""
    seen: list[str] = []
    original = FileBytes.read

    def counted(self):
        seen.append(os.path.basename(self.path))
        return original(self)

    monkeypatch.setattr(FileBytes, "read", counted)
    return seen


def test_memo_round_trip_and_identity(tmp_path):
    f = tmp_path / "a.jpg"
    f.write_bytes(b"one")
    memo = DigestMemo(tmp_path / "cache")
    digest, key = memo.lookup(FileBytes(str(f)))
    assert digest is None and key is not None and str(f) in key
    memo.record(key, image_digest(b"one"))
    memo.save()
    again = DigestMemo(tmp_path / "cache")
    assert again.lookup(FileBytes(str(f))) == (image_digest(b"one"), key) and again.hits == 1
    # Rewritten with the same size and the old modification time restored: still a miss.
    st = os.stat(f)
    f.write_bytes(b"two")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert again.lookup(FileBytes(str(f)))[0] is None
    # Nothing to trust for bytes held in memory, nor for a file that is gone.
    assert DigestMemo.key(InlineBytes(b"x")) is None
    assert DigestMemo.key(FileBytes(str(tmp_path / "missing.jpg"))) is None


def test_tar_members_are_keyed_by_shard_and_range(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(b"\0" * 2048)
    a, b = TarMemberBytes(str(shard), 512, 100), TarMemberBytes(str(shard), 1024, 100)
    assert DigestMemo.key(a) != DigestMemo.key(b) and DigestMemo.key(a) == DigestMemo.key(TarMemberBytes(str(shard), 512, 100))


@pytest.mark.parametrize("content", ["not json", json.dumps({"version": 99, "digests": {"k": "v"}}), json.dumps([1, 2])])
def test_unreadable_or_foreign_memo_starts_empty(tmp_path, content):
    (tmp_path / MEMO_NAME).write_text(content)
    memo = DigestMemo(tmp_path)
    assert memo.entries == {}
    memo.record("k", "d")
    memo.save()
    assert json.loads((tmp_path / MEMO_NAME).read_text()) == {"version": 1, "digests": {"k": "d"}}


def test_iter_source_uses_and_fills_the_memo(tmp_path, reads):
    data = make_dataset(tmp_path / "data", 3)
    memo = DigestMemo(tmp_path / "cache")
    first = [item.digest for item in iter_source(data, digest_memo=memo)]
    assert sorted(reads) == ["img0.jpg", "img1.jpg", "img2.jpg"] and len(memo.entries) == 3
    reads.clear()
    second = [item.digest for item in iter_source(data, digest_memo=memo)]
    assert second == first and reads == [] and memo.hits == 3


def test_webdataset_shards_use_the_memo(tmp_path):
    shard = tmp_path / "data" / "shard-0.tar"
    shard.parent.mkdir()
    src = make_dataset(tmp_path / "src", 2)
    with tarfile.open(shard, "w") as tar:
        for name in sorted(os.listdir(src)):
            tar.add(src / name, arcname=name)
    memo = DigestMemo(tmp_path / "cache")
    first = [item.digest for item in iter_source(shard.parent, digest_memo=memo)]
    assert len(memo.entries) == 2 and all(k.startswith("tar:") for k in memo.entries)
    assert [item.digest for item in iter_source(shard.parent, digest_memo=memo)] == first and memo.hits == 2


def test_second_cache_build_reads_no_unchanged_image(tmp_path, tiny_base, reads):
    data, cache = make_dataset(tmp_path / "data", 3), tmp_path / "cache"
    cfg = config(data, cache, tiny_base)
    first = build_cache(cfg, str(tiny_base), show_progress=False)
    assert len(list(cache.rglob(MEMO_NAME))) == 1
    reads.clear()
    second = build_cache(cfg, str(tiny_base), show_progress=False)
    assert reads == []  # neither hashed nor decoded: every digest came from the memo
    assert [r.latent_files for r in second.records] == [r.latent_files for r in first.records]
    # A changed image is read again (scan, then decode for its new latent); the others are not.
    write_example(data, "img1.jpg", photo(96, 64, 777), None)
    third = build_cache(cfg, str(tiny_base), show_progress=False)
    assert set(reads) == {"img1.jpg"} and third.counts["encoded_latents"] == 1
