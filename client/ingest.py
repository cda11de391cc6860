"""``fedmeta ingest HOSPITAL_DIR``: read a hospital folder into the cache and say what was used and skipped."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.data.dicom import PreprocessConfig
from shared.data.hospital_folder import IngestReport, NoUsableImagesError, load_hospital


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest", help="read a hospital folder of DICOM files into the cache and report what was skipped"
    )
    parser.add_argument("hospital_dir", type=Path, metavar="HOSPITAL_DIR")
    parser.add_argument("--json", action="store_true", help="print the ingest report as one JSON object")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--frames", default="middle", help="'middle' (default), 'all', or a 0-based frame index")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: HOSPITAL_DIR/.fedmeta/cache")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    preprocess = PreprocessConfig(
        image_size=args.image_size,
        channels=args.channels,
        frames=int(args.frames) if args.frames.isdigit() else args.frames,
    )
    try:
        report = load_hospital(args.hospital_dir, preprocess, cache_dir=args.cache_dir, progress=not args.json).report
    except NoUsableImagesError as err:
        print(err.report.to_json() if args.json else summary(err.report))
        raise
    print(report.to_json() if args.json else summary(report))
    return 0


def summary(report: IngestReport) -> str:
    """The report as a short table: counts, images by modality and label, skipped files by reason, warnings."""
    lines = [
        f"files {report.files}, decoded {report.decoded} ({report.from_cache} from cache), images {report.images}, "
        f"skipped {len(report.skipped)}, {report.seconds:.2f} s"
    ]
    for title, counts in (
        ("images by modality", report.images_by_modality),
        ("images by label", report.images_by_label),
        ("skipped by reason", report.skipped_by_reason),
    ):
        if counts:
            lines.append(f"\n{title}")
            lines += [f"  {count:>6}  {name}" for name, count in counts.items()]
    if report.warnings:
        lines.append("\nwarnings")
        lines += [f"  {warning}" for warning in report.warnings]
    return "\n".join(lines)
