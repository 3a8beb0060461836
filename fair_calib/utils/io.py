"""Atomic file writes and content hashes: results and caches are either complete or absent."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary file next to `path` to write into; when the block ends without error it takes the user's
    umask (mkstemp would leave it 0600) and is renamed over `path`, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """A temporary folder next to `folder` to fill; on success it replaces `folder` (an existing one is moved
    aside first and removed only afterwards, so a crash never leaves neither), with the user's umask."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp.", dir=folder.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~_umask())
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def stable_hash(obj: Any, n: int = 16) -> str:
    """sha256 over a canonical JSON form of plain data (dicts, lists, numbers, strings)."""
    blob = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def state_dict_hash(module: torch.nn.Module, n: int = 16) -> str:
    """sha256 over every tensor of the state dict (names, shapes, dtypes and bytes), in key order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:n]
