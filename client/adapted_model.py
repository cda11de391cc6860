"""A hospital's adapted model on disk: one folder, no pickle.

``MODEL_OUT/adapted-model.safetensors`` holds the weights and, in the safetensors header's metadata,
everything prediction needs: the format name and version, the label names, the architecture, the
preprocessing settings with their fingerprint and the modalities of the scans it was adapted on (DICOM
Modality defined terms, PS3.3 C.7.3.1.1.1; absent from models written before they were recorded, which
then accept any image modality). ``MODEL_OUT/model-card.json`` is the human record of how
the model was made and how well it did (``fedmeta adapt`` writes it; prediction never reads it).

Loading checks the format version and that this fedmeta's DICOM reader gives the pixels the model was
trained on (the preprocessing fingerprint includes the reader version); anything else is refused with a
one-line :class:`UserError`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from shared.atomic import atomic_write, atomic_write_json
from shared.config import MamlConfig, ModelConfig
from shared.data.dicom import PreprocessConfig
from shared.errors import UserError
from shared.learning.maml import MetaLearner, Params
from shared.learning.models import build_model

FORMAT = "fedmeta-adapted-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "adapted-model.safetensors"
CARD_FILE = "model-card.json"
PREDICT_BATCH = 256
MODALITY_TERM = re.compile(r"[A-Z0-9_]{1,16}|unknown")  # a Modality (CS) defined term, or the reader's 'unknown'


@dataclass(frozen=True, eq=False)
class AdaptedModel:
    params: Params
    label_names: tuple[str, ...]
    model: ModelConfig
    preprocess: PreprocessConfig
    modalities: tuple[str, ...] = ()  # Modality of the scans adapted on; () when not recorded (accept any image)

    def header(self) -> dict[str, Any]:
        return {
            "label_names": list(self.label_names),
            "model": dataclasses.asdict(self.model),
            "preprocess": dataclasses.asdict(self.preprocess),
            "preprocess_fingerprint": self.preprocess.fingerprint(),
            "modalities": list(self.modalities),
        }

    @cached_property
    def learner(self) -> MetaLearner:
        return MetaLearner(build_model(self.model), MamlConfig())

    def probabilities(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class probabilities ``[N, classes]`` for model-ready images ``[N, C, H, W]``."""
        images = torch.as_tensor(images)
        if not len(images):
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        with torch.no_grad():
            batches = [self.learner.logits(self.params, batch).softmax(-1) for batch in images.split(PREDICT_BATCH)]
        return torch.cat(batches).numpy()


def check_model_folder(folder: Path) -> None:
    """Refuse a folder that is neither new, empty, nor an adapted model's (which is replaced)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; --out names a folder to write the adapted model in")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / WEIGHTS_FILE).exists():
        raise UserError(f"{folder} is not empty and holds no adapted model; choose a new or empty --out folder")


def save_adapted_model(folder: Path, model: AdaptedModel, card: dict[str, Any]) -> Path:
    """Write the weights (with the header) and the card; returns the weights file."""
    check_model_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "header": json.dumps(model.header())}
    tensors = {name: p.detach().float().contiguous() for name, p in model.params.items()}
    encoded = save(tensors, metadata=metadata)
    atomic_write(folder / WEIGHTS_FILE, lambda f: f.write(encoded))
    atomic_write_json(folder / CARD_FILE, card)
    return folder / WEIGHTS_FILE


def load_adapted_model(path: Path) -> AdaptedModel:
    """Read a model written by :func:`save_adapted_model` (its folder or its weights file), checked."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    fix = "pass the folder written by fedmeta adapt --out"
    if not weights.is_file():
        raise UserError(f"{weights} does not exist; {fix}")
    try:
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata() or {}
            params = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception:
        raise UserError(f"{weights} is not a readable safetensors file (damaged or truncated); {fix}") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{weights} is not a fedmeta adapted model (no '{FORMAT}' header); {fix}")
    version = metadata.get("format_version", "")
    if version != str(FORMAT_VERSION):
        newer = version.isdigit() and int(version) > FORMAT_VERSION
        raise UserError(
            f"{weights} has adapted-model format version {version or 'none'} and this fedmeta reads version "
            f"{FORMAT_VERSION}; "
            + ("upgrade fedmeta to use it" if newer else "re-run fedmeta adapt with this fedmeta to rewrite it")
        )
    try:
        header = json.loads(metadata["header"])
        preprocess_settings = dict(header["preprocess"])
        preprocess_settings["window_percentiles"] = tuple(preprocess_settings["window_percentiles"])
        modalities = header.get("modalities", [])  # older models: not recorded
        if not isinstance(modalities, list) or not all(MODALITY_TERM.fullmatch(str(m)) for m in modalities):
            raise ValueError("modalities")
        model = AdaptedModel(
            params=params,
            label_names=tuple(str(name) for name in header["label_names"]),
            model=ModelConfig(**header["model"]),
            preprocess=PreprocessConfig(**preprocess_settings),
            modalities=tuple(str(m) for m in modalities),
        )
        fingerprint = str(header["preprocess_fingerprint"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{weights} has a damaged header; re-run fedmeta adapt to rewrite it") from None
    if model.preprocess.fingerprint() != fingerprint:
        raise UserError(
            f"{weights} was trained on scans preprocessed with fingerprint {fingerprint[:12]}, but this fedmeta's "
            f"DICOM reader gives {model.preprocess.fingerprint()[:12]} for its settings (the reader changed); "
            "re-run fedmeta adapt with this fedmeta so that training and prediction see the same pixels"
        )
    expected = {name: tuple(p.shape) for name, p in build_model(model.model).named_parameters()}
    found = {name: tuple(p.shape) for name, p in params.items()}
    if found != expected or model.model.n_way != len(model.label_names):
        raise UserError(f"{weights} holds weights that do not match its architecture header; re-run fedmeta adapt")
    return model
