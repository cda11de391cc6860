"""Where a run's hospitals live on this machine: ``FEDERATION/hospital-NNN`` train, ``FEDERATION/heldout/hospital-NNN``
never train. A simulation writes them before it starts; the apps only read them."""

from __future__ import annotations

from pathlib import Path

from shared.config import FedMetaConfig

DEFAULT_ROOT = Path.home() / ".cache" / "fedmeta" / "federations"


HELDOUT_FOLDER = "heldout"


def hospital_name(hospital_index: int) -> str:
    return f"hospital-{hospital_index:03d}"


def federation_dir(cfg: FedMetaConfig) -> Path:
    """``data.federation-dir``, or the synthetic federation of the run's seed under ~/.cache/fedmeta."""
    if cfg.data.federation_dir:
        return Path(cfg.data.federation_dir).expanduser().resolve()
    return DEFAULT_ROOT / f"synthetic-seed{cfg.seed}"
