"""A hospital's folder of DICOM files -> :class:`HospitalData`, the labelled pool episodes are drawn from.

The folder format is described in README.md ("The folder format"). Bad input never stops a hospital: every
file that cannot be used, and every ``labels.csv`` row that matches no file, is skipped and listed in the
:class:`IngestReport` with a reason and a fix; only a folder with no usable image at all is an error.

What leaves this module is PHI-free by construction: images, label names, record ids (sha256 of SOP
Instance UID and frame), patient keys (HMAC-SHA256 with the site secret), splits, and a report whose
only strings are relative file paths (the report stays on site), label names and fixed reason texts. Logs
carry counts and label names only. The site secret is created once, at ``HOSPITAL/.fedmeta/site_secret`` (mode 0600) or,
when the hospital folder is read-only, in the cache folder.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import posixpath
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared.atomic import PRIVATE_DIR
from shared.config import FedMetaConfig
from shared.data.dicom import DicomReadError, PreprocessConfig, decoder_versions, read_dicom
from shared.data.scan_cache import FileState, ScanCache, ScanEntry, atomic_write
from shared.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "labels.csv"
STATE_FOLDER = ".fedmeta"
SECRET_NAME = "site_secret"
REPORT_NAME = "ingest-report.json"
SPLITS = ("train", "val", "test")
TRAIN_PERCENT = 80  # of records (or patients) whose split labels.csv leaves open


@dataclass(frozen=True)
class SkippedFile:
    file: str  # path relative to the hospital folder, or 'labels.csv line N'
    reason: str
    fix: str


@dataclass
class IngestReport:
    files: int = 0  # files found in the folder
    decoded: int = 0  # files whose images are in the data (decoded, labelled, not duplicates)
    from_cache: int = 0  # files whose outcome came from the cache
    images: int = 0
    seconds: float = 0.0
    skipped: list[SkippedFile] = field(default_factory=list)
    images_by_modality: dict[str, int] = field(default_factory=dict)
    images_by_label: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # label counts too small to train on, with what to do

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(skip.reason for skip in self.skipped).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "decoded": self.decoded,
            "from_cache": self.from_cache,
            "images": self.images,
            "seconds": round(self.seconds, 4),
            "images_by_modality": self.images_by_modality,
            "images_by_label": self.images_by_label,
            "skipped_by_reason": self.skipped_by_reason,
            "warnings": self.warnings,
            "skipped": [dataclasses.asdict(skip) for skip in self.skipped],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class NoUsableImagesError(UserError):
    """The folder gave no usable image; ``report`` says why for each file."""

    def __init__(self, message: str, report: IngestReport) -> None:
        super().__init__(message)
        self.report = report


def preprocess_for(cfg: FedMetaConfig) -> PreprocessConfig:
    """How a run's model reads a hospital's scans: its image size and channels."""
    return PreprocessConfig(image_size=cfg.model.image_size, channels=cfg.model.in_channels)


@dataclass(frozen=True, eq=False)
class HospitalData:
    images: np.ndarray  # float32 [N, C, H, W] in [0, 1]
    labels: np.ndarray  # int64 [N], index into label_names
    label_names: tuple[str, ...]
    record_ids: tuple[str, ...]  # sha256 hex of SOP Instance UID and frame: stable, not PHI
    patient_keys: tuple[str | None, ...]  # HMAC-SHA256 of the patient id with the site secret
    splits: np.ndarray  # 'train' / 'val' / 'test'
    report: IngestReport

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> HospitalData:
        if name not in SPLITS:
            raise UserError(f"split '{name}' does not exist; use one of {', '.join(SPLITS)}")
        keep = np.flatnonzero(self.splits == name)
        return dataclasses.replace(
            self,
            images=self.images[keep],
            labels=self.labels[keep],
            record_ids=tuple(self.record_ids[i] for i in keep),
            patient_keys=tuple(self.patient_keys[i] for i in keep),
            splits=self.splits[keep],
        )


def record_id(sop_instance_uid: str, frame: int) -> str:
    return hashlib.sha256(f"{sop_instance_uid}/{frame}".encode()).hexdigest()


def load_hospital(
    folder: str | Path, preprocess: PreprocessConfig, cache_dir: Path | None = None, progress: bool = False
) -> HospitalData:
    """Read, label and split every image in ``folder``; cached under ``cache_dir`` (default HOSPITAL/.fedmeta/cache).

    One cache folder serves one hospital. Raises :class:`NoUsableImagesError` when nothing is usable.
    """
    started = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"hospital folder {folder} does not exist; pass the folder that holds the DICOM files")
    cache_dir = Path(cache_dir) if cache_dir is not None else folder / STATE_FOLDER / "cache"
    keys = SiteKeys(site_secret(folder, cache_dir))
    manifest = read_manifest(folder / MANIFEST_NAME)
    files, skipped = _find_files(folder, cache_dir)
    report = IngestReport(files=len(files), skipped=skipped)
    image_shape = (preprocess.channels, preprocess.image_size, preprocess.image_size)
    cache = ScanCache(cache_dir / keys.cache_namespace(preprocess), image_shape)

    labelled: list[tuple[str, ScanEntry, LabelRow | None, str]] = []  # (file, entry, manifest row, folder label)
    scanned: list[ScanEntry] = []
    states: dict[str, FileState] = {}
    for found in tqdm(files, desc="ingest", unit="file", file=sys.stderr, disable=not progress, leave=False):
        folder_label = found.relpath.split("/", 1)[0] if "/" in found.relpath else ""
        row = manifest.by_file.pop(found.relpath, None) if manifest else None
        if manifest is not None and row is None and not manifest.by_instance:
            report.skipped.append(SkippedFile(found.relpath, f"not listed in {MANIFEST_NAME}", _UNLISTED_FIX))
            continue
        file_key = keys.file(found.relpath)
        entry, cached, state = _scan(folder, found, file_key, cache, keys, preprocess)
        report.from_cache += cached
        if state is not None:
            states[file_key] = state
            scanned.append(entry)
        if entry.problem:
            report.skipped.append(SkippedFile(found.relpath, *entry.problem))
        elif manifest is None and not folder_label:  # a readable image directly in the hospital folder
            report.skipped.append(SkippedFile(found.relpath, "not in a label folder", _NO_LABEL_FIX))
        else:
            labelled.append((found.relpath, entry, row, folder_label))
    cache.commit(states, scanned)

    data = _assemble(labelled, manifest, keys, report)
    if data is not None:
        report.warnings = label_warnings(data)
    report.seconds = time.perf_counter() - started
    report.skipped.sort(key=lambda skip: skip.file)
    _write_report(cache_dir, report)
    logger.info(
        "ingest: %d files, %d images, %d skipped, %d from cache, %.2f s",
        report.files, report.images, len(report.skipped), report.from_cache, report.seconds,
    )  # fmt: skip
    for warning in report.warnings:
        logger.warning("ingest: %s", warning)
    if data is None:
        why = ", ".join(f"{count} {reason}" for reason, count in list(report.skipped_by_reason.items())[:2])
        raise NoUsableImagesError(
            f"the hospital folder has no usable images among {report.files} files ({why or 'it is empty'}); "
            f"see {REPORT_NAME} in its cache folder for each file and its fix",
            report,
        )
    return data


MIN_TRAIN_IMAGES = 2  # per label: one to adapt on and one to be asked about


def label_warnings(data: HospitalData) -> list[str]:
    """What makes the hospital's labels too thin to train on, and what to do; counts and label names only."""
    if len(data.label_names) == 1:
        return [
            f"only one label is usable ('{data.label_names[0]}'); an episode needs 2 or more classes: "
            "label scans of another class"
        ]
    train = Counter(data.labels[data.splits == "train"].tolist())
    return [
        f"label '{name}' has {train[index]} usable image(s) in the train split, fewer than {MIN_TRAIN_IMAGES}: "
        "label more scans of it"
        for index, name in enumerate(data.label_names)
        if train[index] < MIN_TRAIN_IMAGES
    ]


