"""A run folder's files, named once: the server writes them; adapt, report, simulate and the benchmarks read them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.config import ConfigError, FedMetaConfig
from shared.errors import UserError

if TYPE_CHECKING:
    from shared.learning.maml import Params

METRICS = "metrics.jsonl"
META_MODEL = "meta-model.safetensors"
MODEL_CARD_JSON = "model-card.json"
MODEL_CARD_MD = "MODEL_CARD.md"
HELDOUT_COMPARISON = "heldout-comparison.json"
DEPLOYED = "deployed"  # its variant: what fedmeta adapt deploys (shared.learning.adaptation)
STATUS = "run-status.json"
CHECKPOINTS = "checkpoint"
FEW_SHOT_PLOT = "few-shot.png"
TRAIN_LOSS_PLOT = "train-loss.png"
EPSILON_PLOT = "epsilon.png"
REPLIES = "replies.jsonl"  # with server.capture-replies
# a simulation's: its Flower log, its synthetic hospitals and their state
FLOWER_LOG = "flower.log"
FEDERATION = "federation"
HOSPITAL_STATE = "hospital-state"


@dataclass(frozen=True, eq=False)
class MetaModel:
    params: Params
    cfg: FedMetaConfig
    weights: Path
    sha256: str


def load_meta_model(path: Path) -> MetaModel:
    """The meta-parameters of a run folder (or its ``meta-model.safetensors``) and the run's config."""
    # torch only here: the server and the CLI name run-folder files long before (or without) loading a model
    from safetensors.torch import load

    from shared.learning.maml import MetaLearner
    from shared.learning.models import build_model

    path = Path(path)
    weights = path / META_MODEL if path.is_dir() else path
    card = weights.parent / MODEL_CARD_JSON
    if not weights.is_file():
        raise UserError(f"{weights} does not exist; pass a finished run folder (it holds {META_MODEL})")
    if not card.is_file():
        raise UserError(f"{card} does not exist; pass the run folder the meta-model was written in (its config)")
    try:
        cfg = FedMetaConfig.from_flat(json.loads(card.read_text())["config"])
    except ConfigError as err:
        raise UserError(f"{card}: {err}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{card} has no readable 'config'; pass the run folder written by the fedmeta server") from None
    try:
        data = weights.read_bytes()
        params = load(data)
    except Exception:
        raise UserError(f"{weights} is not a readable safetensors file; pass the run's {META_MODEL}") from None
    expected = MetaLearner(build_model(cfg.model), cfg.maml).init_meta_params()
    if {n: tuple(p.shape) for n, p in params.items()} != {n: tuple(p.shape) for n, p in expected.items()}:
        raise UserError(
            f"{weights} does not match the architecture of {card} (model.arch={cfg.model.arch}, "
            f"model.width={cfg.model.width}, maml.meta-sgd={cfg.maml.meta_sgd}); pass the two files of one run"
        )
    return MetaModel(
        {n: p.float() for n, p in params.items()}, cfg, weights.resolve(), hashlib.sha256(data).hexdigest()
    )
