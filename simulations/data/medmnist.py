"""Real federations from MedMNIST: ``.npz`` files -> hospital folders of Secondary Capture DICOM + labels.csv.

Each ``.npz`` is one diagnostic task (``pneumoniamnist.npz`` -> task ``pneumonia``, labels ``pneumonia:0``,
``pneumonia:1``). With several files each hospital gets one task, round-robin or as ``task_per_hospital``
says, and each task's images are partitioned among its hospitals:

- ``iid``: a uniform random split;
- ``dirichlet``: per class, shares drawn from Dirichlet(alpha), so class balance differs per hospital;
- ``site-shift``: a uniform split, then per-hospital intensity, contrast, noise, blur and resolution
  changes applied to the pixels before writing, as if each hospital had its own scanner.

The npz split is kept in labels.csv (train and val -> ``train``, test -> ``test``), and file names say
where each image came from (``pneumonia/val/00012.dcm``). Grayscale images are written with a
LINEAR_EXACT window over the full 8-bit range, so the reader gives back ``stored / 255`` exactly. Each
hospital's site secret is derived from ``(seed, hospital index)``, as for synthetic hospitals: an imported
federation is simulation data, and a seeded run on it repeats itself.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from shared.data.federation import hospital_name
from shared.data.hospital_folder import write_site_secret
from shared.errors import UserError
from simulations.data.dicom_write import ANONYMOUS, write_image
from simulations.data.synthetic import gaussian_blur, simulated_site_secret

Partition = Literal["iid", "dirichlet", "site-shift"]
PARTITIONS: tuple[Partition, ...] = ("iid", "dirichlet", "site-shift")
NPZ_SPLITS = {"train": "train", "val": "train", "test": "test"}  # npz split -> labels.csv split


@dataclass(frozen=True, eq=False)
class MedMnistTask:
    name: str  # 'pneumonia' for pneumoniamnist.npz
    images: np.ndarray  # uint8 [N, H, W] or [N, H, W, 3]
    labels: np.ndarray  # int64 [N]
    sources: tuple[str, ...]  # npz split and index of each image: 'val/00012'

    def label_name(self, label: int) -> str:
        return f"{self.name}:{label}"


def load_task(npz: Path) -> MedMnistTask:
    name = npz.stem.removesuffix("mnist") or npz.stem
    try:
        with np.load(npz, allow_pickle=False) as arrays:
            parts = [(split, arrays[f"{split}_images"], arrays[f"{split}_labels"]) for split in NPZ_SPLITS]
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"{npz} is not a MedMNIST .npz (train/val/test _images and _labels); pass a file from medmnist"
        ) from None
    for split, images, labels in parts:
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise UserError(f"{npz}: {split} labels are multi-label {labels.shape}; use a single-label MedMNIST set")
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
            raise UserError(f"{npz}: {split} images are not uint8 [N, H, W(, 3)] matching the labels; re-download it")
    return MedMnistTask(
        name=name,
        images=np.concatenate([images for _, images, _ in parts]),
        labels=np.concatenate([labels.reshape(-1) for _, _, labels in parts]).astype(np.int64),
        sources=tuple(f"{split}/{i:05d}" for split, images, _ in parts for i in range(len(images))),
    )


@dataclass(frozen=True)
class SiteShift:
    """How one hospital's scanner differs: applied to float pixels in [0, 1] before writing."""

    size: int  # pixels per side after resampling
    blur: float  # Gaussian sigma in pixels at that size
    gamma: float
    gain: float
    offset: float
    noise: float

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``uint8 [N, H, W(, 3)]`` -> shifted ``uint8 [N, size, size(, 3)]``."""
        pixels = torch.from_numpy(images.astype(np.float32) / 255)
        channels_last = pixels.ndim == 4
        pixels = pixels.permute(0, 3, 1, 2) if channels_last else pixels[:, None]
        mode = "area" if self.size < pixels.shape[-1] else "bilinear"
        pixels = F.interpolate(pixels, size=(self.size, self.size), mode=mode).numpy().astype(np.float64)
        if self.blur > 0:
            pixels = np.stack([[gaussian_blur(plane, self.blur) for plane in image] for image in pixels])
        pixels = self.gain * np.clip(pixels, 0, 1) ** self.gamma + self.offset
        pixels = np.clip(pixels + rng.normal(0, self.noise, size=pixels.shape), 0, 1)
        pixels = pixels.transpose(0, 2, 3, 1) if channels_last else pixels[:, 0]
        return np.rint(pixels * 255).astype(np.uint8)


def site_shift(hospital_index: int, seed: int) -> SiteShift:
    rng = np.random.default_rng([seed, hospital_index, 10])
    return SiteShift(
        size=int(rng.choice([20, 24, 28, 32, 48, 64])),
        blur=float(rng.choice([0.0, rng.uniform(0.4, 1.2)])),
        gamma=float(rng.uniform(0.7, 1.4)),
        gain=float(rng.uniform(0.75, 1.15)),
        offset=float(rng.uniform(-0.1, 0.1)),
        noise=float(rng.uniform(0.0, 0.06)),
    )


def import_medmnist(
    npz_files: list[Path],
    out_dir: Path,
    hospitals: int,
    partition: Partition = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    max_per_hospital: int | None = None,
    task_per_hospital: list[str] | None = None,
) -> list[Path]:
    """Write ``out_dir/hospital-NNN`` for each hospital; return their paths."""
    if partition not in PARTITIONS:
        raise UserError(f"partition '{partition}' is unknown; use one of {', '.join(PARTITIONS)}")
    if alpha <= 0:
        raise UserError(f"--alpha {alpha}: the Dirichlet concentration must be > 0")
    tasks = {task.name: task for task in map(load_task, npz_files)}
    assignment = _assign_tasks(list(tasks), hospitals, task_per_hospital)
    folders = [out_dir / hospital_name(h) for h in range(hospitals)]
    taken = [folder for folder in folders if folder.exists() and any(folder.iterdir())]
    if taken:
        raise UserError(f"{taken[0]} already exists and is not empty; choose another --out or remove it")
    rng = np.random.default_rng(seed)
    for name, task in tasks.items():
        members = [h for h, assigned in enumerate(assignment) if assigned == name]
        parts = partition_indices(task.labels, len(members), partition, alpha, rng)
        for h, indices in zip(members, parts, strict=True):
            if max_per_hospital is not None and len(indices) > max_per_hospital:
                indices = np.sort(rng.choice(indices, size=max_per_hospital, replace=False))
            shift = site_shift(h, seed) if partition == "site-shift" else None
            _write_hospital(folders[h], task, indices, shift, np.random.default_rng([seed, h, 11]), seed, h)
    return folders


def _assign_tasks(names: list[str], hospitals: int, task_per_hospital: list[str] | None) -> list[str]:
    if task_per_hospital is None:
        if hospitals < len(names):
            raise UserError(f"{len(names)} tasks need at least {len(names)} hospitals; raise --hospitals")
        return [names[h % len(names)] for h in range(hospitals)]
    unknown = sorted(set(task_per_hospital) - set(names))
    if len(task_per_hospital) != hospitals or unknown:
        raise UserError(
            f"--task-per-hospital needs {hospitals} names from {', '.join(names)} "
            f"(got {len(task_per_hospital)}{', unknown: ' + ', '.join(unknown) if unknown else ''})"
        )
    return task_per_hospital


def partition_indices(
    labels: np.ndarray, parts: int, partition: Partition, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sorted image indices for each of ``parts`` hospitals."""
    if partition != "dirichlet":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), parts)]
    shares: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(parts, alpha)))[:-1] * len(members)).astype(int)
        for share, piece in zip(shares, np.split(members, cuts), strict=True):
            share.append(piece)
    return [np.sort(np.concatenate(share)) for share in shares]


