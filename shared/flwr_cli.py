"""``flwr`` as fedmeta runs it: Flower's own CLI, with a local app's FAB built without walking the folders its
``.gitignore`` excludes whole.

Flower's ``flwr run`` collects every file under the app folder, a virtual environment's tens of thousands
included, before it drops what ``.gitignore`` excludes: 7-18 s of each ``fedmeta server`` start and simulation
here. The FAB is built by Flower's own ``build_fab_from_files`` from the same files, so it is byte for byte the
FAB ``flwr run`` would build (the hash every hospital checks, :func:`shared.installed_app.installed_fab_hash`).

Usage: ``python -m shared.flwr_cli ARGS``, as ``flwr ARGS``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flwr.cli.app import app
from flwr.cli.run import run as flwr_run

from shared.installed_app import app_fab


def build_fab_from_disk(app_dir: Path) -> bytes:
    return app_fab(app_dir.expanduser().resolve())


if __name__ == "__main__":
    flwr_run.build_fab_from_disk = build_fab_from_disk
    sys.exit(app())
