"""Writing standard-conformant DICOM images for synthetic and imported hospitals.

Every UID is derived from caller-given entropy (``generate_uid(entropy_srcs=...)``) and nothing depends on
the clock, so the same inputs always give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)


@dataclass(frozen=True)
class StudyIdentity:
    """The Patient and General Study module values (synthetic PHI, or empty)."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_date: str
    institution: str
    accession_number: str


ANONYMOUS = StudyIdentity("", "", "", "", "", "", "")


def _uid(*parts: str) -> UID:
    return generate_uid(entropy_srcs=list(parts))


def write_image(
    path: Path,
    stored: np.ndarray,
    *,
    sop_class: UID,
    modality: str,
    transfer_syntax: UID,
    photometric: str,
    bits_stored: int,
    identity: StudyIdentity,
    series: tuple[str, ...],
    instance: tuple[str, ...],
    attributes: dict[str, Any] | None = None,
) -> None:
    """Write ``stored`` (``[rows, cols]``, ``[frames, rows, cols]``, optionally ``[..., 3]``) as one instance.

    ``series`` and ``instance`` are the entropy for the study/series and the instance UIDs.
    ``attributes`` adds elements by keyword (rescale, window, frame timing, ...).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid(*series, *instance, "instance")
    ds.StudyInstanceUID = _uid(*series, "study")
    ds.SeriesInstanceUID = _uid(*series, "series")
    ds.Modality = modality
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = identity.sex
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = identity.study_date
    ds.StudyTime = ds.ContentTime = "101500"
    ds.AccessionNumber = identity.accession_number
    ds.InstitutionName = identity.institution
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "fedmeta"
    for keyword, value in (attributes or {}).items():
        setattr(ds, keyword, value)
    ds.set_pixel_data(stored, photometric, bits_stored, generate_instance_uid=False)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax == ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
    elif transfer_syntax.is_compressed:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
