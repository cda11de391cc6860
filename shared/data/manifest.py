"""A hospital's ``labels.csv``: the label, patient and split of each file (or SOP Instance UID).

Its columns are described in README.md ("The folder format"). A row that cannot label its file becomes a
:class:`SkippedFile` with a reason and a fix, like any unusable file; only a manifest that cannot be read
at all, or lacks the columns to match rows to files, is an error.
"""

from __future__ import annotations

import csv
import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import UserError

MANIFEST_NAME = "labels.csv"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SkippedFile:
    """A file (or ``labels.csv`` row) that was left out: why, and what makes it usable."""

    file: str  # path relative to the hospital folder, or 'labels.csv line N'
    reason: str
    fix: str


@dataclass(frozen=True)
class LabelRow:
    line: int
    label: str
    patient_id: str | None
    split: str  # '' when left open
    problem: tuple[str, str] | None = None  # (reason, fix) when the row cannot label its file


@dataclass
class Manifest:
    by_file: dict[str, LabelRow]  # relative path -> row; rows are removed as files claim them
    by_instance: dict[str, LabelRow]  # sha256 of SOP Instance UID -> row; likewise
    problems: list[SkippedFile]  # rows that name no file or repeat another

    def unmatched(self) -> list[SkippedFile]:
        """Rows no file claimed, and rows that could not be used at all."""
        missing = [
            SkippedFile(path, f"listed in {MANIFEST_NAME} but not found", f"fix line {row.line} or add the file")
            for path, row in self.by_file.items()
        ]
        missing += [
            SkippedFile(
                f"{MANIFEST_NAME} line {row.line}",
                f"listed in {MANIFEST_NAME} but no file has this SOP Instance UID",
                "fix the UID or add the file",
            )
            for row in self.by_instance.values()
        ]
        return missing + self.problems


def read_manifest(path: Path) -> Manifest | None:
    """The parsed ``labels.csv``, or None without one; a manifest that cannot be used at all is an error."""
    if not path.exists():
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = {(name or "").strip().lower() for name in reader.fieldnames or ()}
            if {"file", "path"} <= columns:
                raise UserError(f"{MANIFEST_NAME} has both a 'file' and a 'path' column (the same thing); keep one")
            if "label" not in columns or not columns & {"file", "path", "sop_instance_uid"}:
                raise UserError(
                    f"{MANIFEST_NAME} needs a 'label' column and a 'file' (or 'path') or 'sop_instance_uid' column; "
                    "add them to its header row"
                )
            manifest = Manifest({}, {}, [])
            for raw in reader:
                row = {(key or "").strip().lower(): (value or "").strip() for key, value in raw.items()}
                if "path" in row:  # a common name for the file column
                    row["file"] = row.pop("path")
                _add_row(manifest, reader.line_num, row)
    except (OSError, UnicodeDecodeError, csv.Error):
        raise UserError(f"{MANIFEST_NAME} could not be read as UTF-8 CSV; save it as CSV with a header row") from None
    return manifest


def _add_row(manifest: Manifest, line: int, row: dict[str, Any]) -> None:
    where = f"{MANIFEST_NAME} line {line}"
    problem: tuple[str, str] | None = None
    if not row.get("label"):
        problem = (f"{where} has no label", f"fill in the label on line {line}")
    elif row.get("split", "").lower() not in ("", *SPLITS):
        problem = (f"{where}: split must be train, val, test or empty", f"fix the split on line {line}")
    split = row.get("split", "").lower()
    label_row = LabelRow(line, row.get("label", ""), row.get("patient_id") or None, split, problem)

    if row.get("file"):
        relpath = posixpath.normpath(row["file"].replace("\\", "/"))
        if relpath.startswith(("/", "../")) or relpath == "..":
            manifest.problems.append(
                SkippedFile(where, "file is not a path inside the hospital folder", "use a path relative to the folder")
            )
            return
        table, key = manifest.by_file, relpath
    elif row.get("sop_instance_uid"):
        table, key = manifest.by_instance, hashlib.sha256(row["sop_instance_uid"].encode()).hexdigest()
    else:
        manifest.problems.append(SkippedFile(where, "the row names no file", "fill in file or sop_instance_uid"))
        return
    if key in table:
        manifest.problems.append(SkippedFile(where, f"repeats line {table[key].line}", "keep one row per file"))
        return
    table[key] = label_row
