"""The DICOM reader on real files from many vendors and encoders, and on files with known pixel values."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from shared.data.dicom import DicomReadError, PreprocessConfig, read_dicom
from simulations.data.dicom_write import ANONYMOUS, write_image
from tests.shared_data import shared_data

SMALL = PreprocessConfig(image_size=16)


def assert_model_input(pixels: np.ndarray, config: PreprocessConfig) -> None:
    assert pixels.dtype == np.float32
    assert pixels.shape[1:] == (config.channels, config.image_size, config.image_size)
    assert np.isfinite(pixels).all()
    assert pixels.min() >= 0 and pixels.max() <= 1


def write(
    path: Path,
    stored: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    sop_class: UID = SecondaryCaptureImageStorage,
    **attributes: object,
) -> Path:
    write_image(
        path,
        stored,
        sop_class=sop_class,
        modality="OT",
        transfer_syntax=transfer_syntax,
        photometric=photometric,
        bits_stored=bits_stored,
        identity=ANONYMOUS,
        series=("test",),
        instance=(path.name,),
        attributes=attributes,
    )
    return path


def test_every_wild_ok_file_decodes_to_finite_model_input() -> None:
    files = sorted(shared_data("dicom-wild", "ok").glob("*.dcm"))
    assert len(files) > 30
    for config in (SMALL, PreprocessConfig(image_size=16, channels=3, frames="all")):
        for path in files:
            assert_model_input(read_dicom(path, config).pixels, config)


def test_wild_broken_files_are_reported_with_a_reason_and_a_fix() -> None:
    files = sorted(shared_data("dicom-wild", "broken").glob("*.dcm"))
    assert len(files) == 2
    for path in files:
        with pytest.raises(DicomReadError) as raised:
            read_dicom(path, SMALL)
        assert raised.value.reason == "compressed pixel data could not be decoded (corrupt or truncated)"
        assert raised.value.fix


def pydicom_decodes(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pydicom.dcmread(path, force=True).pixel_array  # noqa: B018
        except Exception:
            return False
    return True


def test_pydicom_and_pydicom_data_test_files_decode_or_are_reported() -> None:
    """Files pydicom itself can decode must decode finite; every other one is reported, never raised raw."""
    files = [Path(name) for name in pydicom.data.get_testdata_files() if Path(name).is_file()]
    assert any("data_store" in str(path) for path in files), "pydicom-data is not installed"
    decoded, reported = 0, []
    for path in files:
        try:
            assert_model_input(read_dicom(path, SMALL).pixels, SMALL)
            decoded += 1
        except DicomReadError as err:
            assert err.reason and err.fix
            reported.append(path)
    wrongly_reported = [path.name for path in reported if pydicom_decodes(path)]
    assert not wrongly_reported, f"pydicom decodes these, fedmeta reported them: {wrongly_reported}"
    assert decoded > 150 and len(reported) > 50  # many test files are non-image objects or broken on purpose


def test_rescale_and_window_map_hounsfield_units_through_the_window(tmp_path: Path) -> None:
    # stored 0..1000 with slope 2, intercept -1000 -> -1000..1000 HU; window 0 +- 200 HU
    stored = np.linspace(0, 1000, 16 * 16).reshape(16, 16).astype(np.uint16)
    path = write(
        tmp_path / "ct.dcm", stored, bits_stored=12, sop_class=CTImageStorage,
        RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=400, VOILUTFunction="LINEAR_EXACT",
    )  # fmt: skip
    pixels = read_dicom(path, SMALL).pixels[0, 0]
    expected = np.clip((stored * 2.0 - 1000 - 0) / 400 + 0.5, 0, 1)
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


def test_without_a_window_the_percentiles_span_zero_to_one(tmp_path: Path) -> None:
    stored = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 10
    stored[0, 0] = 4000  # one outlier must not squash the rest
    pixels = read_dicom(write(tmp_path / "mr.dcm", stored, bits_stored=12), SMALL).pixels[0, 0]
    assert pixels[0, 0] == 1.0
    assert pixels[15, 15] == 1.0 and pixels[0, 1] == 0.0
    assert 0.45 < float(np.median(pixels)) < 0.55


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    window = {"WindowCenter": 127.5, "WindowWidth": 255, "VOILUTFunction": "LINEAR_EXACT"}
    mono2 = read_dicom(write(tmp_path / "m2.dcm", stored, **window), SMALL).pixels
    mono1 = read_dicom(write(tmp_path / "m1.dcm", stored, "MONOCHROME1", **window), SMALL).pixels
    np.testing.assert_allclose(mono2[0, 0], stored / 255, atol=1e-6)
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)


def test_big_endian_rle_and_jpeg2000_give_the_same_pixels(tmp_path: Path) -> None:
    stored = (np.random.default_rng(0).random((48, 40)) * 4000).astype(np.uint16)
    outputs = [
        read_dicom(write(tmp_path / f"{i}.dcm", stored, bits_stored=12, transfer_syntax=syntax), SMALL).pixels
        for i, syntax in enumerate((ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                    RLELossless, JPEG2000Lossless))
    ]  # fmt: skip
    assert pydicom.dcmread(tmp_path / "2.dcm").file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    for pixels in outputs[1:]:
        np.testing.assert_array_equal(pixels, outputs[0])


def test_ybr_full_422_jpeg_is_converted_to_rgb() -> None:
    rgb = read_dicom(shared_data("dicom-wild", "ok", "pylibjpeg-data__SC_rgb.dcm"), PreprocessConfig(channels=3))
    ybr = read_dicom(
        shared_data("dicom-wild", "ok", "pylibjpeg-data__SC_rgb_dcmtk_+eb+cy+np.dcm"), PreprocessConfig(channels=3)
    )
    assert np.abs(ybr.pixels - rgb.pixels).mean() < 0.02  # lossy JPEG: close, not equal
    top_band = rgb.pixels[0, :, 1, 14]
    np.testing.assert_allclose(top_band, [1, 0, 0], atol=0.01)  # the first colour bar is red


def test_colour_becomes_luminance_and_gray_is_repeated(tmp_path: Path) -> None:
    colour = np.zeros((16, 16, 3), dtype=np.uint8)
    colour[..., 1] = 255  # pure green
    gray = read_dicom(write(tmp_path / "rgb.dcm", colour, "RGB"), SMALL).pixels
    np.testing.assert_allclose(gray, 0.587, atol=1e-6)
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    three = read_dicom(write(tmp_path / "gray.dcm", stored), PreprocessConfig(image_size=16, channels=3)).pixels
    assert three.shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(three[:, 0], three[:, 2])


def test_frames_policy_middle_all_or_an_index(tmp_path: Path) -> None:
    frames = np.stack([np.full((8, 8), value, dtype=np.uint8) for value in (0, 100, 200)])
    path = write(
        tmp_path / "mf.dcm", frames, sop_class=MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        WindowCenter=127.5, WindowWidth=255, VOILUTFunction="LINEAR_EXACT",
    )  # fmt: skip
    middle = read_dicom(path, SMALL)
    assert middle.frames == (1,)
    np.testing.assert_allclose(middle.pixels[0, 0, 4:12, 4:12], 100 / 255, atol=1e-6)
    every = read_dicom(path, PreprocessConfig(image_size=16, frames="all"))
    assert every.frames == (0, 1, 2)
    np.testing.assert_allclose(every.pixels[:, 0, 8, 8], np.array([0, 100, 200]) / 255, atol=1e-6)
    assert read_dicom(path, PreprocessConfig(image_size=16, frames=2)).frames == (2,)
    with pytest.raises(DicomReadError, match="frame index 5 does not exist"):
        read_dicom(path, PreprocessConfig(image_size=16, frames=5))


def test_resize_keeps_the_aspect_ratio_and_pads_to_a_square(tmp_path: Path) -> None:
    wide = np.full((20, 40), 255, dtype=np.uint8)
    path = write(tmp_path / "wide.dcm", wide, WindowCenter=127.5, WindowWidth=255, VOILUTFunction="LINEAR_EXACT")
    pixels = read_dicom(path, PreprocessConfig(image_size=28)).pixels[0, 0]
    assert (pixels[:7] == 0).all() and (pixels[21:] == 0).all()
    np.testing.assert_allclose(pixels[7:21], 1.0)


def test_non_image_and_non_dicom_files_are_reported(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file at all\n" * 20)
    with pytest.raises(DicomReadError, match="not a DICOM file"):
        read_dicom(text, SMALL)
    rt_plan = Path(pydicom.data.get_testdata_files("rtplan.dcm")[0])
    with pytest.raises(DicomReadError, match="no pixel data"):
        read_dicom(rt_plan, SMALL)
    truncated = tmp_path / "truncated.dcm"
    stored = np.zeros((64, 64), dtype=np.uint16)
    truncated.write_bytes(write(tmp_path / "whole.dcm", stored, bits_stored=12).read_bytes()[:-3000])
    with pytest.raises(DicomReadError, match="pixel data does not match"):
        read_dicom(truncated, SMALL)


def test_an_unsupported_transfer_syntax_is_reported_by_name(tmp_path: Path) -> None:
    path = write(tmp_path / "video.dcm", np.zeros((16, 16), dtype=np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" * 16])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomReadError, match=r"unsupported transfer syntax \(MPEG2 Main Profile / Main Level\)"):
        read_dicom(path, SMALL)


def test_fingerprint_is_stable_and_follows_every_setting() -> None:
    assert PreprocessConfig().fingerprint() == PreprocessConfig().fingerprint()
    variants = [
        PreprocessConfig(),
        PreprocessConfig(image_size=64),
        PreprocessConfig(channels=3),
        PreprocessConfig(frames="all"),
        PreprocessConfig(frames=0),
        PreprocessConfig(window_percentiles=(1.0, 99.0)),
    ]
    assert len({config.fingerprint() for config in variants}) == len(variants)


@pytest.mark.parametrize(
    "settings",
    [{"image_size": 4}, {"channels": 2}, {"frames": "first"}, {"frames": -1}, {"window_percentiles": (50, 50)}],
)
def test_preprocess_config_rejects_bad_settings(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"use|need"):
        PreprocessConfig(**settings)  # type: ignore[arg-type]
