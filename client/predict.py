"""``fedmeta predict``: an adapted model's predictions for DICOM files, keyed by SOP Instance UID.

Each file goes through the reader and preprocessing the model was trained with (stored in the model
file). Files are listed with a reason and a fix and skipped when they give no image, when they are not an
image of the patient the model can speak about, or when they repeat the SOP Instance UID of a file already
predicted (the same instance, re-encoded or copied). Refused from the header alone, before decoding:

* objects that carry pixel data but are no acquired image, by SOP Class UID (PS3.4 Annex B) or Modality
  (PS3.3 C.7.3.1.1.1): RT Dose (``RTDOSE``), Segmentation and Label Map Segmentation (``SEG``) and
  Parametric Map storage;
* VL Whole Slide Microscopy (``SM``) tiles, unless the model was adapted on ``SM`` images;
* any other Modality than those of the scans the model was adapted on, when the model records them
  (models written before they were recorded accept any image modality).

The CSV holds the SOP Instance UID (``content:<sha256 of the file>`` for a file without one, as at ingest),
the frame number, the file's path relative to the folder it was found in (its name for a file given
directly) so that the hospital can find it, the label and the probabilities; never patient identifiers.
The path is there because the CSV stays at the hospital, like the files it names.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import (
    UID,
    ParametricMapStorage,
    RTDoseStorage,
    SegmentationStorage,
    VLWholeSlideMicroscopyImageStorage,
)

from client.adapted_model import MODALITY_TERM, PREDICT_BATCH, AdaptedModel, load_adapted_model
from shared.atomic import atomic_write
from shared.data.dicom import DicomReadError, read_dicom
from shared.data.manifest import SkippedFile
from shared.errors import UserError

# Label Map Segmentation Storage (PS3.4 B.5): newer than the UID table of pydicom 3.0, which has no name for it.
LabelMapSegmentationStorage = UID("1.2.840.10008.5.1.4.1.1.66.7")
_LEAVE_OUT = "leave such files out of prediction; predict the images instead"
NOT_IMAGES_BY_SOP_CLASS = {
    RTDoseStorage: "an RT Dose object (a dose grid, not an image of the patient)",
    SegmentationStorage: "a Segmentation object (a mask, not an image of the patient)",
    LabelMapSegmentationStorage: "a Label Map Segmentation object (a mask, not an image of the patient)",
    ParametricMapStorage: "a Parametric Map object (derived values, not an acquired image)",
}
NOT_IMAGES_BY_MODALITY = {
    "RTDOSE": NOT_IMAGES_BY_SOP_CLASS[RTDoseStorage],
    "SEG": NOT_IMAGES_BY_SOP_CLASS[SegmentationStorage],
}
SLIDE_MICROSCOPY = "SM"


@dataclass(frozen=True)
class Prediction:
    sop_instance_uid: str
    frame: int  # 0-based frame number in the file
    source: str  # the file's path relative to the folder given (its name for a file given), POSIX separators
    label: str
    probabilities: tuple[float, ...]  # in the order of the model's label names


def dicom_files(inputs: list[Path]) -> Iterator[tuple[Path, str]]:
    """Each file named or under a folder named (hidden names skipped), with its path relative to what was given."""
    for given in inputs:
        if given.is_file():
            yield given, given.name
        elif given.is_dir():
            for directory, subdirectories, names in os.walk(given):
                subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        path = Path(directory, name)
                        yield path, path.relative_to(given).as_posix()
        else:
            raise UserError(f"{given} does not exist; pass DICOM files or folders that hold them")


def header_terms(path: Path) -> tuple[str, str] | None:
    """The file's SOP Class UID and Modality, read without its pixel data; None when it has neither (or does not
    parse): the reader then says what the file is."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPClassUID", "Modality"])
            sop_class, modality = str(ds.get("SOPClassUID") or ""), str(ds.get("Modality") or "").strip()
    except Exception:
        return None
    return (sop_class, modality) if sop_class or modality else None


