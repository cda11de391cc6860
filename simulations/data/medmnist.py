"""Real federations from MedMNIST: ``.npz`` files -> hospital folders of Secondary Capture DICOM + labels.csv.

Each ``.npz`` is one diagnostic task (``pneumoniamnist.npz`` -> task ``pneumonia``, labels ``pneumonia:0``,
``pneumonia:1``). With several files each hospital gets one task, round-robin or as ``task_per_hospital``
says, and each task's images are partitioned among its hospitals:

- ``iid``: a uniform random split;
- ``dirichlet``: per class, shares drawn from Dirichlet(alpha), so class balance differs per hospital;
- ``site-shift``: a uniform split, then per-hospital intensity, contrast, noise, blur and resolution
  changes applied to the pixels before writing, as if each hospital had its own scanner.

:func:`import_novel_classes` writes a label-set-shift federation from one file instead: each hospital
sees only its own few classes at its own prevalence, under its own scanner (and, for RGB images, stain)
shift, and the held-out hospitals each have at least one class that no training hospital has.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from shared.atomic import atomic_write_json
from shared.data.federation import HELDOUT_FOLDER, hospital_name
from shared.data.site_keys import write_site_secret
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


@dataclass(frozen=True)
class StainShift:
    """How one hospital's slide staining and microscope light differ, for RGB images: each channel's optical
    density is scaled (more or less dye; Beer-Lambert, so intensity ``I -> I ** density``), then multiplied
    by the illuminant's colour. A single-channel model sees it through the BT.601 luma the DICOM reader
    computes, as a change of intensity and of contrast between nucleus and cytoplasm."""

    density: tuple[float, ...]  # per R, G, B
    illuminant: tuple[float, ...]

    def apply(self, images: np.ndarray) -> np.ndarray:
        """``uint8 [N, H, W, 3]`` -> stained ``uint8 [N, H, W, 3]``."""
        pixels = np.asarray(self.illuminant) * (images.astype(np.float64) / 255) ** np.asarray(self.density)
        return np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def stain_shift(hospital_index: int, seed: int) -> StainShift:
    rng = np.random.default_rng([seed, hospital_index, 13])
    return StainShift(
        density=tuple(float(d) for d in rng.uniform(0.6, 1.6, size=3)),
        illuminant=tuple(float(g) for g in rng.uniform(0.85, 1.1, size=3)),
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
    _refuse_written(folders)
    rng = np.random.default_rng(seed)
    for name, task in tasks.items():
        members = [h for h, assigned in enumerate(assignment) if assigned == name]
        parts = partition_indices(task.labels, len(members), partition, alpha, rng)
        for h, indices in zip(members, parts, strict=True):
            if max_per_hospital is not None and len(indices) > max_per_hospital:
                indices = np.sort(rng.choice(indices, size=max_per_hospital, replace=False))
            images = task.images[indices]
            if partition == "site-shift":
                images = site_shift(h, seed).apply(images, np.random.default_rng([seed, h, 11]))
            _write_hospital(folders[h], task, indices, images, seed, h)
    return folders


@dataclass(frozen=True)
class NovelClassPlan:
    """Which classes each hospital has; class ids are the .npz labels."""

    novel: tuple[int, ...]  # in held-out hospitals only
    training: tuple[tuple[int, ...], ...]
    heldout: tuple[tuple[int, ...], ...]  # each has at least one novel class


def novel_class_plan(
    classes: Sequence[int],
    hospitals: int,
    heldout: int,
    classes_per_hospital: tuple[int, int],
    novel_classes: int,
    seed: int,
) -> NovelClassPlan:
    """Draw ``novel_classes`` classes to hold out, then each hospital's own ``A-B`` classes: a training
    hospital's from the others, a held-out hospital's with at least one novel class (the rest from the
    novel classes and those some training hospital has)."""
    low, high = classes_per_hospital
    known_count = len(classes) - novel_classes
    if not 1 <= novel_classes < len(classes):
        raise UserError(
            f"--novel-classes {novel_classes}: hold out 1 to {len(classes) - 1} of the file's {len(classes)} classes"
        )
    if not 2 <= low <= high <= known_count:
        raise UserError(
            f"--classes-per-hospital {low}-{high}: a training hospital draws from the {known_count} classes that "
            f"are not novel and needs 2 or more; choose A-B with 2 <= A <= B <= {known_count}"
        )
    if hospitals < 1 or heldout < 1:
        raise UserError(f"{hospitals} training and {heldout} held-out hospitals: the setting needs at least 1 of each")
    rng = np.random.default_rng([seed, 12])
    novel = np.sort(rng.choice(np.asarray(classes), size=novel_classes, replace=False))
    known = np.setdiff1d(classes, novel)

    def draw(pool: np.ndarray, first: int) -> tuple[int, ...]:
        rest = rng.choice(np.setdiff1d(pool, [first]), size=int(rng.integers(low, high + 1)) - 1, replace=False)
        return tuple(sorted(int(c) for c in (first, *rest)))

    # Each hospital's first class cycles through the pool, so every class is used once there are enough hospitals.
    training = tuple(draw(known, int(known[h % len(known)])) for h in range(hospitals))
    trained = np.unique(np.concatenate(training))
    return NovelClassPlan(
        novel=tuple(int(c) for c in novel),
        training=training,
        heldout=tuple(draw(np.union1d(trained, novel), int(novel[h % len(novel)])) for h in range(heldout)),
    )


def label_set_partition(
    labels: np.ndarray, label_sets: Sequence[tuple[int, ...]], images_per_hospital: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sorted image indices for each hospital, only of its own classes, no image in two hospitals.

    A hospital's prevalence is half uniform, half Dirichlet(1) over its classes, so every class has at least
    half its uniform share; a class wanted by more hospitals than it has images is scaled down for all of them.
    """
    wanted = []  # per hospital: images wanted of each of its classes
    for label_set in label_sets:
        prevalence = 0.5 / len(label_set) + 0.5 * rng.dirichlet(np.ones(len(label_set)))
        wanted.append(dict(zip(label_set, images_per_hospital * prevalence, strict=True)))
    parts: list[list[np.ndarray]] = [[] for _ in label_sets]
    for label in sorted({c for label_set in label_sets for c in label_set}):
        members = rng.permutation(np.flatnonzero(labels == label))
        takers = [h for h, shares in enumerate(wanted) if label in shares]
        demand = np.array([wanted[h][label] for h in takers])
        counts = np.floor(demand * min(1.0, len(members) / demand.sum())).astype(int)
        for h, piece in zip(takers, np.split(members, np.cumsum(counts))[:-1], strict=True):
            parts[h].append(piece)
    return [np.sort(np.concatenate(part)) for part in parts]


