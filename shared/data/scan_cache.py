"""On-disk cache of what each file's bytes became under one preprocessing config.

Layout under ``<cache dir>/<namespace>/`` (every name is a hash or a fixed word)::

    index.json              file key -> (size, mtime_ns, content sha256); content -> metadata and snapshot rows
    snapshot-<hash>.npy     float32 [rows, C, H, W]: the pixels of every usable file of the last ingest
    journal/<hash>.npy      pixels decoded since the last snapshot, flushed every JOURNAL_FLUSH_SECONDS
    journal/<hash>.json     their metadata and rows, written after the pixels: a chunk counts once this exists

An ingest looks a file up by (size, mtime_ns) first and hashes its bytes only when those changed; a
content hash found in the snapshot or the journal is not decoded again. At the end the snapshot and
index are rewritten if anything changed and the journal is emptied, so a second ingest of an unchanged
folder reads two files. Every write goes to a temporary file in the same folder, is fsynced and then
renamed over the target, so a killed ingest leaves whole files only; stray temporaries are never read.
Arrays are ``.npy`` read with ``allow_pickle=False``; metadata is JSON. Nothing here holds a path or a
tag value: file keys are keyed hashes of relative paths, instance and patient ids are hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.atomic import PRIVATE_DIR, TEMP_PREFIX, atomic_write

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
_STALE_TEMP_SECONDS = 3600
JOURNAL_FLUSH_SECONDS = 10.0  # a killed first ingest loses at most this much decoding work


@dataclass(frozen=True, eq=False)
class ScanEntry:
    """One file's outcome: its images and hashed identities, or the problem that made it unusable."""

    content: str  # sha256 of the file's bytes
    modality: str = ""
    instance: str = ""  # sha256 of the SOP Instance UID
    record_ids: tuple[str, ...] = ()
    patient_key: str | None = None
    problem: tuple[str, str] | None = None  # (reason, fix)
    pixels: np.ndarray | None = field(default=None, repr=False)  # float32 [F, C, H, W]

    def metadata(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "instance": self.instance,
            "record_ids": list(self.record_ids),
            "patient_key": self.patient_key,
            "problem": list(self.problem) if self.problem else None,
        }

    @classmethod
    def from_metadata(cls, content: str, metadata: dict[str, Any], pixels: np.ndarray | None) -> ScanEntry:
        problem = metadata["problem"]
        return cls(
            content=content,
            modality=metadata["modality"],
            instance=metadata["instance"],
            record_ids=tuple(metadata["record_ids"]),
            patient_key=metadata["patient_key"],
            problem=(problem[0], problem[1]) if problem else None,
            pixels=pixels,
        )


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    content: str


