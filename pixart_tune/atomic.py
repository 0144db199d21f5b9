"""Writing a folder so that it appears whole or not at all (exports, merges, checkpoints, final/)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out: Path | str, tmp: Path | None = None) -> Iterator[Path]:
    """Yield an empty folder beside `out` to fill; when the block ends without error it replaces
    `out` (a folder or a file) in one rename, and on any error it is deleted. A crash or a kill
    therefore never leaves a half-written `out`, and the previous `out` stays until the rename.

    `tmp`: a fixed name for the folder (emptied first), so that what a killed process left behind
    is reused rather than piling up; by default a fresh hidden name beside `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
