"""``fedmeta bench ingest``: first-pass vs cached ingest throughput of a synthetic hospital."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.data.dicom import PreprocessConfig
from shared.data.hospital_folder import HospitalData, load_hospital
from simulations.data.synthetic import site_profile, write_synthetic_hospital


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--files", type=int, default=1000, help="DICOM files in the synthetic hospital")
    parser.add_argument("--hospital-index", type=int, default=0, help="which synthetic site (scanner) to write")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    preprocess = PreprocessConfig(image_size=args.image_size, channels=args.channels)
    scanner = site_profile(args.hospital_index, args.seed).scanner
    with tempfile.TemporaryDirectory(prefix="fedmeta-bench-ingest-") as tmp:
        started = time.perf_counter()
        folder = write_synthetic_hospital(Path(tmp), args.hospital_index, args.seed, n_images=args.files)
        generate_s = time.perf_counter() - started
        first_data = load_hospital(folder, preprocess)
        cached_data = load_hospital(folder, preprocess)
    first, cached = first_data.report, cached_data.report
    return {
        "benchmark": "ingest",
        "files": first.files,
        "images": first.images,
        "scanner": f"{scanner.modality}, {scanner.transfer_syntax.name}",
        "image_size": args.image_size,
        "channels": args.channels,
        "generate_s": round(generate_s, 3),
        "first_pass_s": round(first.seconds, 3),
        "first_pass_files_per_s": round(first.files / first.seconds, 1),
        "cached_s": round(cached.seconds, 4),
        "cached_files_per_s": round(cached.files / cached.seconds, 1),
        "first_pass_from_cache": first.from_cache,
        "cached_from_cache": cached.from_cache,
        "cached_identical": _same_data(first_data, cached_data),
        "speedup": round(first.seconds / cached.seconds, 1),
        "target_speedup": 10,
    }


def _same_data(a: HospitalData, b: HospitalData) -> bool:
    """Whether the cached pass gave back exactly what the first pass read."""
    return (
        np.array_equal(a.images, b.images)
        and np.array_equal(a.labels, b.labels)
        and np.array_equal(a.splits, b.splits)
        and a.record_ids == b.record_ids
        and a.patient_keys == b.patient_keys
        and a.label_names == b.label_names
    )
