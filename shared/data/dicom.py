"""One DICOM file -> model-ready pixels: float32 ``[F, C, H, W]`` in [0, 1].

The grayscale pipeline follows the standard's order (PS3.4 N.2): Modality LUT (rescale slope and
intercept, or a Modality LUT Sequence), then the VOI LUT (VOI LUT Sequence, else Window Center /
Width) which maps to [0, 1]; without a VOI LUT the image is windowed between two percentiles of its
own values. MONOCHROME1 is inverted so that bright always means dense. PALETTE COLOR is expanded and
YBR converted to RGB. The image is then resized, keeping its aspect ratio, and zero-padded to a square.

Only the elements the pipeline needs are read (``specific_tags``), each named by keyword. Nothing read
here is logged: pydicom's own warnings and log records can quote element values, so they are kept out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from shared.errors import UserError

# Bump when the pixels produced for the same file and config change: it is part of every cache key.
READER_VERSION = 1

FrameSelection = Literal["middle", "all"] | int

_RECORD_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Modality", "PatientID")
_IMAGE_PIXEL_KEYWORDS = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "SharedFunctionalGroupsSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
)
_PALETTE_KEYWORDS = tuple(
    f"{prefix}{colour}PaletteColorLookupTable{part}"
    for colour in ("Red", "Green", "Blue")
    for prefix, part in (("", "Descriptor"), ("", "Data"), ("Segmented", "Data"))
)
_KEYWORDS = _RECORD_KEYWORDS + _IMAGE_PIXEL_KEYWORDS + _PALETTE_KEYWORDS
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")
_BT601_LUMA = np.array([0.299, 0.587, 0.114])

# pydicom's log records (and warnings, silenced per read) can quote element values, PHI among them: they never
# reach the application's handlers. A handler put on the "pydicom" logger itself, for debugging, still gets them.
logging.getLogger("pydicom").propagate = False


class PreprocessConfigError(UserError, ValueError):
    """A preprocessing setting is out of range."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How every scan is turned into model input; part of every cache key."""

    image_size: int = 28
    channels: int = 1
    frames: FrameSelection = "middle"
    window_percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 1024:
            raise PreprocessConfigError(f"image size {self.image_size}: use a value between 8 and 1024")
        if self.channels not in (1, 3):
            raise PreprocessConfigError(f"channels={self.channels}: use 1 (gray) or 3 (colour)")
        if self.frames not in ("middle", "all") and not (isinstance(self.frames, int) and self.frames >= 0):
            raise PreprocessConfigError(f"frames={self.frames!r}: use 'middle', 'all' or a frame index >= 0")
        low, high = self.window_percentiles
        if not 0 <= low < high <= 100:
            raise PreprocessConfigError(f"window percentiles {low}, {high}: need 0 <= low < high <= 100")

    def fingerprint(self) -> str:
        """Stable hash of the settings and the reader version."""
        settings = dataclasses.asdict(self) | {"reader_version": READER_VERSION}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class DicomReadError(UserError):
    """One file could not be turned into an image; ``reason`` and ``fix`` are fixed texts, never tag values."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason}; {fix}")
        self.reason = reason
        self.fix = fix


_REEXPORT = "re-export the file from the PACS or modality, or remove it"


@dataclass(frozen=True, eq=False)
class DicomImage:
    pixels: np.ndarray  # float32 [F, C, H, W] in [0, 1], one image per selected frame
    frames: tuple[int, ...]  # 0-based frame number of each image
    modality: str  # a Modality defined term, or 'unknown'
    sop_instance_uid: str | None = field(repr=False)
    patient_id: str | None = field(repr=False)


@functools.cache
def decoder_versions() -> str:
    """pydicom, its decoder plugins and torch (resize): the same bytes may give other pixels under other versions."""

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    packages = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pillow", "torch")
    return " ".join(f"{package}={version(package)}" for package in packages)


def read_dicom(source: str | Path | bytes, config: PreprocessConfig) -> DicomImage:
    """Decode one file (a path or its bytes); raises :class:`DicomReadError` for anything unusable."""
    with _pydicom_quiet():
        ds = _read_dataset(source)
        if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
            if "Image Storage" in UID(str(ds.get("SOPClassUID") or "")).name:
                raise DicomReadError("an image object without pixel data (truncated or stripped)", _REEXPORT)
            raise DicomReadError(
                "no pixel data: a non-image object (structured report, RT plan, presentation state, ...)",
                "non-image objects are not used; move it out of the hospital folder to silence this",
            )
        frames, pixels = _decode_frames(ds, config)
        # pydicom converts (and may warn about) values on first access: read them while it is silenced
        modality = str(ds.get("Modality") or "")
        sop_instance_uid = str(ds.get("SOPInstanceUID") or "") or None
        patient_id = str(ds.get("PatientID") or "").strip() or None
    return DicomImage(
        pixels=_to_model_input(pixels, config),
        frames=frames,
        modality=modality if _MODALITY.fullmatch(modality) else "unknown",
        sop_instance_uid=sop_instance_uid,
        patient_id=patient_id,
    )


@contextlib.contextmanager
def _pydicom_quiet() -> Iterator[None]:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _read_dataset(source: str | Path | bytes) -> Dataset:
    def read(force: bool) -> Dataset:
        return pydicom.dcmread(
            io.BytesIO(source) if isinstance(source, bytes) else source, force=force, specific_tags=list(_KEYWORDS)
        )

    try:
        try:
            return read(force=False)
        except InvalidDicomError:
            # Some archives write the bare dataset without preamble and file meta; accept it if it parses.
            ds = read(force=True)
    except OSError:
        raise DicomReadError("file could not be read", "check that the file is readable by this user") from None
    except Exception:
        raise DicomReadError("not a DICOM file, or its header is corrupt", _REEXPORT) from None
    if "SOPClassUID" not in ds and not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise DicomReadError("not a DICOM file", "remove it from the hospital folder")
    return ds


def _transfer_syntax(ds: Dataset) -> UID:
    """The declared transfer syntax; for a bare dataset, the encoding it was parsed with (recorded for the decoder)."""
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    if not ds.file_meta.get("TransferSyntaxUID"):
        implicit_vr, little_endian = ds.original_encoding
        if implicit_vr:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    return UID(ds.file_meta.TransferSyntaxUID)


def _decode_frames(ds: Dataset, config: PreprocessConfig) -> tuple[tuple[int, ...], np.ndarray]:
    """Selected frames as ``[F, H, W]`` grayscale in [0, 1] or ``[F, H, W, 3]`` RGB in [0, 1]."""
    syntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        name = syntax.name if syntax.is_transfer_syntax else "an unrecognised transfer syntax"
        raise DicomReadError(
            f"unsupported transfer syntax ({name})", "convert the file to an uncompressed or JPEG transfer syntax"
        ) from None
    if not decoder.is_available:
        raise DicomReadError(
            f"no installed decoder for {syntax.name}",
            "install pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg and pylibjpeg-rle",
        )
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise DicomReadError("Number of Frames is not a number", _REEXPORT) from None
    frames = _select_frames(n_frames, config.frames)
    try:
        decoded = [decoder.as_array(ds, index=i) for i in frames]
    except RuntimeError:
        raise DicomReadError("compressed pixel data could not be decoded (corrupt or truncated)", _REEXPORT) from None
    except Exception:
        raise DicomReadError("pixel data does not match its Image Pixel description", _REEXPORT) from None
    photometric = str(decoded[0][1].get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    stack = np.stack([array for array, _ in decoded])
    if photometric in ("MONOCHROME1", "MONOCHROME2") and stack.ndim == 3:
        return frames, _grayscale(stack, ds, photometric, config.window_percentiles)
    if photometric == "PALETTE COLOR" or (photometric in _RGB_LIKE and stack.ndim == 4 and stack.shape[-1] == 3):
        return frames, _rgb(stack, ds, photometric)
    known = photometric if photometric in _PHOTOMETRIC_TERMS else "an unrecognised value"
    raise DicomReadError(f"unsupported Photometric Interpretation ({known})", "convert the file to MONOCHROME2 or RGB")


_RGB_LIKE = ("RGB", "YBR_FULL", "YBR_FULL_422")
_PHOTOMETRIC_TERMS = frozenset(
    {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422",
     "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"}
)  # fmt: skip


def _select_frames(n_frames: int, selection: FrameSelection) -> tuple[int, ...]:
    if selection == "all":
        return tuple(range(n_frames))
    if selection == "middle":
        return (n_frames // 2,)
    if selection >= n_frames:
        raise DicomReadError(
            f"frame index {selection} does not exist in a file of {n_frames} frame(s)",
            "choose frames 'middle' or 'all', or a smaller frame index",
        )
    return (selection,)


def _grayscale(stored: np.ndarray, ds: Dataset, photometric: str, percentiles: tuple[float, float]) -> np.ndarray:
    _lift_shared_functional_groups(ds)
    try:
        values = apply_modality_lut(stored, ds)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        # A malformed Modality LUT also voids the window, which is in its output units: use percentiles.
        values, windowed = stored, None
    else:
        if not np.isfinite(values).all():
            raise DicomReadError("pixel values are not finite (NaN or infinity)", _REEXPORT)
        windowed = _voi_window(values, ds)
    if windowed is None:
        windowed = _percentile_window(values.astype(np.float64), percentiles)
    return 1.0 - windowed if photometric == "MONOCHROME1" else windowed


def _lift_shared_functional_groups(ds: Dataset) -> None:
    """Enhanced multi-frame objects keep rescale and window in functional groups; pydicom reads the top level."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared:
        return
    for sequence, keywords in (
        ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
        ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
    ):
        items = shared[0].get(sequence)
        if items and not any(keyword in ds for keyword in keywords):
            for keyword in keywords:
                if keyword in items[0]:
                    setattr(ds, keyword, items[0][keyword].value)