def import_novel_classes(
    npz: Path,
    out_dir: Path,
    hospitals: int,
    heldout: int,
    classes_per_hospital: tuple[int, int] = (3, 4),
    novel_classes: int = 2,
    seed: int = 0,
    images_per_hospital: int = 400,
) -> NovelClassPlan:
    """Write ``out_dir/hospital-NNN`` (training) and ``out_dir/heldout/hospital-NNN`` with the label sets of
    :func:`novel_class_plan`, each hospital under its own stain (RGB files) and scanner shift, and
    ``out_dir/label-sets.json`` naming every hospital's classes."""
    task = load_task(npz)
    plan = novel_class_plan(np.unique(task.labels), hospitals, heldout, classes_per_hospital, novel_classes, seed)
    folders = [out_dir / hospital_name(h) for h in range(hospitals)]
    folders += [out_dir / HELDOUT_FOLDER / hospital_name(h) for h in range(heldout)]
    _refuse_written(folders)
    parts = label_set_partition(
        task.labels, plan.training + plan.heldout, images_per_hospital, np.random.default_rng([seed, 14])
    )
    for h, (folder, indices) in enumerate(zip(folders, parts, strict=True)):
        images = task.images[indices]
        if images.ndim == 4:
            images = stain_shift(h, seed).apply(images)
        images = site_shift(h, seed).apply(images, np.random.default_rng([seed, h, 11]))
        _write_hospital(folder, task, indices, images, seed, h)

    def names(classes: tuple[int, ...]) -> list[str]:
        return [task.label_name(c) for c in classes]

    atomic_write_json(
        out_dir / "label-sets.json",
        {
            "novel": names(plan.novel),
            "training": {hospital_name(h): names(c) for h, c in enumerate(plan.training)},
            HELDOUT_FOLDER: {hospital_name(h): names(c) for h, c in enumerate(plan.heldout)},
        },
    )
    return plan


def _refuse_written(folders: list[Path]) -> None:
    taken = [folder for folder in folders if folder.exists() and any(folder.iterdir())]
    if taken:
        raise UserError(f"{taken[0]} already exists and is not empty; choose another --out or remove it")


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
    images: np.ndarray,
    seed: int,
    hospital_index: int,
) -> None:
    """Write ``images`` (the task's images at ``indices``, shifted or not) and their labels.csv."""
    folder.mkdir(parents=True, exist_ok=True)
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
