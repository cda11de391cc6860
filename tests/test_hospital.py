"""Loading a hospital folder: labels, splits, bad input, PHI, the site secret and the cache."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

import shared.data.hospital_folder
import shared.data.scan_cache
from shared.cli import main
from shared.data.dicom import PreprocessConfig, read_dicom
from shared.data.hospital_folder import HospitalData, NoUsableImagesError, load_hospital, record_id
from shared.data.site_keys import SECRET_NAME, STATE_FOLDER
from shared.errors import UserError
from simulations.bench import ingest as bench_ingest
from simulations.data.synthetic import write_synthetic_hospital
from simulations.simulate import DEFAULT_METHOD

CONFIG = PreprocessConfig(image_size=16)
N_IMAGES = 30
BROKEN = Path("/work/shared/data/dicom-wild/broken/pylibjpeg-data__JPEG-lossy.dcm")  # corrupt JPEG pixel data


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_synthetic_hospital(tmp_path_factory.mktemp("synthetic"), 0, seed=7, n_images=N_IMAGES)
    (folder / STATE_FOLDER).mkdir(exist_ok=True)
    (folder / STATE_FOLDER / SECRET_NAME).write_text("ab" * 32)  # a fixed secret: the same splits every run
    (folder / STATE_FOLDER / SECRET_NAME).chmod(0o600)
    return folder


@pytest.fixture
def hospital(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "hospital"))


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the files the next loads actually decode."""
    calls: list[int] = []

    def counting(source: bytes, config: PreprocessConfig):  # type: ignore[no-untyped-def]
        calls.append(1)
        return read_dicom(source, config)

    monkeypatch.setattr(shared.data.hospital_folder, "read_dicom", counting)
    return calls


def manifest_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_manifest(folder: Path, rows: list[dict[str, str]]) -> None:
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def skipped(data: HospitalData) -> dict[str, str]:
    return {skip.file: skip.reason for skip in data.report.skipped}


def test_loads_images_labels_and_ids_in_the_public_shapes(hospital: Path) -> None:
    data = load_hospital(hospital, CONFIG)
    rows = manifest_rows(hospital)
    assert data.images.dtype == np.float32 and data.images.shape == (N_IMAGES, 1, 16, 16)
    assert data.labels.dtype == np.int64 and len(data) == N_IMAGES
    assert data.label_names == tuple(sorted({row["label"] for row in rows}))
    assert sorted(data.label_names[i] for i in data.labels) == sorted(row["label"] for row in rows)
    uid = str(pydicom.dcmread(hospital / rows[0]["file"]).SOPInstanceUID)
    assert record_id(uid, 0) in data.record_ids and len(set(data.record_ids)) == N_IMAGES
    assert all(key is not None and len(key) == 64 for key in data.patient_keys)
    assert data.report.files == data.report.decoded == N_IMAGES and not data.report.skipped


def test_empty_splits_are_assigned_by_patient_and_split_selects_them(hospital: Path) -> None:
    data = load_hospital(hospital, CONFIG)
    assert set(data.splits) == {"train", "test"}
    for key in set(data.patient_keys):
        assert len({split for k, split in zip(data.patient_keys, data.splits, strict=True) if k == key}) == 1
    train = data.split("train")
    assert len(train) + len(data.split("test")) == len(data) and set(train.splits) == {"train"}
    assert train.label_names == data.label_names and train.images.shape[1:] == data.images.shape[1:]
    with pytest.raises(UserError, match="split 'dev' does not exist"):
        data.split("dev")


def test_manifest_splits_and_patient_ids_are_honoured(hospital: Path) -> None:
    rows = manifest_rows(hospital)
    for row in rows:
        row["split"], row["patient_id"] = "val", "one-patient"
    write_manifest(hospital, rows)
    data = load_hospital(hospital, CONFIG)
    assert set(data.splits) == {"val"} and len(set(data.patient_keys)) == 1