def _voi_window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The VOI LUT output scaled to [0, 1], or None when the file has no usable VOI LUT or window."""
    lut_items = ds.get("VOILUTSequence")
    try:
        if lut_items and "LUTDescriptor" in lut_items[0] and "LUTData" in lut_items[0]:
            entries, first_mapped, _ = lut_items[0].LUTDescriptor
            output_range = apply_voi(np.arange(first_mapped, first_mapped + (entries or 2**16)), ds)
            mapped = apply_voi(np.rint(values).astype(np.int64), ds)
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            output_range = apply_windowing(np.array([-np.inf, np.inf]), ds)
            mapped = apply_windowing(values, ds)
        else:
            return None
    except (ValueError, TypeError, IndexError, NotImplementedError):
        return None  # a malformed window is no reason to lose the scan: fall back to percentiles
    bottom, top = float(output_range[0]), float(output_range[-1])
    if bottom == top:
        return None
    return np.clip((mapped.astype(np.float64) - bottom) / (top - bottom), 0.0, 1.0)


def _percentile_window(values: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    low, high = np.percentile(values, percentiles)
    if high <= low:
        low, high = values.min(), values.max()
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _rgb(stack: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stack, ds)
        except Exception:
            raise DicomReadError("PALETTE COLOR image without a usable palette", _REEXPORT) from None
        return rgb / np.iinfo(rgb.dtype).max
    if photometric != "RGB":
        stack = convert_color_space(stack, photometric, "RGB")
    return np.clip(stack / (2 ** int(ds.get("BitsStored") or 8) - 1), 0.0, 1.0)


def images_to_model_input(images: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """8-bit images outside DICOM (a public ``.npz``: ``[N, H, W]`` gray or ``[N, H, W, 3]`` RGB) as the reader
    turns a scan without a VOI window into model input: gray by its percentile window, RGB by its bit depth."""
    if images.ndim == 3:
        pixels = np.stack([_percentile_window(image.astype(np.float64), config.window_percentiles) for image in images])
    else:
        pixels = images / 255.0
    return _to_model_input(pixels, config)


def _to_model_input(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    if pixels.ndim == 3:
        channels = pixels[:, None].repeat(config.channels, axis=1)
    elif config.channels == 1:
        channels = (pixels @ _BT601_LUMA)[:, None]
    else:
        channels = pixels.transpose(0, 3, 1, 2)
    return _resize_square(np.ascontiguousarray(channels, dtype=np.float32), config.image_size)


def _resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``[F, C, H, W]`` so the long side is ``size`` (area when shrinking), then zero-pad to square."""
    tensor = torch.from_numpy(images)
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_height, new_width) != (height, width):
        if scale < 1:
            tensor = F.interpolate(tensor, size=(new_height, new_width), mode="area")
        else:
            tensor = F.interpolate(tensor, size=(new_height, new_width), mode="bilinear", align_corners=False)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    tensor = F.pad(tensor, (left, size - new_width - left, top, size - new_height - top))
    return tensor.clamp_(0.0, 1.0).numpy()
