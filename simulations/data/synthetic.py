"""Synthetic hospitals: folders of valid DICOM files with a learnable few-shot task and per-site shift.

Each image is a noisy "anatomy" (a body ellipse with organs and smooth texture) that may carry a lesion:
a bright round ``nodule``, a ``ring``, a linear ``streak``, or nothing (``normal``). Most hospitals
classify a subset of those (2 to 4 classes); some classify nodule size instead (``large-nodule`` vs
``small-nodule``), a different task. Each hospital has its own scanner (modality, SOP class, transfer
syntax, photometric interpretation) and its own shift: contrast, brightness, noise, blur, native
resolution and aspect, stored-value calibration (CT rescale, window) and class balance.

Everything follows from ``(seed, hospital index[, image index])``, so a hospital can be created lazily
on first use, and the same seed gives the same bytes. That includes the hospital's site secret (which keys
its splits): a simulated hospital gets one derived from the seed, so a seeded run repeats itself, where a
real hospital draws its own at random. Patient names, ids, dates and institutions are
synthetic but present, so privacy tests have something to look for.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import hmac
import io
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
)

from shared.config import FedMetaConfig
from shared.data.federation import HELDOUT_FOLDER, federation_dir, hospital_name
from shared.data.site_keys import write_site_secret
from shared.errors import UserError
from simulations.data.dicom_write import StudyIdentity, write_image

LESIONS = ("normal", "nodule", "ring", "streak")
SIZE_TASK = ("large-nodule", "small-nodule")


@dataclass(frozen=True)
class Scanner:
    modality: str
    sop_class: UID
    transfer_syntax: UID
    photometric: str
    bits_stored: int
    frames: int = 1


SCANNERS = (
    Scanner("CT", CTImageStorage, ExplicitVRLittleEndian, "MONOCHROME2", 12),
    Scanner("DX", DigitalXRayImageStorageForPresentation, RLELossless, "MONOCHROME1", 12),
    Scanner("MR", MRImageStorage, JPEG2000Lossless, "MONOCHROME2", 12),
    Scanner("CR", ComputedRadiographyImageStorage, ExplicitVRBigEndian, "MONOCHROME2", 10),
    Scanner("US", UltrasoundMultiFrameImageStorage, ImplicitVRLittleEndian, "RGB", 8, frames=3),
)


@dataclass(frozen=True)
class SiteProfile:
    """One hospital's scanner, task and shift; ``site_profile`` derives it from the seed and hospital index."""

    hospital_index: int
    scanner: Scanner
    label_names: tuple[str, ...]
    class_weights: tuple[float, ...]
    default_images: int
    rows: int
    columns: int
    gamma: float  # tissue contrast: density ** gamma
    brightness: float
    noise: float  # std of additive noise, in density units
    blur: float  # Gaussian sigma in native pixels
    calibration: float  # stored-value gain (or, for RGB, the tint's strength)
    window: tuple[float, float]  # VOI window as (center, width) in density units
    rescale_slope: float  # CT only


def site_profile(hospital_index: int, seed: int) -> SiteProfile:
    rng = np.random.default_rng([seed, hospital_index, 0])
    if rng.random() < 0.2:
        label_names = SIZE_TASK
    else:
        label_names = tuple(sorted(rng.choice(LESIONS, size=int(rng.integers(2, 5)), replace=False).tolist()))
    size = int(rng.choice([64, 96, 128, 160, 192, 256]))
    aspect = float(rng.choice([1.0, 1.0, 0.8, 1.25]))
    return SiteProfile(
        hospital_index=hospital_index,
        scanner=SCANNERS[hospital_index % len(SCANNERS)],
        label_names=label_names,
        class_weights=tuple(rng.dirichlet(np.full(len(label_names), 2.0)).tolist()),
        default_images=int(rng.integers(150, 301)),
        rows=size,
        columns=max(32, round(size * aspect)),
        gamma=float(rng.uniform(0.7, 1.4)),
        brightness=float(rng.uniform(-0.08, 0.08)),
        noise=float(rng.uniform(0.01, 0.07)),
        blur=float(rng.uniform(0.0, 1.5)) * size / 128,
        calibration=float(rng.uniform(0.6, 1.0)),
        window=(float(rng.uniform(0.4, 0.5)), float(rng.uniform(0.55, 0.85))),
        rescale_slope=float(rng.choice([1.0, 0.5])),
    )


HELDOUT_SEED_OFFSET = 7919  # held-out sites come from their own seed stream


def simulated_site_secret(seed: int, hospital_index: int, source: str = "synthetic") -> bytes:
    """A simulated hospital's site secret: HMAC-SHA256 keyed by the seed (and data source) of the hospital index."""
    return hmac.new(f"fedmeta {source} seed {seed}".encode(), str(hospital_index).encode(), hashlib.sha256).digest()


