"""fedmeta predict: what it refuses to score, where its CSV goes, and how a row leads back to its file."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from safetensors import safe_open
from safetensors.torch import save

from client.adapted_model import WEIGHTS_FILE, AdaptedModel, load_adapted_model, save_adapted_model
from shared.cli import main
from shared.config import FedMetaConfig, ModelConfig
from shared.data.dicom import PreprocessConfig
from shared.learning.maml import MetaLearner
from shared.learning.models import build_model
from simulations.bench.adapt import write_run_dir
from simulations.data.synthetic import site_profile, write_synthetic_hospital
from tests.shared_data import shared_data

RT_DOSE = Path(get_testdata_file("rtdose.dcm"))
CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))


def run_cli(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def untrained_model(folder: Path, modalities: tuple[str, ...] = ()) -> Path:
    torch.manual_seed(0)
    model_cfg = ModelConfig(width=8, n_way=2)
    params = {n: p.detach() for n, p in build_model(model_cfg).named_parameters()}
    model = AdaptedModel(params, ("benign", "malignant"), model_cfg, PreprocessConfig(image_size=28), modalities)
    save_adapted_model(folder, model, card={"note": "untrained"})
    return folder


def skipped_lines(stderr: str) -> dict[str, str]:
    """The skipped-file report: file as shown -> 'reason; fix'."""
    return {
        file: why
        for line in stderr.splitlines()
        if line.startswith("skipped ")
        for file, why in [line.removeprefix("skipped ").split(": ", 1)]
    }


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_predict_refuses_an_rt_dose_object_with_a_reason_and_a_fix(tmp_path: Path) -> None:
    model = untrained_model(tmp_path / "model")  # no modalities recorded: any image modality, but no dose grid
    code, stdout, stderr = run_cli("predict", "--model", model, RT_DOSE, CT)
    assert code == 0, stderr
    why = skipped_lines(stderr)[str(RT_DOSE)]
    assert why.startswith("an RT Dose object (a dose grid, not an image of the patient); leave such files out")
    assert [row["source"] for row in rows_of(stdout)] == [CT.name]


def test_predict_refuses_segmentations_and_slide_microscopy_unless_adapted_on_slides(tmp_path: Path) -> None:
    wild = shared_data("dicom-wild", "ok")
    segmentations = sorted(wild.glob("highdicom__seg_*.dcm"))
    slides = sorted(wild.glob("highdicom__sm_*.dcm"))
    assert segmentations and slides
    for path in segmentations + slides:  # the standard's own terms, as the refusal relies on them
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.Modality == ("SEG" if path in segmentations else "SM")

    code, _, stderr = run_cli("predict", "--model", untrained_model(tmp_path / "any"), *segmentations, *slides, CT)
    assert code == 0, stderr
    skipped = skipped_lines(stderr)
    for path in segmentations:
        assert "Segmentation object (a mask, not an image of the patient)" in skipped[str(path)]
    for path in slides:
        assert skipped[str(path)].startswith("a VL Whole Slide Microscopy image (Modality SM), which the model was")

    code, stdout, stderr = run_cli("predict", "--model", untrained_model(tmp_path / "sm", ("SM",)), *slides)
    assert code == 0, stderr
    assert {row["source"] for row in rows_of(stdout)} == {path.name for path in slides}


def test_a_model_adapted_on_one_modality_refuses_a_file_of_another(tmp_path: Path) -> None:
    no_modality = shared_data("dicom-wild", "ok", "pylibjpeg-data__GDCMJ2K_TextGBR.dcm")
    assert "Modality" not in pydicom.dcmread(no_modality, stop_before_pixels=True)
    model = untrained_model(tmp_path / "model", ("CT",))
    code, stdout, stderr = run_cli("predict", "--model", model, CT, MR, no_modality)
    assert code == 0, stderr
    skipped = skipped_lines(stderr)
    assert skipped[str(MR)] == (
        "Modality MR, and the model was adapted on CT; use a model adapted on MR scans, or leave MR files out"
    )
    assert skipped[str(no_modality)].startswith("no recognised Modality in the header, and the model was adapted on CT")
    assert [row["sop_instance_uid"] for row in rows_of(stdout)] == [sop_instance_uid(CT)]


def test_with_csv_the_csv_goes_to_the_file_only_and_stdout_gets_one_summary_line(tmp_path: Path) -> None:
    model = untrained_model(tmp_path / "model")
    out = tmp_path / "predictions.csv"
    code, stdout, stderr = run_cli("predict", "--model", model, CT, MR, RT_DOSE, "--csv", out)
    assert code == 0, stderr
    assert stdout == f"2 predictions for 2 files, 1 files skipped; CSV in {out}\n"
    assert [row["source"] for row in rows_of(out.read_text())] == [CT.name, MR.name]
    assert "sop_instance_uid" not in stderr

    code, stdout, stderr = run_cli("predict", "--model", model, CT, MR, RT_DOSE)
    assert code == 0, stderr
    assert stdout == out.read_text()  # without --csv, the same CSV on stdout
    assert stderr.splitlines()[-1] == "2 predictions for 2 files, 1 files skipped"


def test_source_column_gives_the_path_relative_to_the_folder_or_file_given(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    (incoming / "ward-3" / "day-2").mkdir(parents=True)
    shutil.copy(CT, incoming / "ward-3" / "day-2" / "scan.dcm")
    shutil.copy(MR, incoming / "top.dcm")
    out = tmp_path / "p.csv"
    code, _, stderr = run_cli("predict", "--model", untrained_model(tmp_path / "model"), incoming, CT, "--csv", out)
    assert code == 0, stderr
    rows = rows_of(out.read_text())
    assert list(rows[0]) == ["sop_instance_uid", "frame", "source", "predicted_label", "p:benign", "p:malignant"]
    assert [row["source"] for row in rows] == ["top.dcm", "ward-3/day-2/scan.dcm"]  # CT itself: a copy, skipped
    for row in rows:
        assert sop_instance_uid(incoming / row["source"]) == row["sop_instance_uid"]
    assert "(a copy)" in skipped_lines(stderr)[str(CT)]


def test_a_model_written_before_modalities_were_recorded_accepts_any_image_but_still_refuses_rt_dose(
    tmp_path: Path,
) -> None:
    model = untrained_model(tmp_path / "model", ("CT",))
    weights = model / WEIGHTS_FILE
    with safe_open(weights, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    header = json.loads(metadata["header"])
    del header["modalities"]
    weights.write_bytes(save(tensors, metadata={**metadata, "header": json.dumps(header)}))
    assert load_adapted_model(model).modalities == ()

    code, stdout, stderr = run_cli("predict", "--model", model, CT, MR, RT_DOSE)
    assert code == 0, stderr
    assert [row["source"] for row in rows_of(stdout)] == [CT.name, MR.name]
    assert list(skipped_lines(stderr)) == [str(RT_DOSE)]


@pytest.mark.slow
def test_adapt_records_the_modality_of_the_scans_it_adapted_on_and_predict_holds_to_it(tmp_path: Path) -> None:
    cfg = FedMetaConfig().replace(model={"width": 8})
    torch.manual_seed(0)
    run = write_run_dir(
        tmp_path / "run", MetaLearner(build_model(cfg.model), cfg.maml).init_meta_params(), cfg, note="untrained"
    )
    hospital = write_synthetic_hospital(tmp_path / "hospitals", 0, seed=0, n_images=120)
    scanned = site_profile(0, seed=0).scanner.modality
    code, _, stderr = run_cli("adapt", "--model", run, "--hospital", hospital, "--shots", 2, "--out", tmp_path / "m")
    assert code == 0, stderr
    assert load_adapted_model(tmp_path / "m").modalities == (scanned,)

    other, other_modality = (MR, "MR") if scanned != "MR" else (CT, "CT")
    code, _, stderr = run_cli("predict", "--model", tmp_path / "m", hospital, other, "--csv", tmp_path / "p.csv")
    assert code == 0, stderr
    assert skipped_lines(stderr)[str(other)] == (
        f"Modality {other_modality}, and the model was adapted on {scanned}; "
        f"use a model adapted on {other_modality} scans, or leave {other_modality} files out"
    )
    assert len(rows_of((tmp_path / "p.csv").read_text())) == 120