def test_bad_inputs_are_reported_and_the_rest_of_the_hospital_loads(hospital: Path) -> None:
    rows = manifest_rows(hospital)
    good = hospital / rows[0]["file"]
    (hospital / "extra").mkdir()
    (hospital / "extra" / "corrupt.dcm").write_bytes(good.read_bytes()[:-5000])
    (hospital / "extra" / "stripped.dcm").write_bytes(good.read_bytes()[:600])
    (hospital / "extra" / "notes.txt").write_text("not DICOM\n")
    shutil.copy(pydicom.data.get_testdata_files("rtplan.dcm")[0], hospital / "extra" / "plan.dcm")
    shutil.copy(good, hospital / "extra" / "unlisted.dcm")
    shutil.copy(good, hospital / "extra" / "copy.dcm")
    rows[1]["label"] = ""
    rows[2]["split"] = "holdout"
    rows += [
        {"file": "extra/corrupt.dcm", "label": "ring", "patient_id": "", "split": ""},
        {"file": "extra/notes.txt", "label": "ring", "patient_id": "", "split": ""},
        {"file": "extra/stripped.dcm", "label": "ring", "patient_id": "", "split": ""},
        {"file": "extra/plan.dcm", "label": "ring", "patient_id": "", "split": ""},
        {"file": "extra/copy.dcm", "label": "ring", "patient_id": "", "split": ""},
        {"file": "extra/missing.dcm", "label": "ring", "patient_id": "", "split": ""},
        {"file": "", "label": "ring", "patient_id": "", "split": ""},
    ]
    write_manifest(hospital, rows)

    data = load_hospital(hospital, CONFIG)
    reasons = skipped(data)
    assert reasons["extra/corrupt.dcm"] == "pixel data does not match its Image Pixel description"
    assert reasons["extra/notes.txt"] == "not a DICOM file"
    assert reasons["extra/stripped.dcm"] == "an image object without pixel data (truncated or stripped)"
    assert reasons["extra/plan.dcm"].startswith("no pixel data: a non-image object")
    assert reasons["extra/unlisted.dcm"] == "not listed in labels.csv"
    duplicates = [file for file, reason in reasons.items() if reason.startswith("same SOP Instance UID")]
    assert duplicates in (["extra/copy.dcm"], [rows[0]["file"]])  # one of the two copies is kept
    assert reasons["extra/missing.dcm"] == "listed in labels.csv but not found"
    assert reasons[rows[1]["file"]] == "labels.csv line 3 has no label"
    assert reasons[rows[2]["file"]] == "labels.csv line 4: split must be train, val, test or empty"
    assert reasons[f"labels.csv line {len(rows) + 1}"] == "the row names no file"
    assert all(skip.fix for skip in data.report.skipped)
    assert len(data) == data.report.decoded == N_IMAGES - 2
    assert data.report.to_dict()["skipped_by_reason"]["not a DICOM file"] == 1


def test_first_level_folders_label_files_without_a_manifest(hospital: Path) -> None:
    rows = manifest_rows(hospital)
    (hospital / "labels.csv").unlink()
    for row in rows:
        (hospital / row["label"]).mkdir(exist_ok=True)
        (hospital / row["file"]).rename(hospital / row["label"] / Path(row["file"]).name)
    (hospital / "loose.dcm").write_bytes((hospital / rows[0]["label"] / Path(rows[0]["file"]).name).read_bytes())
    shutil.copy(BROKEN, hospital / "broken.dcm")
    (hospital / "notes.txt").write_text("not DICOM\n")
    data = load_hospital(hospital, CONFIG)
    assert data.label_names == tuple(sorted({row["label"] for row in rows}))
    assert sorted(data.label_names[i] for i in data.labels) == sorted(row["label"] for row in rows)
    assert skipped(data) == {  # the real reason for a loose file that is not a readable image
        "loose.dcm": "not in a label folder",
        "broken.dcm": "compressed pixel data could not be decoded (corrupt or truncated)",
        "notes.txt": "not a DICOM file",
    }


def test_a_path_column_is_read_as_the_file_column(hospital: Path) -> None:
    rows = manifest_rows(hospital)
    write_manifest(hospital, [{"path": row.pop("file"), **row} for row in rows])
    data = load_hospital(hospital, CONFIG)
    assert len(data) == N_IMAGES and not data.report.skipped
    write_manifest(hospital, [{"file": row["path"], **row} for row in manifest_rows(hospital)])
    with pytest.raises(UserError, match=r"labels\.csv has both a 'file' and a 'path' column"):
        load_hospital(hospital, CONFIG)