_NO_LABEL_FIX = f"put it in a folder named after its label, or list it in {MANIFEST_NAME}"
_UNLISTED_FIX = f"add a row for it to {MANIFEST_NAME}, or move it out of the hospital folder"
_UNREADABLE = ("could not be read", "check that it exists and is readable by this user")


@dataclass(frozen=True)
class _FoundFile:
    relpath: str
    size: int
    mtime_ns: int


def _find_files(folder: Path, cache_dir: Path) -> tuple[list[_FoundFile], list[SkippedFile]]:
    """Every file under ``folder`` but hidden ones, the manifest and the cache, sorted by relative path."""
    found: list[_FoundFile] = []
    problems: list[SkippedFile] = []
    cache = cache_dir.resolve()

    def unreadable(path: str) -> None:
        problems.append(SkippedFile(Path(path).relative_to(folder).as_posix(), *_UNREADABLE))

    for directory, subdirectories, names in os.walk(folder, onerror=lambda err: unreadable(err.filename)):
        subdirectories[:] = [
            name for name in subdirectories if not name.startswith(".") and Path(directory, name).resolve() != cache
        ]
        for name in names:
            path = Path(directory, name)
            relpath = path.relative_to(folder).as_posix()
            if name.startswith(".") or relpath == MANIFEST_NAME:
                continue
            try:
                stat = path.stat()
            except OSError:
                unreadable(str(path))
                continue
            found.append(_FoundFile(relpath, stat.st_size, stat.st_mtime_ns))
    found.sort(key=lambda f: f.relpath)
    return found, problems