def write_synthetic_federation(
    cfg: FedMetaConfig, hospitals: int, progress: Callable[[int, int], None] | None = None
) -> None:
    """A simulation's hospitals, written before it starts (the apps only read hospital folders): training
    hospitals 0..N-1 and ``data.heldout-hospitals`` held-out ones from their own seed stream, in
    ``data.federation-dir``. Hospitals already there are kept. ``progress(done, total)`` after each."""
    root = federation_dir(cfg)
    jobs = [(root, i, cfg.seed) for i in range(hospitals)]
    jobs += [(root / HELDOUT_FOLDER, i, cfg.seed + HELDOUT_SEED_OFFSET) for i in range(cfg.data.heldout_hospitals)]
    for done, (folder, index, seed) in enumerate(jobs, start=1):
        write_synthetic_hospital(folder, index, seed)
        if progress is not None:
            progress(done, len(jobs))


def write_synthetic_hospital(out_dir: str | Path, hospital_index: int, seed: int, n_images: int | None = None) -> Path:
    """Create ``out_dir/hospital-NNN`` (DICOM files, labels.csv and its site secret) unless it exists; return
    its path.

    The folder appears whole or not at all (written aside, then renamed), so concurrent or killed
    creators never leave half a hospital.
    """
    out_dir = Path(out_dir)
    folder = out_dir / hospital_name(hospital_index)
    if folder.exists():
        return folder
    profile = site_profile(hospital_index, seed)
    n_images = profile.default_images if n_images is None else n_images
    if n_images < 2 * len(profile.label_names):
        raise UserError(f"{n_images} images are too few for {len(profile.label_names)} classes; ask for more")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".tmp-{folder.name}-{secrets.token_hex(4)}"
    try:
        _write_hospital(staging, profile, seed, n_images)
        write_site_secret(staging, simulated_site_secret(seed, hospital_index))
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.exists():
                raise  # a concurrent creator won the rename otherwise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_hospital(folder: Path, profile: SiteProfile, seed: int, n_images: int) -> None:
    rng = np.random.default_rng([seed, profile.hospital_index, 1])
    labels = _class_counts(rng, profile, n_images)
    rng.shuffle(labels)
    n_patients = max(2, n_images // int(rng.integers(2, 5)))
    patients = rng.integers(0, n_patients, size=n_images)
    rows = []
    for image_index, (label, patient) in enumerate(zip(labels, patients, strict=True)):
        relpath = f"study-{patient:04d}/image-{image_index:04d}.dcm"
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        identity = _identity(seed, profile.hospital_index, int(patient))
        _write_scan(folder / relpath, profile, profile.label_names[label], identity, seed, image_index)
        rows.append((relpath, profile.label_names[label], identity.patient_id, ""))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("file", "label", "patient_id", "split"))
    writer.writerows(rows)
    (folder / "labels.csv").write_text(buffer.getvalue())


