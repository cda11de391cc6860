"""Durable writes: a reader (or a restarted process) sees the old file or the new one, never half of one.

Files are created owner-only (0600): at a hospital they hold privacy ledgers, secrets and cached pixels.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMP_PREFIX = ".tmp-"
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) as a folder only its owner can enter (an existing one is tightened)."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through an owner-only temporary file in the same folder, fsync, rename, fsync the folder."""
    temp = path.with_name(TEMP_PREFIX + secrets.token_hex(8))
    try:
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        fsync_dir(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def atomic_write_json(path: Path, value: Any) -> None:
    encoded = json.dumps(value, indent=1, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(encoded))