def _scan(
    folder: Path, found: _FoundFile, file_key: str, cache: ScanCache, keys: SiteKeys, preprocess: PreprocessConfig
) -> tuple[ScanEntry, bool, FileState | None]:
    """The file's entry, whether it came from the cache, and its state to cache (None: do not cache)."""
    data: bytes | None = None
    content = cache.known_content(file_key, found.size, found.mtime_ns)
    if content is None:
        try:
            data = (folder / found.relpath).read_bytes()
        except OSError:
            return ScanEntry(content="", problem=_UNREADABLE), False, None
        content = hashlib.sha256(data).hexdigest()
    state = FileState(found.size, found.mtime_ns, content)
    entry = cache.get(content)
    if entry is not None:
        return entry, True, state
    try:
        entry = _decode(data if data is not None else (folder / found.relpath).read_bytes(), content, keys, preprocess)
    except OSError:
        return ScanEntry(content="", problem=_UNREADABLE), False, None
    except Exception as err:  # a decoder bug on one odd file must not stop the hospital; such outcomes are not cached
        problem = (f"unexpected error while decoding ({type(err).__name__})", "report the file's transfer syntax")
        return ScanEntry(content=content, problem=problem), False, None
    cache.put(entry)
    return entry, False, state


def _decode(data: bytes, content: str, keys: SiteKeys, preprocess: PreprocessConfig) -> ScanEntry:
    try:
        image = read_dicom(data, preprocess)
    except DicomReadError as err:
        return ScanEntry(content=content, problem=(err.reason, err.fix))
    uid = image.sop_instance_uid or f"content:{content}"
    return ScanEntry(
        content=content,
        modality=image.modality,
        instance=hashlib.sha256(uid.encode()).hexdigest(),
        record_ids=tuple(record_id(uid, frame) for frame in image.frames),
        patient_key=keys.patient(image.patient_id) if image.patient_id else None,
        pixels=image.pixels,
    )