def _class_counts(rng: np.random.Generator, profile: SiteProfile, n_images: int) -> np.ndarray:
    """Class index per image: at least a quarter of a fair share per class, the rest by the site's class balance."""
    n_classes = len(profile.label_names)
    floor = max(2, n_images // (4 * n_classes))
    counts = floor + rng.multinomial(n_images - floor * n_classes, profile.class_weights)
    return np.repeat(np.arange(n_classes), counts)


def _identity(seed: int, hospital_index: int, patient: int) -> StudyIdentity:
    rng = np.random.default_rng([seed, hospital_index, 2, patient])
    return StudyIdentity(
        patient_name=f"SYNTHETIC^PATIENT{hospital_index:03d}X{patient:04d}",
        patient_id=f"SYN{seed}H{hospital_index:03d}P{patient:04d}",
        birth_date=f"19{rng.integers(30, 99)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        sex=str(rng.choice(["F", "M", "O"])),
        study_date=f"20{rng.integers(15, 24)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        institution=f"Synthetic General Hospital {hospital_index}",
        accession_number=f"ACC{hospital_index:03d}{patient:05d}",
    )


def _write_scan(
    path: Path, profile: SiteProfile, label: str, identity: StudyIdentity, seed: int, image_index: int
) -> None:
    rng = np.random.default_rng([seed, profile.hospital_index, 3, image_index])
    scanner = profile.scanner
    anatomy = _anatomy(rng, profile.rows, profile.columns)
    lesion = _lesion(rng, label, profile.rows, profile.columns)
    # Multi-frame scanners show the lesion fully on the middle frame and faintly on the others.
    strengths = [1.0 if frame == scanner.frames // 2 else 0.3 for frame in range(scanner.frames)]
    density = np.stack([_acquire(rng, anatomy + strength * lesion, profile) for strength in strengths])
    stored, attributes = _store(density if scanner.frames > 1 else density[0], profile)
    write_image(
        path,
        stored,
        sop_class=scanner.sop_class,
        modality=scanner.modality,
        transfer_syntax=scanner.transfer_syntax,
        photometric=scanner.photometric,
        bits_stored=scanner.bits_stored,
        identity=identity,
        series=(str(seed), str(profile.hospital_index), identity.patient_id),
        instance=(str(image_index),),
        attributes=attributes,
    )


def _grid(rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in units of the longer side, origin at the image centre."""
    scale = max(rows, columns)
    y = (np.arange(rows)[:, None] + 0.5 - rows / 2) / scale
    x = (np.arange(columns)[None, :] + 0.5 - columns / 2) / scale
    return y, x


def _anatomy(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    y, x = _grid(rows, columns)
    half_height, half_width = rows / max(rows, columns) / 2, columns / max(rows, columns) / 2
    body = _soft_ellipse(y, x, 0, 0, half_height * rng.uniform(0.75, 0.92), half_width * rng.uniform(0.75, 0.92))
    density = 0.05 + 0.35 * body
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(-0.2, 0.2, size=2) * (half_height * 2, half_width * 2)
        organ = _soft_ellipse(y, x, cy, cx, *rng.uniform(0.06, 0.16, size=2))
        density += rng.uniform(-0.15, 0.2) * organ * body
    texture = gaussian_blur(rng.standard_normal((rows, columns)), max(rows, columns) / 24)
    density += 0.04 * texture / (texture.std() + 1e-9) * body
    return density


def _soft_ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    radius = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return 1.0 / (1.0 + np.exp((radius - 1.0) * 12.0))


def _lesion(rng: np.random.Generator, label: str, rows: int, columns: int) -> np.ndarray:
    y, x = _grid(rows, columns)
    cy, cx = rng.uniform(-0.18, 0.18, size=2) * (rows / max(rows, columns), columns / max(rows, columns))
    radius = {"small-nodule": rng.uniform(0.05, 0.07), "large-nodule": rng.uniform(0.11, 0.15)}.get(
        label, rng.uniform(0.08, 0.12)
    )
    distance = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / radius
    amplitude = rng.uniform(0.25, 0.4)
    if label in ("nodule", "small-nodule", "large-nodule"):
        return amplitude * np.exp(-1.5 * distance**2)
    if label == "ring":
        return amplitude * np.exp(-((distance - 1.0) ** 2) / (2 * 0.18**2))
    if label == "streak":
        angle = rng.uniform(0, np.pi)
        along = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / radius
        across = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / radius
        return amplitude * np.exp(-0.5 * (across / 0.25) ** 2 - (np.maximum(np.abs(along) - 2.5, 0) / 0.3) ** 2)
    return np.zeros_like(distance)


def _acquire(rng: np.random.Generator, density: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """What this site's scanner makes of the tissue: its contrast, brightness, blur and noise."""
    seen = np.clip(density, 0, 1) ** profile.gamma + profile.brightness
    if profile.blur > 0.3:
        seen = gaussian_blur(seen, profile.blur)
    return np.clip(seen + rng.normal(0, profile.noise, size=seen.shape), 0, 1)


def _store(density: np.ndarray, profile: SiteProfile) -> tuple[np.ndarray, dict[str, object]]:
    """Stored pixel values and the elements that say how to display them, per the scanner's conventions."""
    scanner = profile.scanner
    center, width = profile.window
    if scanner.modality == "CT":
        intercept, slope = -1024.0, profile.rescale_slope
        hounsfield = -1000 + 2000 * density
        stored = np.rint((hounsfield - intercept) / slope).astype(np.uint16)
        return stored, {
            "RescaleIntercept": intercept,
            "RescaleSlope": slope,
            "RescaleType": "HU",
            "WindowCenter": round(-1000 + 2000 * center, 1),
            "WindowWidth": round(2000 * width, 1),
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        }
    if scanner.photometric == "RGB":
        tint = np.array([1.0, 0.85 + 0.15 * profile.calibration, 0.7 + 0.3 * profile.calibration])
        stored = np.rint(density[..., None] * tint * 255).astype(np.uint8)
        return stored, {"FrameTime": 33.3, "FrameIncrementPointer": "FrameTime", "ImageType": ["ORIGINAL", "PRIMARY"]}
    full_scale = (2**scanner.bits_stored - 1) * profile.calibration
    if scanner.photometric == "MONOCHROME1":
        stored = np.rint((1 - density) * full_scale).astype(np.uint16)
        window = {"WindowCenter": round(full_scale * (1 - center), 1), "WindowWidth": round(full_scale * width, 1)}
        return stored, window | {"PresentationLUTShape": "INVERSE", "ImageType": ["ORIGINAL", "PRIMARY"]}
    stored = np.rint(density * full_scale).astype(np.uint16)
    return stored, {"ImageType": ["ORIGINAL", "PRIMARY"]}


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    rows, columns = image.shape
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(columns)[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(image) * transfer, s=image.shape)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo-data", help="write synthetic hospital folders of DICOM files")
    parser.add_argument("--out", type=Path, required=True, help="folder to create hospital-000, hospital-001, ... in")
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=None, help="images per hospital (default: 150-300, per site)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.hospitals < 1:
        raise UserError(f"--hospitals {args.hospitals}: ask for at least one hospital")
    for index in range(args.hospitals):
        folder = write_synthetic_hospital(args.out, index, args.seed, args.images)
        profile = site_profile(index, args.seed)
        n_files = sum(1 for _ in folder.rglob("*.dcm"))
        scanner = profile.scanner
        print(
            f"{folder}: {n_files} {scanner.modality} files ({scanner.transfer_syntax.name}, {scanner.photometric}, "
            f"{profile.rows}x{profile.columns}), labels {', '.join(profile.label_names)}"
        )
    return 0
