"""A hospital runs only the fedmeta it installed: the ClientApp process of ``fedmeta client``.

A Flower run ships its app as a FAB, and Flower's ``flwr-clientapp`` installs and imports whatever code
that FAB holds. Flower's own check (``flower-supernode --trusted-entities``) accepts only FABs signed
through Flower Hub, which a local ``flwr run`` never is. So ``fedmeta client`` pins the app to the
hospital's own installation instead: the SuperNode's SuperExec starts ``flwr-clientapp`` by name, and
``fedmeta client`` puts this module first under that name (see :func:`write_task_commands`). It is Flower's
``flwr-clientapp`` with one step in front of the FAB's installation: the FAB must be byte-identical to the
FAB this hospital builds itself, with Flower's own builder, from its installed fedmeta. A different FAB
(other code, another version, an extra file) is refused with an error reply to the server, before
anything in it is unpacked or imported. Every other kind of task (an agent app, a connector, ...) is
refused outright.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from pathlib import Path

from shared.flower_processes import PROJECT_DIR

REFUSED_PREFIX = "fedmeta: refused run"
TASK_COMMANDS = ("flwr-agentapp", "flwr-connector", "flwr-model", "flwr-serverapp", "flwr-simulation")


class UntrustedAppError(Exception):
    """The run's app is not the fedmeta this hospital installed."""


def installed_files() -> dict[str, Path]:
    """The files Flower's ``collect_files`` finds in the installed fedmeta, without walking the folders its
    ``.gitignore`` excludes whole (a virtual environment there holds tens of thousands of files)."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    gitignore = PROJECT_DIR / ".gitignore"
    ignored = build_pathspec(load_gitignore_patterns(gitignore.read_bytes() if gitignore.is_file() else b""))
    files = {}
    for folder, subfolders, names in os.walk(PROJECT_DIR, followlinks=False):
        relative = Path(folder).relative_to(PROJECT_DIR)
        subfolders[:] = [d for d in subfolders if not ignored.match_file(f"{(relative / d).as_posix()}/")]
        for name in names:
            if not (Path(folder) / name).is_symlink():
                files[(relative / name).as_posix()] = Path(folder) / name
    return files


def installed_fab_hash() -> str:
    """SHA-256 of the FAB Flower builds from this hospital's installed fedmeta (its build is deterministic)."""
    from flwr.cli.build import build_fab_from_files

    return hashlib.sha256(build_fab_from_files(installed_files())[0]).hexdigest()


def check_fab(fab_content: bytes) -> None:
    received, installed = hashlib.sha256(fab_content).hexdigest(), installed_fab_hash()
    if received != installed:
        raise UntrustedAppError(
            f"its app (FAB sha256 {received[:12]}) is not this hospital's installed fedmeta "
            f"(sha256 {installed[:12]} of {PROJECT_DIR}); nothing of it was installed or run"
        )


def write_task_commands(bin_dir: Path) -> None:
    """The executables the SuperNode's SuperExec finds first on PATH: this module as ``flwr-clientapp``,
    a refusal for every other task type."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    python = shlex.quote(sys.executable)
    scripts = {"flwr-clientapp": f'exec {python} -m client.trusted_app "$@"\n'}
    for name in TASK_COMMANDS:
        scripts[name] = (
            f"echo '{REFUSED_PREFIX}: a hospital runs only its installed ClientApp, not {name}' >&2\nexit 1\n"
        )
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)


def main() -> None:
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    install_from_fab = run_clientapp.install_from_fab

    def install_if_trusted(fab_file: Path | bytes, *args: object, **kwargs: object) -> Path:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            check_fab(content)
        except UntrustedAppError as refusal:
            run_id = run_clientapp.TaskIdentity.run_id
            print(f"{REFUSED_PREFIX} {run_id}: {refusal}", file=sys.stderr, flush=True)
            raise
        return install_from_fab(fab_file, *args, **kwargs)

    run_clientapp.install_from_fab = install_if_trusted
    flwr_clientapp()


if __name__ == "__main__":
    main()
