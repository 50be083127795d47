"""Atomic file writes: a temp file in the same folder, flushed, then moved over the target in one step, so an
interrupted write leaves the previous file (or none), never a half-written one."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable


def temp_name(path: str | Path) -> Path:
    """A unique hidden temp path next to `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temp file next to `path`, flush it to disk, then move it over `path`."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_json(path: str | Path, content: Any) -> None:
    """Write `content` as indented JSON, atomically."""
    text = json.dumps(content, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
