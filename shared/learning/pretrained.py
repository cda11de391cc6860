"""Initial weights from a local safetensors file (``model.init``): public weights a consortium brings
(ImageNet or medical, in torchvision's names or fedmeta's), a backbone pretrained with ``fedmeta pretrain``,
or an earlier run's ``meta-model.safetensors``. Nothing is downloaded.

A file may cover part of the model: what it lacks (usually the head, whose classes are the task's) keeps
its seeded random initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from shared.config import FedMetaConfig, ModelConfig
from shared.errors import UserError
from shared.learning.models import BACKBONE_PREFIX, build_model

Params = dict[str, torch.Tensor]
# What the file's metadata says it was built for, checked against the run's model settings.
ARCHITECTURE_KEYS = ("arch", "in_channels", "image_size", "width")
METADATA_PREFIX = "fedmeta."
# BatchNorm's running statistics and a torchvision classifier: GroupNorm has no statistics, the head is the task's.
SKIPPED_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
SKIPPED_PREFIXES = ("fc.",)


def architecture_metadata(model: ModelConfig) -> dict[str, str]:
    return {METADATA_PREFIX + key: str(getattr(model, key)) for key in ARCHITECTURE_KEYS}


def with_checked_init(cfg: FedMetaConfig) -> FedMetaConfig:
    """``cfg`` with ``model.init`` made absolute and checked to fit the model, so a wrong file fails before a run
    starts and the ServerApp finds it whatever its working directory."""
    if not cfg.model.init:
        return cfg
    cfg = cfg.replace(model={"init": str(Path(cfg.model.init).expanduser().resolve())})
    load_initial_weights(cfg.model, {n: p.detach() for n, p in build_model(cfg.model).named_parameters()})
    return cfg


def load_initial_weights(model: ModelConfig, params: Params) -> Params:
    """``params`` with every tensor ``model.init`` holds for them; raises UserError naming what does not fit."""
    path = Path(model.init).expanduser()
    what = f"model.init={model.init}"
    if not path.is_file():
        raise UserError(f"{what}: no such file; give the absolute path of a local .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{what} is not a readable safetensors file ({err}); save weights with safetensors") from None
    _check_architecture(what, metadata, model)
    loaded = dict(params)
    used = 0
    for key, tensor in tensors.items():
        if key.endswith(SKIPPED_SUFFIXES) or key.startswith(SKIPPED_PREFIXES):
            continue
        name = key if key in params else BACKBONE_PREFIX + key
        if name not in params:
            raise UserError(
                f"{what}: tensor '{key}' matches no parameter of model.arch={model.arch}; "
                "use weights saved for this architecture"
            )
        loaded[name] = _fitted(what, name, tensor, params[name])
        used += 1
    if not used:
        raise UserError(f"{what} holds no parameter of model.arch={model.arch}; use weights saved for it")
    return loaded


def _check_architecture(what: str, metadata: dict[str, str], model: ModelConfig) -> None:
    for key in ARCHITECTURE_KEYS:
        saved = metadata.get(METADATA_PREFIX + key)
        if saved is not None and saved != str(getattr(model, key)):
            setting = "model." + key.replace("_", "-")
            raise UserError(f"{what} was saved for {setting}={saved}, the run has {getattr(model, key)}; set it so")


def _fitted(what: str, name: str, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise UserError(f"{what}: tensor '{name}' has NaN or infinite values; use a sound weights file")
    tensor = tensor.to(param.dtype)
    # An RGB first convolution on a gray model: a gray scan is the same image in all three channels, so the
    # summed filter gives the response the RGB filter gave.
    if tensor.ndim == 4 and param.ndim == 4 and tensor.shape[1] == 3 and param.shape[1] == 1:
        tensor = tensor.sum(1, keepdim=True)
    if tensor.shape != param.shape:
        raise UserError(
            f"{what}: tensor '{name}' has shape {tuple(tensor.shape)}, the model's is {tuple(param.shape)}; "
            "use weights saved for these model settings"
        )
    return tensor.clone()