def refusal(sop_class: str, modality: str, model: AdaptedModel) -> tuple[str, str] | None:
    """Why the model says nothing about an object of this SOP Class UID and Modality; None when it may."""
    if not_image := NOT_IMAGES_BY_SOP_CLASS.get(UID(sop_class)) or NOT_IMAGES_BY_MODALITY.get(modality):
        return not_image, _LEAVE_OUT
    slide = sop_class == VLWholeSlideMicroscopyImageStorage or modality == SLIDE_MICROSCOPY
    if slide and SLIDE_MICROSCOPY not in model.modalities:
        return (
            "a VL Whole Slide Microscopy image (Modality SM), which the model was not adapted on",
            "use a model adapted on slide microscopy, or leave slide files out",
        )
    term = modality if MODALITY_TERM.fullmatch(modality) else "unknown"
    if not model.modalities or term in model.modalities:
        return None
    adapted_on = ", ".join(model.modalities)
    if term == "unknown":
        return (
            f"no recognised Modality in the header, and the model was adapted on {adapted_on}",
            "set Modality when exporting the file, or leave it out",
        )
    return (
        f"Modality {term}, and the model was adapted on {adapted_on}",
        f"use a model adapted on {term} scans, or leave {term} files out",
    )


def predict_files(model: AdaptedModel, inputs: list[Path]) -> tuple[list[Prediction], list[SkippedFile]]:
    predictions: list[Prediction] = []
    skipped: list[SkippedFile] = []
    seen: dict[str, str] = {}  # SOP Instance UID -> the file predicted for it
    keys: list[tuple[str, int, str]] = []
    images: list[np.ndarray] = []

    def flush() -> None:
        probs = model.probabilities(np.concatenate(images))
        for (uid, frame, source), p in zip(keys, probs, strict=True):
            label = model.label_names[int(p.argmax())]
            predictions.append(Prediction(uid, frame, source, label, tuple(map(float, p))))
        keys.clear()
        images.clear()

    for path, source in dicom_files(inputs):
        shown = str(path)
        if (terms := header_terms(path)) and (refused := refusal(*terms, model)):
            skipped.append(SkippedFile(shown, *refused))
            continue
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
        if terms is None and (refused := refusal("", image.modality, model)):  # pixels with no SOP class or Modality
            skipped.append(SkippedFile(shown, *refused))
            continue
        if uid in seen:
            skipped.append(
                SkippedFile(shown, f"same SOP Instance UID as {seen[uid]} (a copy)", "its prediction is that file's")
            )
            continue
        seen[uid] = shown
        keys += [(uid, frame, source) for frame in image.frames]
        images.append(image.pixels)
        if len(keys) >= PREDICT_BATCH:
            flush()
    if keys:
        flush()
    return predictions, skipped


def to_csv(model: AdaptedModel, predictions: list[Prediction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["sop_instance_uid", "frame", "source", "predicted_label", *(f"p:{name}" for name in model.label_names)]
    )
    for p in predictions:
        writer.writerow([p.sop_instance_uid, p.frame, p.source, p.label, *(f"{q:.6f}" for q in p.probabilities)])
    return buffer.getvalue()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict labels for DICOM files with an adapted model",
        description="Predict labels for DICOM files with a model written by fedmeta adapt: CSV rows keyed by "
        "SOP Instance UID and frame, with the file's path relative to the folder given (the CSV stays at the "
        "hospital); files that give no image, or no image of the modalities the model was adapted on (RT dose, "
        "segmentations, slide microscopy, other modalities), are listed and skipped.",
    )
    parser.add_argument("--model", type=Path, required=True, metavar="MODEL", help="folder written by fedmeta adapt")
    parser.add_argument("inputs", type=Path, nargs="+", metavar="DICOM_FILE_OR_DIR")
    parser.add_argument(
        "--csv", type=Path, default=None, metavar="OUT", help="write the CSV to this file instead of stdout"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    model = load_adapted_model(args.model)
    predictions, skipped = predict_files(model, args.inputs)
    for skip in skipped:
        print(f"skipped {skip.file}: {skip.reason}; {skip.fix}", file=sys.stderr)
    if not skipped and not predictions:
        raise UserError(f"no files in {', '.join(map(str, args.inputs))}; pass DICOM files or folders that hold them")
    if not predictions:
        raise UserError(f"no file gave an image to predict ({len(skipped)} skipped, listed above); pass DICOM images")
    files = len({p.sop_instance_uid for p in predictions})  # one file per instance: copies are skipped
    counts = f"{len(predictions)} predictions for {files} files, {len(skipped)} files skipped"
    if args.csv is None:
        print(to_csv(model, predictions), end="")
        print(counts, file=sys.stderr)
        return 0
    encoded = to_csv(model, predictions).encode()
    try:
        atomic_write(args.csv, lambda f: f.write(encoded))
    except OSError:
        raise UserError(f"cannot write {args.csv}; check that its folder exists and is writable") from None
    print(f"{counts}; CSV in {args.csv}")
    return 0
