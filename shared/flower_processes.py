"""Flower's own processes (SuperLink, SuperNode, ``flwr``) as children we start, follow and stop by PID.

Under them Flower starts more (``flower-superexec``, then ``flwr-serverapp`` or ``flwr-simulation``; at a
hospital, fedmeta's ClientApp executor as ``flower-superexec``), detached in new sessions: Ctrl-C in a
terminal reaches only our process, and a process whose parent has exited no longer shows in the tree. So
every process we start carries a marker in its environment, which everything under it inherits, and
stopping finds the whole family by it.

In the processes Flower starts for our apps, :func:`quiet_app_output` keeps their output to what matters.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import psutil

from shared.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "fedmeta"  # the SuperLink connection our FLWR_HOME/config.toml defines
TREE_MARKER = "FEDMETA_PROCESS_TREE"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# How often an executor asks a Runtime API on its own machine for a task (Flower's SuperExec: every 1 s)
TASK_POLL_S = 0.1


def quiet_app_output() -> None:
    """Where our ServerApp or ClientApp runs: each Flower log line once, and no Ray accelerator tip.

    Opacus calls ``logging.basicConfig`` when imported, so Flower's logger, which has its own console handler,
    also reached that root handler: every line twice, and its DEBUG lines once. Our own loggers keep the root
    handler: their warnings are what ``fedmeta server`` and ``fedmeta client`` show."""
    logging.getLogger("flwr").propagate = False
    # ray.init warns unless this is set; the simulation engine starts Ray in the ServerApp's process
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


class _PromptTime:
    """The ``time`` module with its ``sleep`` ``factor`` times shorter."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds / self.factor)


def prompt_sleeps(module: ModuleType, factor: float) -> None:
    """``module``'s pauses ``factor`` times shorter, its clock untouched: Flower 1.42 polls with fixed sleeps
    (the SuperNode 3 s between asks for work, the ServerApp's grid 3 s between pulls of replies)."""
    module.time = _PromptTime(factor)  # type: ignore[attr-defined]


def prompt_object_pulls(module: ModuleType, function: str, first_retry_s: float) -> None:
    """Flower's ``function`` (``pull_objects`` or ``pull_and_inflate_object_from_tree``) as ``module`` calls it,
    trying an object that is not there yet again after ``first_retry_s``, doubling up to ten times that, instead
    of after 1 s doubling up to 10 s. A message reaches its receiver before all its arrays have (they follow
    one request each), so in Flower 1.42 nearly every pull of a model waits out a first backoff or two."""
    pull = getattr(module, function)
    setattr(module, function, functools.partial(pull, initial_backoff=first_retry_s, backoff_cap=10 * first_retry_s))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Nothing listens there (connections of an earlier server lingering in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def flower_bin(name: str) -> str:
    """A Flower executable of this environment (``flwr``, ``flower-superlink``, ...)."""
    return str(Path(sys.executable).with_name(name))


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(TASK_POLL_S),
        # `flwr run --stream` prints the run's log with print(): unbuffered, we see each line as it comes
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")])),
        # the SuperLink starts flower-superexec (and it flwr-simulation) by name
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, the default; insecure without certificates."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {toml_value(str(root_certificates.resolve()))}\n"
        if root_certificates
        else "insecure = true\n"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}'
    )


class ProcessTree(subprocess.Popen):
    """A Flower process in its own session whose descendants all carry its marker in their environment:
    Flower starts them detached from a parent that may exit first, so the process tree alone can miss them.
    Output goes to ``log_file``, or to an unbuffered binary pipe for :func:`follow` when None."""

    def __init__(self, command: list[str], env: dict[str, str], log_file: IO[bytes] | None = None) -> None:
        self.marker = secrets.token_hex(8)
        super().__init__(
            command,
            env={**env, TREE_MARKER: self.marker},
            stdout=subprocess.PIPE if log_file is None else log_file,
            stderr=subprocess.STDOUT,
            bufsize=0,
            start_new_session=True,
        )

    def members(self) -> list[psutil.Process]:
        """Every live process started under this one, however detached, itself included."""
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.environ().get(TREE_MARKER) == self.marker:
                    found.append(p)
        return found


def follow(process: subprocess.Popen, log_path: Path, on_line: Callable[[str], None]) -> int:
    """Copy a piped process's output to ``log_path`` line by line, timestamped, hand each line (without
    colour codes) to ``on_line``, and return its exit status once it has exited.

    Reads the pipe without blocking: a detached grandchild that inherited it may outlive the process."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    pending = b""
    with open(log_path, "a") as log:

        def emit(raw: bytes) -> None:
            line = ANSI_ESCAPE.sub("", raw.decode(errors="replace").rstrip("\r"))
            log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S.%f}"[:-3] + f" {line}\n")
            log.flush()
            on_line(line)

        while True:
            if select.select([fd], [], [], 0.5)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    emit(raw)
            elif process.poll() is not None:
                break
        if pending:
            emit(pending)
    return process.wait()


def stop_process_tree(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process and everything started under it (Flower's superexec, apps, Ray), then SIGKILL
    stragglers."""
    family = {p.pid: p for p in (process.members() if isinstance(process, ProcessTree) else [])}
    with contextlib.suppress(psutil.NoSuchProcess):
        family.update((p.pid, p) for p in psutil.Process(process.pid).children(recursive=True))
    family.pop(process.pid, None)  # our own child: Popen waits for it
    for p in family.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    process.terminate()
    try:
        process.wait(timeout=grace_s)  # first: its zombie children pass to init, which reaps them
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    alive = wait_until_gone(list(family.values()), grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    wait_until_gone(alive, grace_s)


def is_alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent's bookkeeping is left)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_until_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait for the processes to exit; return those still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in processes if is_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C (KeyboardInterrupt), so ``finally`` blocks stop what we started."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def wait_for_port(
    port: int, process: subprocess.Popen, log_path: Path, timeout_s: float = 60.0, what: str = "the Flower SuperLink"
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"{what} exited with status {process.returncode}; see {log_path}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.3)
    raise UserError(f"{what} did not open port {port} within {timeout_s:.0f}s; see {log_path}")


def flwr_run_command(
    run_config: dict[str, Any], federation: dict[str, Any], work_dir: Path, connection: str = CONNECTION
) -> list[str]:
    """``flwr run PROJECT CONNECTION --run-config FILE [--federation-config ...] --stream``, the run config
    written to ``work_dir/run-config.toml``."""
    config_file = work_dir / "run-config.toml"
    config_file.write_text("".join(f'"{k}" = {toml_value(v)}\n' for k, v in run_config.items()))
    # Flower's CLI with a prompt FAB build (shared.flwr_cli): the same FAB, without walking .venv
    command = [sys.executable, "-m", "shared.flwr_cli", "run", str(PROJECT_DIR), connection]
    command += ["--run-config", str(config_file)]
    if federation:
        command += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())]
    return [*command, "--stream"]
