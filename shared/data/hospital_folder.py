"""A hospital's folder of DICOM files -> :class:`HospitalData`, the labelled pool episodes are drawn from.

The folder format is described in README.md ("The folder format"). Bad input never stops a hospital: every
file that cannot be used, and every ``labels.csv`` row that matches no file, is skipped and listed in the
:class:`IngestReport` with a reason and a fix; only a folder with no usable image at all is an error.

What leaves this module is PHI-free by construction: images, label names, record ids (sha256 of SOP
Instance UID and frame), patient keys (HMAC-SHA256 with the site secret), splits, and a report whose
only strings are relative file paths (the report stays on site), label names and fixed reason texts. Logs
carry counts and label names only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
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
from shared.data.dicom import DicomReadError, PreprocessConfig, read_dicom
from shared.data.manifest import MANIFEST_NAME, SPLITS, LabelRow, Manifest, SkippedFile, read_manifest
from shared.data.scan_cache import FileState, ScanCache, ScanEntry, atomic_write
from shared.data.site_keys import STATE_FOLDER, SiteKeys, default_split, site_secret
from shared.errors import UserError

logger = logging.getLogger(__name__)

REPORT_NAME = "ingest-report.json"


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
        split = row.split if row and row.split else default_split(patient_key or entry.instance)
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


def _write_report(cache_dir: Path, report: IngestReport) -> None:
    encoded = report.to_json().encode()
    try:
        cache_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        atomic_write(cache_dir / REPORT_NAME, lambda f: f.write(encoded))
    except OSError:
        logger.warning("the ingest report could not be written to the cache folder")
