"""Synthetic hospitals: valid DICOM, deterministic by seed, a learnable task, and real per-site shift."""

from __future__ import annotations

import csv
import hashlib
import shutil
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from shared.cli import main
from shared.data.dicom import PreprocessConfig
from shared.data.hospital_folder import HospitalData, load_hospital
from shared.data.site_keys import SECRET_NAME, STATE_FOLDER
from simulations.data.synthetic import LESIONS, SCANNERS, SIZE_TASK, site_profile, write_synthetic_hospital

CONFIG = PreprocessConfig(image_size=28)
N_IMAGES = 24


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("federation")
    return [write_synthetic_hospital(root, index, seed=3, n_images=N_IMAGES) for index in range(len(SCANNERS))]


@pytest.fixture(scope="module")
def loaded(federation: list[Path]) -> list[HospitalData]:
    return [load_hospital(folder, CONFIG) for folder in federation]


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(tmp_path: Path) -> None:
    for index in range(len(SCANNERS)):  # every transfer syntax, RLE and JPEG 2000 included
        first = write_synthetic_hospital(tmp_path / "a", index, seed=5, n_images=8)
        again = write_synthetic_hospital(tmp_path / "b", index, seed=5, n_images=8)
        other = write_synthetic_hospital(tmp_path / "c", index, seed=6, n_images=8)
        assert folder_digest(first) == folder_digest(again) != folder_digest(other)


def test_an_existing_hospital_is_returned_as_it_is(tmp_path: Path) -> None:
    folder = write_synthetic_hospital(tmp_path, 2, seed=0, n_images=8)
    before = folder_digest(folder)
    assert write_synthetic_hospital(tmp_path, 2, seed=0, n_images=50) == folder
    assert folder_digest(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # nothing staged is left behind


def test_a_synthetic_hospital_carries_an_owner_only_site_secret_derived_from_seed_and_index(tmp_path: Path) -> None:
    def secret(folder: Path) -> Path:
        return folder / STATE_FOLDER / SECRET_NAME

    first = write_synthetic_hospital(tmp_path / "a", 1, seed=5, n_images=12)
    again = write_synthetic_hospital(tmp_path / "b", 1, seed=5, n_images=12)
    other_seed = write_synthetic_hospital(tmp_path / "c", 1, seed=6, n_images=12)
    other_index = write_synthetic_hospital(tmp_path / "a", 2, seed=5, n_images=12)
    assert stat.S_IMODE(secret(first).stat().st_mode) == 0o600
    assert stat.S_IMODE(secret(first).parent.stat().st_mode) == 0o700
    assert secret(first).read_bytes() == secret(again).read_bytes()
    assert secret(first).read_bytes() not in {secret(f).read_bytes() for f in (other_seed, other_index)}
    a, b = load_hospital(first, CONFIG), load_hospital(again, CONFIG)
    assert a.patient_keys == b.patient_keys and np.array_equal(a.splits, b.splits)


def test_a_real_hospital_folder_draws_a_random_site_secret_on_first_ingest(tmp_path: Path) -> None:
    written = write_synthetic_hospital(tmp_path / "written", 0, seed=5, n_images=8)
    copies = []
    for name in ("site-a", "site-b"):  # the same scans at two sites that never ran fedmeta before
        copies.append(shutil.copytree(written, tmp_path / name, ignore=shutil.ignore_patterns(STATE_FOLDER)))
        load_hospital(copies[-1], CONFIG)
    site_secrets = {(folder / STATE_FOLDER / SECRET_NAME).read_bytes() for folder in (written, *copies)}
    assert len(site_secrets) == 3


def test_every_scanner_writes_valid_dicom_that_the_reader_decodes(
    federation: list[Path], loaded: list[HospitalData]
) -> None:
    for folder, data, scanner in zip(federation, loaded, SCANNERS, strict=True):
        ds = pydicom.dcmread(next(folder.rglob("*.dcm")))
        assert ds.file_meta.TransferSyntaxUID == scanner.transfer_syntax
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == scanner.sop_class
        assert ds.PhotometricInterpretation == scanner.photometric and ds.Modality == scanner.modality
        assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid
        assert data.report.decoded == N_IMAGES and not data.report.skipped
        assert data.report.images_by_modality == {scanner.modality: N_IMAGES}
    ct = pydicom.dcmread(next(federation[0].rglob("*.dcm")))
    assert ct.RescaleIntercept == -1024 and ct.RescaleSlope in (1, 0.5)
    assert pydicom.dcmread(next(federation[4].rglob("*.dcm"))).NumberOfFrames == 3


def test_labels_csv_groups_several_images_per_patient_and_leaves_splits_open(federation: list[Path]) -> None:
    with open(federation[0] / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == N_IMAGES and {row["split"] for row in rows} == {""}
    per_patient = Counter(row["patient_id"] for row in rows)
    assert max(per_patient.values()) >= 2
    first = pydicom.dcmread(federation[0] / rows[0]["file"])
    assert first.PatientID == rows[0]["patient_id"] and first.PatientName and first.StudyDate


def test_hospitals_have_their_own_label_sets_and_class_balance() -> None:
    profiles = [site_profile(index, seed=0) for index in range(20)]
    label_sets = {profile.label_names for profile in profiles}
    assert SIZE_TASK in label_sets and len(label_sets) >= 5
    assert all(set(names) <= set(LESIONS) or names == SIZE_TASK for names in label_sets)
    assert all(2 <= len(profile.label_names) <= 4 for profile in profiles)
    assert len({round(profile.class_weights[0], 3) for profile in profiles}) == len(profiles)


def test_sites_differ_in_resolution_contrast_and_noise(federation: list[Path], loaded: list[HospitalData]) -> None:
    sizes = {pydicom.dcmread(next(folder.rglob("*.dcm"))).Rows for folder in federation}
    assert len(sizes) >= 2 and all(64 <= size <= 256 for size in sizes)
    means = [float(data.images.mean()) for data in loaded]
    assert max(means) - min(means) > 0.05
    profiles = [site_profile(index, seed=3) for index in range(len(SCANNERS))]
    assert len({round(profile.noise, 4) for profile in profiles}) == len(profiles)
    assert len({round(profile.blur, 4) for profile in profiles}) == len(profiles)


def test_lesions_are_learnable_from_the_pixels(tmp_path: Path) -> None:
    """A nearest-class-mean of a simple contrast feature separates lesion from normal well above chance."""
    folder = write_synthetic_hospital(tmp_path, 2, seed=11, n_images=80)  # MR: nodule, normal, ring, streak
    data = load_hospital(folder, CONFIG)
    centre = data.images[:, 0, 4:24, 4:24].reshape(len(data), -1)
    # lesions add bright structure: the brightest pixels stand out from the body's median
    feature = np.quantile(centre, 0.99, axis=1) - np.median(centre, axis=1)
    normal = data.label_names.index("normal")
    is_lesion = data.labels != normal
    threshold = (feature[is_lesion].mean() + feature[~is_lesion].mean()) / 2
    accuracy = float(((feature > threshold) == is_lesion).mean())
    assert accuracy > 0.7


def test_demo_data_command_writes_the_hospitals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo-data", "--out", str(tmp_path), "--hospitals", "2", "--seed", "1", "--images", "8"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital-000", "hospital-001"]
    assert "hospital-001" in capsys.readouterr().out