class ScanCache:
    """The cache of one hospital under one namespace (preprocessing fingerprint, decoders, site secret)."""

    def __init__(self, root: Path, image_shape: tuple[int, int, int]) -> None:
        self.root = root
        self.image_shape = image_shape
        self.journal = root / "journal"
        self.writable = True
        try:
            self.journal.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        except OSError:
            self._disable_writes()
        self._index = self._read_index()
        # content -> (array file, metadata with its rows there): the snapshot first, then journal chunks
        self._located: dict[str, tuple[Path, dict[str, Any]]] = {}
        for content, metadata in self._index["contents"].items():
            self._located[content] = (self.root / str(self._index["snapshot"]), metadata)
        for chunk in sorted(self.journal.glob("*.json")):
            for content, metadata in _read_json(chunk).get("contents", {}).items():
                self._located.setdefault(content, (chunk.with_suffix(".npy"), metadata))
        self._arrays: dict[Path, np.ndarray | None] = {}
        self._pending: list[ScanEntry] = []
        self._last_flush = time.monotonic()

    def known_content(self, file_key: str, size: int, mtime_ns: int) -> str | None:
        """The content hash recorded for this file if its size and mtime are unchanged."""
        known = self._index["files"].get(file_key)
        if known and known[0] == size and known[1] == mtime_ns:
            return str(known[2])
        return None

    def get(self, content: str) -> ScanEntry | None:
        located = self._located.get(content)
        if located is None:
            return None
        path, metadata = located
        rows = metadata.get("rows")
        if not rows:
            return ScanEntry.from_metadata(content, metadata, None)
        if path not in self._arrays:
            self._arrays[path] = _load_array(path, self.image_shape)
        array = self._arrays[path]
        if array is None or rows[1] > len(array) or rows[1] - rows[0] != len(metadata["record_ids"]):
            return None
        return ScanEntry.from_metadata(content, metadata, array[rows[0] : rows[1]])

    def put(self, entry: ScanEntry) -> None:
        """Remember a freshly decoded entry; it reaches the journal within JOURNAL_FLUSH_SECONDS of work."""
        self._pending.append(entry)
        if time.monotonic() - self._last_flush >= JOURNAL_FLUSH_SECONDS:
            self._flush_journal()

    def commit(self, files: dict[str, FileState], entries: Iterable[ScanEntry]) -> None:
        """Make this ingest's files and entries the cache's content: one snapshot, one index, an empty journal."""
        if not self.writable:
            return
        contents, pixels = _pack(entries, self.image_shape)
        snapshot_name = f"snapshot-{_digest(contents)}.npy"
        index = {
            "format": INDEX_FORMAT,
            "snapshot": snapshot_name,
            "files": {key: [state.size, state.mtime_ns, state.content] for key, state in files.items()},
            "contents": contents,
        }
        previous = self._index["snapshot"]
        try:
            if not (self.root / snapshot_name).exists():
                atomic_write(self.root / snapshot_name, lambda f: np.save(f, pixels))
            if index != self._index:
                encoded = json.dumps(index, separators=(",", ":")).encode()
                atomic_write(self.root / "index.json", lambda f: f.write(encoded))
                self._index = index
                if previous and previous != snapshot_name:
                    (self.root / previous).unlink(missing_ok=True)
            self._pending.clear()
            self._clear_journal()
        except OSError:
            self._disable_writes()

    def _flush_journal(self) -> None:
        self._last_flush = time.monotonic()
        if not self.writable or not self._pending:
            return
        contents, pixels = _pack(self._pending, self.image_shape)
        chunk = self.journal / _digest(contents)
        encoded = json.dumps({"contents": contents}, separators=(",", ":")).encode()
        try:
            atomic_write(chunk.with_suffix(".npy"), lambda f: np.save(f, pixels))
            atomic_write(chunk.with_suffix(".json"), lambda f: f.write(encoded))  # the chunk counts from here on
        except OSError:
            self._disable_writes()
        self._pending.clear()

    def _disable_writes(self) -> None:
        if self.writable:
            logger.warning("the scan cache is not writable; this ingest is not cached")
        self.writable = False

    def _read_index(self) -> dict[str, Any]:
        index = _read_json(self.root / "index.json")
        if index.get("format") != INDEX_FORMAT:
            return {"format": INDEX_FORMAT, "snapshot": None, "files": {}, "contents": {}}
        return index

    def _clear_journal(self) -> None:
        """Empty the journal, now in the snapshot, and drop temporaries that a killed ingest left behind."""
        stale = time.time() - _STALE_TEMP_SECONDS
        for folder in (self.journal, self.root):
            for path in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if path.name.startswith(TEMP_PREFIX):
                        if path.stat().st_mtime < stale:
                            path.unlink()
                    elif folder == self.journal:
                        path.unlink()


def _pack(entries: Iterable[ScanEntry], image_shape: tuple[int, int, int]) -> tuple[dict[str, Any], np.ndarray]:
    """Metadata by content hash, with each usable entry's rows in the one array of all their pixels."""
    contents: dict[str, dict[str, Any]] = {}
    arrays = []
    row = 0
    for entry in entries:
        if entry.content in contents:
            continue
        contents[entry.content] = entry.metadata()
        if entry.pixels is not None:
            contents[entry.content]["rows"] = [row, row + len(entry.pixels)]
            row += len(entry.pixels)
            arrays.append(entry.pixels)
    pixels = np.concatenate(arrays) if arrays else np.zeros((0, *image_shape), dtype=np.float32)
    return contents, pixels


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _load_array(path: Path, image_shape: tuple[int, int, int]) -> np.ndarray | None:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.dtype != np.float32 or array.ndim != 4 or array.shape[1:] != image_shape:
        return None
    return array


def _digest(contents: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()[:32]
