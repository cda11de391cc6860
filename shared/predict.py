"""``fedmeta predict``: an adapted model's predictions for DICOM files, keyed by SOP Instance UID.

Each file goes through the reader and preprocessing the model was trained with (stored in the model
file). Files that give no image are listed with a reason and a fix and skipped; so is a second file with
the SOP Instance UID of one already predicted (the same instance, re-encoded or copied). The CSV holds
SOP Instance UIDs (``content:<sha256 of the file>`` for a file without one, as at ingest), frame numbers,
label names and probabilities: never patient identifiers or file paths.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.adapted_model import PREDICT_BATCH, AdaptedModel, load_adapted_model
from shared.atomic import atomic_write
from shared.dicom import DicomReadError, read_dicom
from shared.errors import UserError
from shared.hospital import SkippedFile


@dataclass(frozen=True)
class Prediction:
    sop_instance_uid: str
    frame: int  # 0-based frame number in the file
    label: str
    probabilities: tuple[float, ...]  # in the order of the model's label names


def dicom_files(inputs: list[Path]) -> Iterator[tuple[Path, str]]:
    """Each file named or under a folder named (hidden names skipped), with the path to show for it."""
    for given in inputs:
        if given.is_file():
            yield given, str(given)
        elif given.is_dir():
            for directory, subdirectories, names in os.walk(given):
                subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        path = Path(directory, name)
                        yield path, str(path)
        else:
            raise UserError(f"{given} does not exist; pass DICOM files or folders that hold them")


def predict_files(model: AdaptedModel, inputs: list[Path]) -> tuple[list[Prediction], list[SkippedFile]]:
    predictions: list[Prediction] = []
    skipped: list[SkippedFile] = []
    seen: dict[str, str] = {}  # SOP Instance UID -> the file predicted for it
    keys: list[tuple[str, int]] = []
    images: list[np.ndarray] = []

    def flush() -> None:
        probs = model.probabilities(np.concatenate(images))
        for (uid, frame), p in zip(keys, probs, strict=True):
            predictions.append(Prediction(uid, frame, model.label_names[int(p.argmax())], tuple(map(float, p))))
        keys.clear()
        images.clear()

    for path, shown in dicom_files(inputs):
        try:
            image = read_dicom(path, model.preprocess)
            uid = image.sop_instance_uid or f"content:{hashlib.sha256(path.read_bytes()).hexdigest()}"
        except DicomReadError as err:
            skipped.append(SkippedFile(shown, err.reason, err.fix))
            continue
        except Exception as err:  # one odd file must never stop the others
            skipped.append(
                SkippedFile(shown, f"unexpected error while decoding ({type(err).__name__})", "report the file")
            )
            continue
        if uid in seen:
            skipped.append(
                SkippedFile(shown, f"same SOP Instance UID as {seen[uid]} (a copy)", "its prediction is that file's")
            )
            continue
        seen[uid] = shown
        keys += [(uid, frame) for frame in image.frames]
        images.append(image.pixels)
        if len(keys) >= PREDICT_BATCH:
            flush()
    if keys:
        flush()
    return predictions, skipped


def to_csv(model: AdaptedModel, predictions: list[Prediction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sop_instance_uid", "frame", "predicted_label", *(f"p:{name}" for name in model.label_names)])
    for p in predictions:
        writer.writerow([p.sop_instance_uid, p.frame, p.label, *(f"{q:.6f}" for q in p.probabilities)])
    return buffer.getvalue()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict labels for DICOM files with an adapted model",
        description="Predict labels for DICOM files with a model written by fedmeta adapt: CSV rows keyed by "
        "SOP Instance UID and frame; files that give no image are listed and skipped.",
    )
    parser.add_argument("--model", type=Path, required=True, metavar="MODEL", help="folder written by fedmeta adapt")
    parser.add_argument("inputs", type=Path, nargs="+", metavar="DICOM_FILE_OR_DIR")
    parser.add_argument("--csv", type=Path, default=None, metavar="OUT", help="also write the predictions as CSV")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    model = load_adapted_model(args.model)
    predictions, skipped = predict_files(model, args.inputs)
    if predictions:
        print(to_csv(model, predictions), end="")
    for skip in skipped:
        print(f"skipped {skip.file}: {skip.reason}; {skip.fix}", file=sys.stderr)
    if not skipped and not predictions:
        raise UserError(f"no files in {', '.join(map(str, args.inputs))}; pass DICOM files or folders that hold them")
    if not predictions:
        raise UserError(f"no file gave an image ({len(skipped)} skipped, listed above); pass DICOM image files")
    print(f"{len(predictions)} predictions, {len(skipped)} files skipped", file=sys.stderr)
    if args.csv is not None:
        encoded = to_csv(model, predictions).encode()
        try:
            atomic_write(args.csv, lambda f: f.write(encoded))
        except OSError:
            raise UserError(f"cannot write {args.csv}; check that its folder exists and is writable") from None
    return 0
