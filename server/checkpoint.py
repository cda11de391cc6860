"""Durable server rounds: after every round the server can be killed and restarted to continue.

``RUN_DIR/checkpoint/round-NNNN/`` holds the meta-parameters (safetensors), the meta-optimizer's and
scheduler's state (``torch.save``, read back with ``weights_only=True``: no pickle runs) and a JSON
state (round, sampling RNG, hospitals excluded from training and from evaluation, per-hospital privacy
summary, each hospital's public name, site-level accountant history), keyed by node id. Nothing secret:
site-level DP noise comes from fresh operating-system randomness every round and is never stored. A
round folder is written aside and renamed into place; ``RUN_DIR/checkpoint/latest`` names the newest
complete one and is replaced atomically, so a kill at any moment leaves the previous complete round
readable.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared.atomic import TEMP_PREFIX, atomic_write
from shared.errors import UserError
from shared.learning.maml import Params
from shared.run_folder import CHECKPOINTS

KEEP_ROUNDS = 2


class CheckpointError(UserError):
    """A checkpoint cannot be read back."""


@dataclass
class ServerState:
    round: int
    meta_params: Params
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    sampler_rng: dict[str, Any]
    excluded: dict[int, str] = field(default_factory=dict)  # node id -> why it is not sampled for training again
    excluded_evaluate: dict[int, str] = field(default_factory=dict)  # ... nor asked to evaluate again
    # node id -> epsilon (None without DP), delta, dp
    privacy: dict[int, dict[str, Any]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # node id -> the public name the hospital sent
    site_accountant: list[list[float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def save(run_dir: Path, state: ServerState) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{state.round:04d}"
    staging = root / f"{TEMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in state.meta_params.items()},
            staging / "meta-params.safetensors",
        )
        torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler}, staging / "optimizer.pt")
        meta = {
            "round": state.round,
            "sampler_rng": state.sampler_rng,
            "excluded": state.excluded,
            "excluded_evaluate": state.excluded_evaluate,
            "privacy": state.privacy,
            "names": state.names,
            "site_accountant": state.site_accountant,
            "config": state.config,
        }
        (staging / "state.json").write_text(json.dumps(meta, indent=1))
        for path in staging.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a round redone after a crash between rename and pointer update
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write(root / "latest", lambda f: f.write(final.name.encode()))
    for old in sorted(root.glob("round-*"))[:-KEEP_ROUNDS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def by_node(keyed: dict[str, Any]) -> dict[int, Any]:
    """JSON's string keys back to node ids (a checkpoint from before names were kept says ``node-ID``)."""
    return {int(str(key).removeprefix("node-")): value for key, value in keyed.items()}


def load_latest(run_dir: Path) -> ServerState | None:
    """The newest complete round in ``run_dir``, or ``None`` for a fresh run."""
    pointer = run_dir / CHECKPOINTS / "latest"
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    try:
        meta = json.loads((folder / "state.json").read_text())
        optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
        return ServerState(
            round=int(meta["round"]),
            meta_params=load_file(folder / "meta-params.safetensors"),
            optimizer=optimizer["optimizer"],
            scheduler=optimizer["scheduler"],
            sampler_rng=meta["sampler_rng"],
            excluded=by_node(meta["excluded"]),
            excluded_evaluate=by_node(meta.get("excluded_evaluate", {})),
            privacy=by_node(meta["privacy"]),
            names=by_node(meta.get("names", {})),
            site_accountant=meta["site_accountant"],
            config=meta["config"],
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {folder.name} in {run_dir} is unreadable ({type(err).__name__}); "
            "point --out at a new folder to start over, or restore the folder from backup"
        ) from None
