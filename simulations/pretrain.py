"""``fedmeta pretrain``: a backbone trained centrally on public data the consortium may share (MedMNIST-format
``.npz`` files), saved as a safetensors file that runs start from with ``model.init``.

Every class of every file is one class of a supervised classifier (files do not share labels); only the
backbone is saved, with the model settings it was built for in its metadata: the head's classes are the public
data's, not a hospital's. Images go through the reader's preprocessing (percentile window, luma for a gray
model, resize), so the backbone sees what it will see at a hospital. The same files, settings and seed give the
same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save

from shared.atomic import atomic_write
from shared.config import FedMetaConfig, ModelConfig, parse_assignments
from shared.data.dicom import PreprocessConfig, images_to_model_input
from shared.errors import UserError
from shared.learning.maml import pick_device
from shared.learning.models import BACKBONE_PREFIX, build_model
from shared.learning.pretrained import METADATA_PREFIX, architecture_metadata
from simulations.data.medmnist import load_task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a backbone on public .npz data; runs start from it with --set model.init=FILE",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--npz", type=Path, nargs="+", required=True, help="MedMNIST-format .npz files")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="model.KEY=VALUE", help="model settings")
    parser.set_defaults(handler=_run)


@dataclasses.dataclass(frozen=True)
class PublicData:
    images: torch.Tensor  # [N, C, H, W] model input
    labels: torch.Tensor  # [N], classes numbered across files
    validation: torch.Tensor  # [N] bool: the files' own val split
    names: tuple[str, ...]


def public_data(files: list[Path], model: ModelConfig) -> PublicData:
    preprocess = PreprocessConfig(image_size=model.image_size, channels=model.in_channels)
    images, labels, validation, names, offset = [], [], [], [], 0
    for npz in files:
        if not npz.is_file():
            raise UserError(f"--npz {npz}: no such file; pass MedMNIST-format .npz files")
        task = load_task(npz)
        images.append(torch.from_numpy(images_to_model_input(task.images, preprocess)))
        labels.append(torch.from_numpy(task.labels + offset))
        validation.append(torch.tensor([source.startswith("val/") for source in task.sources]))
        names.append(task.name)
        offset += int(task.labels.max()) + 1
    return PublicData(torch.cat(images), torch.cat(labels), torch.cat(validation), tuple(names))


def pretrain(data: PublicData, model_cfg: ModelConfig, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    """The trained backbone's parameters, and the validation accuracy after each epoch."""
    torch.manual_seed(seed)
    classes = int(data.labels.max()) + 1
    device = pick_device()
    model = build_model(dataclasses.replace(model_cfg, n_way=classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train = torch.nonzero(~data.validation).flatten()
    val = torch.nonzero(data.validation).flatten()
    order = torch.Generator().manual_seed(seed)
    accuracies = []
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in train[torch.randperm(len(train), generator=order)].split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(data.images[batch].to(device)), data.labels[batch].to(device)).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(data.images[b].to(device)).argmax(1).cpu() for b in val.split(1024)])
        accuracies.append(float((predicted == data.labels[val]).float().mean()) if len(val) else float("nan"))
        print(f"fedmeta pretrain: epoch {epoch}/{epochs}, validation accuracy {accuracies[-1]:.3f}", flush=True)
    backbone = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n.startswith(BACKBONE_PREFIX)}
    return {"backbone": backbone, "validation_accuracy": accuracies, "classes": classes}


def _run(args: argparse.Namespace) -> int:
    settings = parse_assignments(args.set, "--set")
    if any(not key.startswith("model.") for key in settings):
        raise UserError("--set: pretrain takes only model.* settings (arch, in-channels, image-size, width)")
    model_cfg = FedMetaConfig.from_flat({**FedMetaConfig().to_flat(), **settings}).model
    data = public_data(args.npz, model_cfg)
    print(
        f"fedmeta pretrain: {len(data.labels)} images, {int(data.labels.max()) + 1} classes from "
        f"{', '.join(data.names)}; {args.epochs} epochs of {model_cfg.arch}-{model_cfg.width}",
        flush=True,
    )
    result = pretrain(data, model_cfg, args.epochs, args.batch_size, args.lr, args.seed)
    metadata = architecture_metadata(model_cfg) | {
        METADATA_PREFIX + "pretrained-on": ",".join(data.names),
        METADATA_PREFIX + "validation-accuracy": f"{result['validation_accuracy'][-1]:.4f}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: f.write(save(result["backbone"], metadata=metadata)))
    print(f"fedmeta pretrain: wrote {args.out}; start a run from it with --set model.init={args.out.resolve()}")
    return 0
