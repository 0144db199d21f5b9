"""The cache across processes: a build killed mid-way resumes without redoing work, and two ranks
build one cache together, each example encoded once.

Child processes are forked (they inherit the imported modules and the counting wrappers, and
start in milliseconds); each runs torch on one thread, as DataLoader workers do.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest
import torch
from test_cache import build, calls, config, make_dataset, write_example  # noqa: F401 (fixtures)

from pixart_tune.cache import build_cache, store

pytestmark = [
    pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="the children are forked (not available on this OS)"),
    pytest.mark.usefixtures("one_thread"),
]


def _build_and_die_after(cfg, base: str, writes: int) -> None:
    """Child: build the cache, SIGKILL itself while writing latent file number writes + 1."""
    torch.set_num_threads(1)
    real, done = store.write_features, [0]

    def write(path, tensors, meta=None):
        if "latents" in Path(path).parts:
            if done[0] == writes:  # die half-way through this write: a temp file is left behind
                tmp = store.temp_name(Path(path))
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(b"half a safetensors file")
                os.kill(os.getpid(), signal.SIGKILL)
            done[0] += 1
        real(path, tensors, meta)

    store.write_features = write
    build_cache(cfg, base, show_progress=False)


def test_killed_build_resumes_with_only_the_rest(tmp_path, tiny_base, calls):  # noqa: F811
    data, cache = make_dataset(tmp_path / "data", 4), tmp_path / "cache"
    cfg = config(data, cache, tiny_base, num_workers=1)  # decoding in a worker process, as configured
    child = mp.get_context("fork").Process(target=_build_and_die_after, args=(cfg, str(tiny_base), 2))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert len(list((cache / "latents").rglob("*.safetensors"))) == 2
    assert list(cache.rglob(".*.tmp")), "the killed write left its temporary file"
    live = store.temp_name(cache / "latents" / "ab" / "in-progress.safetensors")  # this process: alive
    live.parent.mkdir(parents=True, exist_ok=True)
    live.write_bytes(b"being written by a live process")

    index, n = build(cfg, tiny_base, calls)
    assert n == {"vae": 2, "t5": 4 + 1}, "the two latents not written yet; the captions came after the kill"
    c = index.counts
    assert (c["encoded_latents"], c["reused_latents"], c["used"]) == (2, 2, 4)
    assert list(cache.rglob(".*.tmp")) == [live], "leftovers of the killed build are removed, live writes kept"
    index, n = build(cfg, tiny_base, calls)
    assert n == {"vae": 0, "t5": 0}


def _rank(cfg, base: str, rank: int, world_size: int, barrier, results, calls) -> None:  # noqa: F811
    torch.set_num_threads(1)
    index = build_cache(cfg, base, show_progress=False, rank=rank, world_size=world_size,
                        barrier=lambda: barrier.wait(timeout=120))  # fmt: skip
    records = [(r.key, r.latent_files, r.text_file, r.bucket) for r in index.records]
    results.put((rank, dict(calls), records, index.skipped, dict(index.counts)))


def test_two_ranks_share_the_work_and_build_one_cache(tmp_path, tiny_base, calls):  # noqa: F811
    from pixart_tune.data.examples import image_digest

    data, cache = make_dataset(tmp_path / "data", 5, seed=1), tmp_path / "cache"
    jpeg = (data / "img0.jpg").read_bytes()
    write_example(data, "zbroken.jpg", jpeg[: len(jpeg) // 2], "a broken file")
    owners = {int(image_digest((data / f"img{i}.jpg").read_bytes())[:8], 16) % 2 for i in range(5)}
    assert owners == {0, 1}, "precondition: the images hash to both ranks"
    cfg = config(data, cache, tiny_base)

    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(cfg, str(tiny_base), r, 2, barrier, results, calls)) for r in range(2)]
    for p in procs:
        p.start()
    out = {r: rest for r, *rest in (results.get(timeout=180) for _ in procs)}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    (calls0, records0, skipped0, counts0), (calls1, records1, skipped1, counts1) = out[0], out[1]

    assert records0 == records1 and skipped0 == skipped1, "every rank builds the same index"
    assert counts0 == counts1 and counts0["encoded_latents"] == 5 and counts0["used"] == 5
    assert [Path(s["origin"]).name for s in skipped0] == ["zbroken.jpg"] and "truncated" in skipped0[0]["reason"]
    assert calls0.get("vae", 0) > 0 and calls1.get("vae", 0) > 0, "both ranks encoded images"
    latent_files = list((cache / "latents").rglob("*.safetensors"))
    text_files = list((cache / "text").rglob("*.safetensors"))
    assert calls0.get("vae", 0) + calls1.get("vae", 0) == len(latent_files) == 5, "each image encoded once"
    assert calls0.get("t5", 0) + calls1.get("t5", 0) == len(text_files) + 1, "each caption once, plus the null"

    index, n = build(cfg, tiny_base, calls)  # a later single-process run reuses everything
    assert n == {"vae": 0, "t5": 0}
    assert [(r.key, r.latent_files, r.text_file, r.bucket) for r in index.records] == records0