def _write_hospital(
    folder: Path,
    task: MedMnistTask,
    indices: np.ndarray,
    shift: SiteShift | None,
    rng: np.random.Generator,
    seed: int,
    hospital_index: int,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images = task.images[indices]
    if shift is not None:
        images = shift.apply(images, rng)
    rows = []
    for index, pixels in zip(indices, images, strict=True):
        source = task.sources[index]
        relpath = f"{task.name}/{source}.dcm"
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        colour = pixels.ndim == 3
        write_image(
            folder / relpath,
            pixels,
            sop_class=SecondaryCaptureImageStorage,
            modality="OT",
            transfer_syntax=ExplicitVRLittleEndian,
            photometric="RGB" if colour else "MONOCHROME2",
            bits_stored=8,
            identity=ANONYMOUS,
            series=(str(seed), str(hospital_index), task.name),
            instance=(source,),
            attributes={"ConversionType": "WSD"}
            | ({} if colour else {"WindowCenter": 127.5, "WindowWidth": 255, "VOILUTFunction": "LINEAR_EXACT"}),
        )
        rows.append((relpath, task.label_name(int(task.labels[index])), NPZ_SPLITS[source.split("/")[0]]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("file", "label", "split"))
    writer.writerows(rows)
    (folder / "labels.csv").write_text(buffer.getvalue())
    write_site_secret(folder, simulated_site_secret(seed, hospital_index, "medmnist"))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import-medmnist", help="turn MedMNIST .npz files into hospital folders")
    parser.add_argument("--npz", type=Path, action="append", required=True, help="a MedMNIST .npz; repeat for more")
    parser.add_argument("--out", type=Path, required=True, help="folder to create hospital-000, ... in")
    parser.add_argument("--hospitals", type=int, required=True)
    parser.add_argument("--partition", choices=PARTITIONS, default="iid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (--partition dirichlet)")
    parser.add_argument("--max-per-hospital", type=int, default=None)
    parser.add_argument(
        "--task-per-hospital",
        type=lambda value: [name.strip() for name in value.split(",")],
        default=None,
        help="comma-separated task per hospital, e.g. pneumonia,breast,pneumonia (default: round-robin)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.hospitals < 1:
        raise UserError(f"--hospitals {args.hospitals}: ask for at least one hospital")
    folders = import_medmnist(
        args.npz,
        args.out,
        args.hospitals,
        partition=args.partition,
        seed=args.seed,
        alpha=args.alpha,
        max_per_hospital=args.max_per_hospital,
        task_per_hospital=args.task_per_hospital,
    )
    for folder in folders:
        with open(folder / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        labels = ", ".join(f"{name} {count}" for name, count in sorted(Counter(row["label"] for row in rows).items()))
        print(f"{folder}: {len(rows)} images ({labels})")
    return 0
