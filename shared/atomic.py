"""Durable writes: a reader (or a restarted process) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMP_PREFIX = ".tmp-"


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through a temporary file in the same folder, fsync, rename."""
    temp = path.with_name(TEMP_PREFIX + secrets.token_hex(8))
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def atomic_write_json(path: Path, value: Any) -> None:
    encoded = json.dumps(value, indent=1, sort_keys=True).encode()
    atomic_write(path, lambda f: f.write(encoded))
