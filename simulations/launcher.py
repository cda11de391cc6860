"""Run fedmeta's Flower app through Flower itself: a SuperLink we start (and stop, by PID) and
``flwr run``, the same path a user takes with ``flwr run .``.

``flwr run`` with the default ``:local:`` connection leaves a detached SuperLink behind; here the
SuperLink is our own child process on a free loopback port, with its own FLWR_HOME, and it is
stopped with everything under it when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from shared.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "fedmeta"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")])),
        # the SuperLink starts flower-superexec (and it flwr-simulation) by name
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def stop_process_tree(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process and every descendant (Flower's superexec, simulation, Ray), then SIGKILL stragglers."""
    try:
        parent = psutil.Process(process.pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


@contextlib.contextmanager
def simulation_superlink(work_dir: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """A simulation SuperLink on a free loopback port; yields (port, env for ``flwr``)."""
    flwr_home = work_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_env(flwr_home)
    log_file = open(work_dir / "superlink.log", "ab")  # noqa: SIM115 - lives as long as the SuperLink
    superlink = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("flower-superlink")),
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
        ],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, superlink, work_dir / "superlink.log")
        yield port, env
    finally:
        stop_process_tree(superlink)
        log_file.close()


def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"the Flower SuperLink exited with status {process.returncode}; see {log_path}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.3)
    raise UserError(f"the Flower SuperLink did not open port {port} within {timeout_s:.0f}s; see {log_path}")


def flwr_run(
    run_config: dict[str, Any], federation: dict[str, Any], work_dir: Path, env: dict[str, str], log_path: Path
) -> int:
    """``flwr run PROJECT fedmeta --run-config FILE --federation-config ... --stream``; returns its status."""
    config_file = work_dir / "run-config.toml"
    config_file.write_text("".join(f'"{k}" = {toml_value(v)}\n' for k, v in run_config.items()))
    federation_arg = " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())
    flwr = str(Path(sys.executable).with_name("flwr"))
    with open(log_path, "ab") as log_file:
        return subprocess.run(
            [
                flwr,
                "run",
                str(PROJECT_DIR),
                CONNECTION,
                "--run-config",
                str(config_file),
                "--federation-config",
                federation_arg,
                "--stream",
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_DIR,
            check=False,
        ).returncode
