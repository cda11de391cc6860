"""Run fedmeta's Flower app through Flower itself: a SuperLink we start (and stop, by PID) and
``flwr run``, the same path a user takes with ``flwr run .``.

``flwr run`` with the default ``:local:`` connection leaves a detached SuperLink behind; here the
SuperLink is our own child process on a free loopback port, with its own FLWR_HOME, and it is
stopped with everything under it when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.flower_processes import (
    CONNECTION,
    ProcessTree,
    flower_bin,
    flower_env,
    flwr_run_command,
    free_port,
    stop_process_tree,
    wait_for_port,
    write_connection,
)


@contextlib.contextmanager
def simulation_superlink(work_dir: Path, ray_address: str | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """A simulation SuperLink on a free loopback port; yields (port, env for ``flwr``). With ``ray_address``
    its simulation runs the virtual hospitals on that Ray cluster (``ray.init`` reads ``RAY_ADDRESS``)
    instead of starting one on this machine."""
    flwr_home = work_dir / "flwr-home"
    port = free_port()
    write_connection(flwr_home, CONNECTION, f"127.0.0.1:{port}", root_certificates=None)
    env = flower_env(flwr_home)
    env["PATH"] = os.pathsep.join([str(message_pump_command(work_dir / "bin")), env["PATH"]])
    # "local": a Ray instance of this run's own, even where `ray start` left a cluster this machine would join
    env["RAY_ADDRESS"] = ray_address or "local"
    # Virtual hospitals run side by side, one per core: a second intra-op thread each only makes them
    # wait on each other (measured: few-shot evaluation 6.7x slower with 2 threads on a loaded machine).
    env["OMP_NUM_THREADS"] = "1"
    log_path = work_dir / "superlink.log"
    command = [
        flower_bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(work_dir / "superlink.db"),
    ]
    with open(log_path, "ab") as log_file:
        superlink = ProcessTree(command, env, log_file)
        try:
            wait_for_port(port, superlink, log_path)
            yield port, env
        finally:
            stop_process_tree(superlink)


def message_pump_command(bin_dir: Path) -> Path:
    """``bin_dir`` with ``flwr-simulation``, the name the SuperLink's executor starts, as
    :mod:`simulations.message_pump`; the SuperLink finds it first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    command = bin_dir / "flwr-simulation"
    command.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m simulations.message_pump "$@"\n')
    command.chmod(0o755)
    return bin_dir


def flwr_run(
    run_config: dict[str, Any], federation: dict[str, Any], work_dir: Path, env: dict[str, str], log_path: Path
) -> subprocess.Popen:
    """Start ``flwr run PROJECT fedmeta --run-config FILE --federation-config ... --stream``, output to
    ``log_path``; the caller waits for it (and stops it with :func:`stop_process_tree`)."""
    with open(log_path, "ab") as log_file:
        return ProcessTree(flwr_run_command(run_config, federation, work_dir), env, log_file)
