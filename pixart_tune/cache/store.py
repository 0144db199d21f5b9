"""The cache on disk: feature files (safetensors with a checksum), rejection markers, the index.

Every write goes to a temporary name in the target folder and is renamed into place, so a reader
sees either nothing or a complete file. Temporary names start with '.', end in '.tmp' and name the
host and process that writes them; a killed build can leave some behind, which are never read, and
the next build removes those whose process is gone (or, from another host, that are a day old).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import Config

KINDS = ("latents", "text", "null", "rejected")


@dataclass
class Record:
    """One usable training example: its feature files and its bucket.

    `latent_files` holds one file per cached variant (crop x flip, in `variants` order, see
    cache/keys.py); every variant is a training item of its own (features.CachedFeatures).
    """

    key: str
    latent_files: tuple[str, ...]
    text_file: str
    bucket: str
    height: int  # bucket size in pixels
    width: int
    variants: tuple[str, ...] = ("center",)
    original_hw: tuple[int, int] | None = None  # the decoded (upright) image size, before fitting

    @property
    def latent_file(self) -> str:
        """The first variant (the plain centre or first random crop, unmirrored)."""
        return self.latent_files[0]


@dataclass
class CacheIndex:
    """What build_cache found and made: usable records, what was skipped and why, and counts.

    counts: found (examples in the dataset) = used (records) + skipped; encoded_latents /
    reused_latents and encoded_texts / reused_texts count distinct feature files (two examples with
    the same image share latents, the same caption shares a text file); encoded_* sums all ranks.
    """

    records: list[Record]
    null_file: str
    cache_dir: Path
    counts: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)  # {"origin", "reason"} per skipped example
    timings: dict[str, float] = field(default_factory=dict)  # seconds per build phase

    def summary(self) -> str:
        c = self.counts
        lines = [
            (
                f"{c['found']} examples found: {c['used']} used, {c['skipped']} skipped; "
                f"latents {c['encoded_latents']} encoded, {c['reused_latents']} reused; "
                f"captions {c['encoded_texts']} encoded, {c['reused_texts']} reused"
            )
        ]
        if self.skipped:
            kinds = Counter(_reason_kind(s["reason"]) for s in self.skipped)
            why = "; ".join(f"{n}x {kind}" for kind, n in kinds.most_common(6))
            more = f"; {len(kinds) - 6} more kinds" if len(kinds) > 6 else ""
            lines.append(f"skipped: {why}{more} (each file and reason in {self.cache_dir / 'skipped.jsonl'})")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    """'too small: 50x40, the short side ...' -> 'too small': the part before details begin."""
    for sep in (":", "(", ";"):
        reason = reason.split(sep)[0]
    return reason.strip() or "unknown"


def sha(*parts: str | bytes) -> str:
    """SHA-256 hex digest of the parts, each terminated so that ('ab', 'c') != ('a', 'bc')."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def temp_name(path: Path) -> Path:
    """Where `path` is written before the rename: hidden, per host, process and thread, ends in .tmp."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}-{threading.get_ident()}.tmp")


def write_features(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """Atomic write of one feature file, with a checksum of its tensors in the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone(): slices of one batch share storage, which safetensors refuses to save.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    tmp = temp_name(path)
    save_file(tensors, str(tmp), metadata={**(meta or {}), "sha256": _checksum(tensors)})
    os.replace(tmp, path)


def read_features(path: Path | str) -> dict[str, torch.Tensor] | None:
    """Load a feature file; None if it is missing, truncated or fails its checksum."""
    meta = read_header(path)
    if meta is None:
        return None
    try:
        tensors = load_file(str(path))
    except Exception:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
        return None
    return tensors if _checksum(tensors) == meta["sha256"] else None


def read_header(path: Path | str) -> dict[str, str] | None:
    """The metadata of a feature file if it is structurally complete, else None (cheap: no tensor data read).

    Checks that the safetensors header parses, carries our checksum, and that the file is exactly as
    long as the header says: a truncated file (disk full, killed copy) fails here. A flipped bit
    inside the tensor data does not; `read_features` (full checksum) catches that.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
        meta = header.pop("__metadata__", None) or {}
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
        return None
    if "sha256" not in meta or size != 8 + n + end:
        return None
    return meta


def write_json(path: Path, obj: dict) -> None:
    """Atomic write of a small JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def shard(root: Path, kind: str, key: str, suffix: str = ".safetensors") -> Path:
    """latents/ab/abcdef....safetensors: two-level fan-out keeps folders small."""
    if kind == "null":
        return root / kind / f"{key}{suffix}"
    return root / kind / key[:2] / f"{key}{suffix}"


def default_cache_dir(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    data = Path(cfg.data.path)
    return data / ".pixart_tune_cache" if data.is_dir() else Path(cfg.output_dir) / "cache"


def write_report(root: Path, skipped: list[dict]) -> Path:
    """skipped.jsonl: one JSON line {"origin", "reason"} per example not used."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "skipped.jsonl"
    tmp = temp_name(path)
    tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped), encoding="utf-8")
    os.replace(tmp, path)
    return path


def remove_stale_temps(root: Path) -> int:
    """Delete temporary files that no running writer owns: left by a killed build."""
    removed = 0
    for kind in KINDS:
        for folder, _, files in os.walk(root / kind):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp") and _abandoned(Path(folder, name)):
                    try:
                        Path(folder, name).unlink()
                        removed += 1
                    except FileNotFoundError:
                        pass
    return removed


def _abandoned(path: Path) -> bool:
    """A temp file of a process of this host that is gone; from another host, one untouched for a day."""
    try:
        host, owner = path.name[1 : -len(".tmp")].rsplit(".", 2)[1:]
        pid = int(owner.split("-")[0])
    except ValueError:
        host, pid = "", 0  # not a name we write: judge by age alone
    if host == _HOST and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    try:
        return time.time() - path.stat().st_mtime > 86400
    except FileNotFoundError:
        return False
