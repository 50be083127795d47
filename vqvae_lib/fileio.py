"""Atomic file writes: a temp file in the same folder, flushed, then moved over the target in one step, so an
interrupted write leaves the previous file (or none), never a half-written one.

Temp files are named ``.NAME.HOST.PID.RANDOM.tmp``: a later run can tell the leftovers of a killed process
(`remove_stale_temps`) from the files of a writer that is still at work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

import psutil

log = logging.getLogger(__name__)

HOST = socket.gethostname().replace(".", "_")
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{32}\.tmp")


def temp_name(path: str | Path) -> Path:
    """A unique hidden temp path next to `path`, naming this host and process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def process_alive(pid: int, created: float | None = None) -> bool:
    """True if process `pid` runs on this host (and, when `created` is given, is the one started then)."""
    try:
        process = psutil.Process(pid)
        return created is None or abs(process.create_time() - created) < 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files in `folder` that processes of this host left behind when killed; return them.

    Temp files of live processes and of other hosts (which cannot be checked from here) are left alone.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match and match["host"] == HOST and not process_alive(int(match["pid"])):
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temp files of killed processes in %s", len(removed), folder)
    return removed


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
