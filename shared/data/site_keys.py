"""The site secret and the hashes keyed with it: patient keys, file keys, cache namespaces, default splits.

The secret is created once, at ``HOSPITAL/.fedmeta/site_secret`` (mode 0600) or, when the hospital folder is
read-only, in the cache folder. It never leaves the site.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import UserError

if TYPE_CHECKING:
    from shared.data.dicom import PreprocessConfig

STATE_FOLDER = ".fedmeta"  # the hospital's own state inside its folder: secret, cache, policy, ledger
SECRET_NAME = "site_secret"
TRAIN_PERCENT = 80  # of records (or patients) whose split labels.csv leaves open


class SiteKeys:
    """HMAC-SHA256 with the site secret: stable at this site, meaningless anywhere else."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _keyed(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()

    def patient(self, patient_id: str) -> str:
        return self._keyed("patient", patient_id)

    def file(self, relpath: str) -> str:
        return self._keyed("file", relpath)[:32]

    def cache_namespace(self, preprocess: PreprocessConfig) -> str:
        # torch and pydicom only where scans are read: `fedmeta client` and its SuperNode need just STATE_FOLDER
        from shared.data.dicom import decoder_versions

        return self._keyed("cache", f"{preprocess.fingerprint()} {decoder_versions()}")[:32]


def default_split(key: str) -> str:
    """Deterministic 80/20 train/test by a hash (patient key when known, so a patient never straddles splits)."""
    return "train" if int(key[:8], 16) % 100 < TRAIN_PERCENT else "test"


def site_secret(folder: Path, cache_dir: Path) -> bytes:
    """The site's HMAC key: read, or created once (mode 0600) in HOSPITAL/.fedmeta, else in the cache folder."""
    places = (folder / STATE_FOLDER / SECRET_NAME, cache_dir / SECRET_NAME)
    for path in places:
        if path.exists():
            return _read_secret(path)
    for path in places:
        try:
            return _create_secret(path)
        except OSError:
            continue
    raise UserError(
        f"cannot create the site secret in HOSPITAL/{STATE_FOLDER} or in the cache folder; "
        "make the hospital folder writable or pass a writable cache folder"
    )


def _read_secret(path: Path) -> bytes:
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        secret = b""
    if len(secret) != 32:
        raise UserError(
            f"the site secret ({path.name}) is damaged; restore it from backup (deleting it re-keys every patient)"
        )
    return secret


def write_site_secret(folder: Path, secret: bytes) -> None:
    """Give a hospital folder that we create ourselves (a simulated one) a chosen secret instead of a random one.

    A simulation derives it from its seed so that splits repeat from run to run; a real hospital's secret is
    random, drawn on first use, because it is what keeps its patients' keys and episode groups unguessable.
    """
    if len(secret) != 32:
        raise ValueError(f"a site secret is 32 bytes, got {len(secret)}")
    _create_secret(folder / STATE_FOLDER / SECRET_NAME, secret)


def _create_secret(path: Path, secret: bytes | None = None) -> bytes:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{secrets.token_hex(8)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() if secret is not None else secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)  # never replaces a secret that a concurrent ingest created first
    finally:
        temp.unlink(missing_ok=True)
    return _read_secret(path)