def _assemble(
    labelled: list[tuple[str, ScanEntry, LabelRow | None, str]],
    manifest: Manifest | None,
    keys: SiteKeys,
    report: IngestReport,
) -> HospitalData | None:
    """Label, de-duplicate and split the usable files; None when nothing is left."""
    kept: list[tuple[ScanEntry, str, str | None, str]] = []  # (entry, label, patient key, split)
    seen_instances: set[str] = set()
    for relpath, entry, file_row, folder_label in labelled:
        row = file_row
        if manifest is not None:
            instance_row = manifest.by_instance.pop(entry.instance, None)  # claimed even when a file row wins
            row = row or instance_row
            if row is None:
                report.skipped.append(SkippedFile(relpath, f"not listed in {MANIFEST_NAME}", _UNLISTED_FIX))
                continue
        if row is not None and row.problem:
            report.skipped.append(SkippedFile(relpath, *row.problem))
            continue
        if entry.instance in seen_instances:
            report.skipped.append(
                SkippedFile(relpath, "same SOP Instance UID as another file (a duplicate copy)", "remove the copy")
            )
            continue
        seen_instances.add(entry.instance)
        patient_key = keys.patient(row.patient_id) if row and row.patient_id else entry.patient_key
        split = row.split if row and row.split else _default_split(patient_key or entry.instance)
        kept.append((entry, row.label if row else folder_label, patient_key, split))
        report.decoded += 1
    if manifest is not None:
        report.skipped.extend(manifest.unmatched())
    if not kept:
        return None

    label_names = tuple(sorted({label for _, label, _, _ in kept}))
    label_index = {name: i for i, name in enumerate(label_names)}
    per_image = [(entry, label, key, split) for entry, label, key, split in kept for _ in entry.record_ids]
    report.images = len(per_image)
    report.images_by_modality = dict(Counter(entry.modality for entry, *_ in per_image).most_common())
    report.images_by_label = dict(sorted(Counter(label for _, label, _, _ in per_image).items()))
    return HospitalData(
        images=np.concatenate([entry.pixels for entry, *_ in kept if entry.pixels is not None]),
        labels=np.array([label_index[label] for _, label, _, _ in per_image], dtype=np.int64),
        label_names=label_names,
        record_ids=tuple(rid for entry, *_ in kept for rid in entry.record_ids),
        patient_keys=tuple(key for _, _, key, _ in per_image),
        splits=np.array([split for *_, split in per_image], dtype="<U5"),
        report=report,
    )


def _default_split(key: str) -> str:
    """Deterministic 80/20 train/test by a hash (patient key when known, so a patient never straddles splits)."""
    return "train" if int(key[:8], 16) % 100 < TRAIN_PERCENT else "test"


def _write_report(cache_dir: Path, report: IngestReport) -> None:
    encoded = report.to_json().encode()
    try:
        cache_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        atomic_write(cache_dir / REPORT_NAME, lambda f: f.write(encoded))
    except OSError:
        logger.warning("the ingest report could not be written to the cache folder")


# --- labels.csv -------------------------------------------------------------------------------------------------


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


# --- the site secret and keyed hashes ---------------------------------------------------------------------------


class SiteKeys:
    """HMAC-SHA256 with the site secret: stable at this site, meaningless anywhere else."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _keyed(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()

    def patient(self, patient_id: str) -> str:
        return self._keyed("patient", patient_id)

    def file(self, relpath: str) -> str:
        return self._keyed("file", relpath)[:32]

    def cache_namespace(self, preprocess: PreprocessConfig) -> str:
        return self._keyed("cache", f"{preprocess.fingerprint()} {decoder_versions()}")[:32]


def site_secret(folder: Path, cache_dir: Path) -> bytes:
    """The site's HMAC key: read, or created once (mode 0600) in HOSPITAL/.fedmeta, else in the cache folder."""
    places = (folder / STATE_FOLDER / SECRET_NAME, cache_dir / SECRET_NAME)
    for path in places:
        if path.exists():
            return _read_secret(path)
    for path in places:
        try:
            return _create_secret(path)
        except OSError:
            continue
    raise UserError(
        f"cannot create the site secret in HOSPITAL/{STATE_FOLDER} or in the cache folder; "
        "make the hospital folder writable or pass a writable cache folder"
    )


def _read_secret(path: Path) -> bytes:
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        secret = b""
    if len(secret) != 32:
        raise UserError(
            f"the site secret ({path.name}) is damaged; restore it from backup (deleting it re-keys every patient)"
        )
    return secret


def write_site_secret(folder: Path, secret: bytes) -> None:
    """Give a hospital folder that we create ourselves (a simulated one) a chosen secret instead of a random one.

    A simulation derives it from its seed so that splits repeat from run to run; a real hospital's secret is
    random, drawn on first use, because it is what keeps its patients' keys and episode groups unguessable.
    """
    if len(secret) != 32:
        raise ValueError(f"a site secret is 32 bytes, got {len(secret)}")
    _create_secret(folder / STATE_FOLDER / SECRET_NAME, secret)


def _create_secret(path: Path, secret: bytes | None = None) -> bytes:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{secrets.token_hex(8)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() if secret is not None else secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)  # never replaces a secret that a concurrent ingest created first
    finally:
        temp.unlink(missing_ok=True)
    return _read_secret(path)
