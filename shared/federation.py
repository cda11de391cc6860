"""Where a run's hospitals live on this machine."""

from __future__ import annotations

from pathlib import Path

from shared.config import FedMetaConfig

DEFAULT_ROOT = Path.home() / ".cache" / "fedmeta" / "federations"


def federation_dir(cfg: FedMetaConfig) -> Path:
    """``data.federation-dir``, or the synthetic federation of the run's seed under ~/.cache/fedmeta."""
    if cfg.data.federation_dir:
        return Path(cfg.data.federation_dir).expanduser().resolve()
    return DEFAULT_ROOT / f"synthetic-seed{cfg.seed}"