def test_a_label_with_one_train_image_is_warned_about_in_the_report_log_and_ingest_table(
    hospital: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = manifest_rows(hospital)
    rows[0]["label"], rows[0]["split"] = "rare", "train"
    write_manifest(hospital, rows)
    with caplog.at_level(logging.WARNING, logger="shared.data.hospital_folder"):
        data = load_hospital(hospital, CONFIG)
    warning = "label 'rare' has 1 usable image(s) in the train split, fewer than 2: label more scans of it"
    assert data.report.warnings == [warning] and data.report.to_dict()["warnings"] == [warning]
    assert warning in caplog.text
    assert main(["ingest", str(hospital), "--image-size", "16"]) == 0
    assert f"warnings\n  {warning}" in capsys.readouterr().out


def test_a_hospital_with_a_single_label_is_warned_about(hospital: Path) -> None:
    write_manifest(hospital, [{**row, "label": "normal"} for row in manifest_rows(hospital)])
    data = load_hospital(hospital, CONFIG)
    assert data.label_names == ("normal",)
    assert data.report.warnings == [
        "only one label is usable ('normal'); an episode needs 2 or more classes: label scans of another class"
    ]


def test_a_manifest_can_name_files_by_sop_instance_uid(hospital: Path) -> None:
    rows = manifest_rows(hospital)
    by_uid = [
        {"sop_instance_uid": str(pydicom.dcmread(hospital / row["file"]).SOPInstanceUID), "label": row["label"]}
        for row in rows[:-1]
    ] + [{"sop_instance_uid": "1.2.3.4", "label": "ring"}]
    write_manifest(hospital, by_uid)
    data = load_hospital(hospital, CONFIG)
    assert len(data) == N_IMAGES - 1
    assert skipped(data) == {
        rows[-1]["file"]: "not listed in labels.csv",
        f"labels.csv line {N_IMAGES + 1}": "listed in labels.csv but no file has this SOP Instance UID",
    }


def test_no_usable_image_is_one_clear_user_error(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_text("junk")
    with pytest.raises(NoUsableImagesError) as raised:
        load_hospital(tmp_path, CONFIG)
    message = str(raised.value)
    assert "\n" not in message and "no usable images among 1 files (1 not a DICOM file)" in message
    assert raised.value.report.skipped[0].file == "junk/a.dcm"
    with pytest.raises(UserError, match="does not exist"):
        load_hospital(tmp_path / "nowhere", CONFIG)


def test_an_unusable_manifest_is_one_clear_user_error(hospital: Path) -> None:
    (hospital / "labels.csv").write_text("path,diagnosis\na.dcm,x\n")
    with pytest.raises(UserError, match=r"needs a 'label' column and a 'file' \(or 'path'\) or 'sop_instance_uid'"):
        load_hospital(hospital, CONFIG)


def phi_values(folder: Path) -> set[str]:
    values = set()
    for path in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName"):
            values.add(str(ds.get(keyword)))
        values.add(str(ds.SOPInstanceUID))
    return {value for value in values if value}


def test_no_phi_reaches_the_report_the_logs_or_the_cache(hospital: Path, caplog: pytest.LogCaptureFixture) -> None:
    phi = phi_values(hospital) | {str(hospital.resolve()), str(hospital)}
    assert len(phi) > 10
    caplog.set_level(logging.DEBUG)
    data = load_hospital(hospital, CONFIG, progress=True)
    load_hospital(hospital, CONFIG)  # the cached path too
    state = hospital / STATE_FOLDER
    cache_names = "\n".join(str(path.relative_to(state)) for path in state.rglob("*"))
    cache_json = "\n".join(path.read_text() for path in state.rglob("*.json"))
    outputs = {
        "report": data.report.to_json(),
        "logs": caplog.text,
        "cache file names": cache_names,
        "cache metadata": cache_json,
        "ids": " ".join(data.record_ids) + " ".join(str(key) for key in data.patient_keys),
    }
    for where, text in outputs.items():
        leaked = sorted(value for value in phi if value in text)
        assert not leaked, f"PHI in the {where}: {leaked[:3]}"


def test_the_site_secret_is_created_private_stable_and_per_site(hospital: Path, tmp_path: Path) -> None:
    fresh = Path(shutil.copytree(hospital, tmp_path / "fresh", ignore=shutil.ignore_patterns(STATE_FOLDER)))
    first = load_hospital(fresh, CONFIG)
    secret = fresh / STATE_FOLDER / SECRET_NAME
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(bytes.fromhex(secret.read_text())) == 32
    assert load_hospital(fresh, CONFIG).patient_keys == first.patient_keys
    assert not set(load_hospital(hospital, CONFIG).patient_keys) & set(first.patient_keys)


def test_a_second_load_is_served_from_the_cache_with_identical_arrays(hospital: Path, decodes: list[int]) -> None:
    first = load_hospital(hospital, CONFIG)
    assert len(decodes) == N_IMAGES
    second = load_hospital(hospital, CONFIG)
    assert len(decodes) == N_IMAGES and second.report.from_cache == N_IMAGES  # no file decoded twice
    np.testing.assert_array_equal(second.images, first.images)
    assert second.record_ids == first.record_ids and second.patient_keys == first.patient_keys
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.splits, first.splits)


def test_a_modified_file_alone_is_decoded_again(hospital: Path, decodes: list[int]) -> None:
    first = load_hospital(hospital, CONFIG)
    rows = manifest_rows(hospital)
    changed = pydicom.dcmread(hospital / rows[3]["file"])
    pixels = changed.pixel_array
    changed.PixelData = (pixels.max() - pixels).astype(pixels.dtype).tobytes()
    changed.save_as(hospital / rows[3]["file"])
    (hospital / rows[4]["file"]).touch()  # a new mtime with the same bytes: hashed, not decoded
    decodes.clear()
    second = load_hospital(hospital, CONFIG)
    assert len(decodes) == 1
    differs = [i for i in range(N_IMAGES) if not np.array_equal(first.images[i], second.images[i])]
    assert len(differs) == 1
    assert load_hospital(hospital, CONFIG).report.from_cache == N_IMAGES


def test_a_changed_preprocessing_config_gets_its_own_cache(hospital: Path, decodes: list[int]) -> None:
    load_hospital(hospital, CONFIG)
    bigger = load_hospital(hospital, PreprocessConfig(image_size=20))
    assert len(decodes) == 2 * N_IMAGES and bigger.images.shape[-1] == 20
    load_hospital(hospital, CONFIG)
    assert len(decodes) == 2 * N_IMAGES


def test_leftovers_of_a_killed_write_are_ignored(hospital: Path, decodes: list[int]) -> None:
    first = load_hospital(hospital, CONFIG)
    namespace = next(path for path in (hospital / STATE_FOLDER / "cache").iterdir() if path.is_dir())
    (namespace / ".tmp-0123456789abcdef").write_bytes(b"half an index")
    (namespace / "journal" / ".tmp-fedcba9876543210").write_bytes(b"\x93NUMPY half an array")
    (namespace / "journal" / "0123456789abcdef0123456789abcdef.npy").write_bytes(b"\x93NUMPY truncated")
    again = load_hospital(hospital, CONFIG)
    assert len(decodes) == N_IMAGES and again.report.from_cache == N_IMAGES
    np.testing.assert_array_equal(again.images, first.images)


def test_an_interrupted_first_load_resumes_from_its_journal(
    hospital: Path, decodes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared.data.scan_cache, "JOURNAL_FLUSH_SECONDS", 0.0)
    counting: Callable[..., object] = shared.data.hospital_folder.read_dicom

    def killed_after_ten(source: bytes, config: PreprocessConfig):  # type: ignore[no-untyped-def]
        if len(decodes) == 10:
            raise KeyboardInterrupt
        return counting(source, config)

    monkeypatch.setattr(shared.data.hospital_folder, "read_dicom", killed_after_ten)
    with pytest.raises(KeyboardInterrupt):
        load_hospital(hospital, CONFIG)
    monkeypatch.setattr(shared.data.hospital_folder, "read_dicom", counting)
    resumed = load_hospital(hospital, CONFIG)
    assert len(decodes) == N_IMAGES and resumed.report.from_cache == 10
    np.testing.assert_array_equal(resumed.images, load_hospital(pristine_copy(hospital), CONFIG).images)


def pristine_copy(hospital: Path) -> Path:
    return Path(shutil.copytree(hospital, hospital.with_name("uncached"), ignore=shutil.ignore_patterns(STATE_FOLDER)))


def test_ingest_command_prints_a_json_report_or_a_table(hospital: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (hospital / "junk.dcm").write_text("junk")
    assert main(["ingest", str(hospital), "--json", "--image-size", "16"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["files"] == N_IMAGES + 1 and report["decoded"] == N_IMAGES and report["seconds"] >= 0
    assert report["skipped"] == [
        {"file": "junk.dcm", "reason": "not listed in labels.csv", "fix": report["skipped"][0]["fix"]}
    ]
    assert captured.err == ""  # no progress bar with --json
    assert main(["ingest", str(hospital), "--image-size", "16"]) == 0
    table = capsys.readouterr().out
    assert "images by label" in table and "skipped by reason" in table and "not listed in labels.csv" in table


def test_ingest_command_fails_in_one_line_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.dcm").write_text("junk")
    assert main(["ingest", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("fedmeta ingest: the hospital folder has no usable images") and "Traceback" not in error
    assert str(tmp_path) not in error


def test_simulate_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    # argparse may wrap a long default after one of its hyphens
    text = " ".join(re.sub(r"-\n\s+", "-", capsys.readouterr().out).split())
    assert "(default: 10)" in text and "(default: runs/simulation)" in text
    assert f"(default: {DEFAULT_METHOD})" in text


def test_ingest_benchmark_reports_both_passes_and_the_cached_pass_reads_every_file_from_the_cache() -> None:
    parser = argparse.ArgumentParser()
    bench_ingest.add_arguments(parser)
    result = bench_ingest.run(parser.parse_args(["--files", "12", "--image-size", "16"]))
    timings = {"generate_s", "first_pass_s", "first_pass_files_per_s", "cached_s", "cached_files_per_s", "speedup"}
    assert timings <= set(result) and all(isinstance(result[key], float) for key in timings)  # reported, not judged
    assert result["files"] == result["images"] == 12 and result["image_size"] == 16
    assert result["first_pass_from_cache"] == 0 and result["cached_from_cache"] == 12
    assert result["cached_identical"] is True
