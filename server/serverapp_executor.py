"""The ServerApp executor of ``fedmeta server``: the installed fedmeta's ServerApp imported before its run exists.

Flower's SuperLink (``--isolation subprocess``) starts ``flower-superexec``, which starts one
``flwr-serverapp`` process per run; that process imports the run's code (torch, torchvision, opacus: about
10 s on two cores, 15-30 s on a busy machine) only once the run has been submitted. ``fedmeta server``
instead starts its SuperLink with ``--isolation process`` and this executor itself, before the SuperLink:
its spare ServerApp process imports the installed fedmeta while the SuperLink starts and hospital keys are
registered.

The first run whose FAB is the installed fedmeta (its SHA-256, as each hospital checks it:
:func:`shared.installed_app.installed_fab_hash`) goes to the spare, which runs it as ``flwr-serverapp``
does (Flower's ``run_serverapp``: the FAB installed, the run config fused, output streamed to the run's log,
the outcome pushed); the ``server.app`` Flower loads from that FAB is the module already imported, the same
code byte for byte. Every other run (a later one, or an operator's own app) is started as Flower's SuperExec
starts it: a fresh ``flwr-serverapp``.

The executor claims no task before the spare has imported fedmeta (or exited): Flower's SuperLink takes back a
task whose process has not started within 30 s of the claim (``HEARTBEAT_DEFAULT_INTERVAL``) and offers it again,
so a spare still importing when ``fedmeta server`` submits its run (which it does seconds after the SuperLink is
up) would lose the run to a fresh ``flwr-serverapp`` that imports everything once more: seen on a busy machine,
round 1 at 101 s instead of about 65 s.

Usage: ``python -m server.serverapp_executor --runtime-api-address HOST:PORT (--insecure | --root-certificates
CA) [--parent-pid PID]``; with ``--spare FD`` it is the spare, which closes file descriptor FD once it has
imported fedmeta and reads its run's task token from stdin.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from queue import Queue

from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.logger import mirror_output_to_queue, restore_output
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.superlink.runtime import run_serverapp

from shared.flower_processes import TASK_POLL_S
from shared.installed_app import RuntimeApi, installed_fab_hash

log = logging.getLogger(__name__)


class Spare:
    """A ServerApp process that imports the installed fedmeta and waits for its run's task token."""

    def __init__(self, api_args: list[str]) -> None:
        self._imported, imported = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.serverapp_executor", "--spare", str(imported), *api_args],
            stdin=subprocess.PIPE,
            # as Flower's SuperExec starts a ServerApp: its output reaches the operator through the run's log
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(imported,),
        )
        os.close(imported)

    def wait_until_imported(self) -> None:
        """Until the spare has imported fedmeta, or has exited."""
        os.read(self._imported, 1)  # b"": the spare closed its end
        os.close(self._imported)

    def take(self, token: str) -> bool:
        """Hand the spare its run; False when it has exited (then nothing was handed over)."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(f"{token}\n".encode())
            self.process.stdin.close()
        except BrokenPipeError:
            return False
        return self.process.poll() is None


class WarmFirstRun(SubprocessExecutor):
    """Flower's own subprocess executor, except that the first run of the installed fedmeta goes to the spare."""

    def __init__(self, installed: str, spare: Spare) -> None:
        self.installed = installed
        self.spare: Spare | None = spare

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type == TaskType.SERVER_APP and spec.fab_hash == self.installed and self.spare is not None:
            spare, self.spare = self.spare, None
            if spare.take(spec.token):
                log.info("task %d: the installed fedmeta, run by the spare ServerApp", spec.task_id)
                return LaunchResult.accepted()
            log.warning("the spare ServerApp exited (status %s); starting flwr-serverapp", spare.process.poll())
        log.info("task %d: a fresh flwr-serverapp", spec.task_id)
        return super().launch(spec)


def wait_until_listening(address: str) -> None:
    """Until the SuperLink, started after this executor, listens: Flower's client would back off for seconds."""
    host, _, port = address.rpartition(":")
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1.0):
            return
        time.sleep(TASK_POLL_S)


def serve(plugin: AutoExecPlugin, api: RuntimeApi, spare: Spare) -> None:
    """Claim the SuperLink's ServerApp tasks and launch each, as Flower's SuperExec does, once the spare is ready."""
    spare.wait_until_imported()
    wait_until_listening(api.address)
    for token, task in api.claimed_tasks([TaskType.SERVER_APP], "SuperLink"):
        plugin.launch_task(token=token, task=task)


def run_spare(args: argparse.Namespace, certificates: bytes | None) -> None:
    """Import the installed ServerApp, then run the task whose token arrives on stdin as ``flwr-serverapp`` would."""
    import server.app  # noqa: F401  the import this process is started ahead for

    os.close(args.spare)  # the executor may claim tasks now
    token = sys.stdin.readline().strip()
    if not token:  # the executor ended before a run came
        return
    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)
    run_serverapp(
        runtime_api_address=args.runtime_api_address,
        log_queue=log_queue,
        token=token,
        insecure=args.insecure,
        certificates=certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,  # the installed fedmeta's dependencies are installed
    )
    restore_output()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m server.serverapp_executor")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--spare", type=int, metavar="FD", help="be the spare ServerApp process; close FD when ready")
    args = parser.parse_args()
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    if args.spare is not None:
        run_spare(args, certificates)
        return
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # it raises SIGINT here when `fedmeta server` is gone
    handler = logging.StreamHandler()  # into the SuperLink's log: which process runs each task
    handler.setFormatter(logging.Formatter("%(asctime)s fedmeta ServerApp executor: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    security = ["--insecure"] if args.insecure else ["--root-certificates", args.root_certificates]
    spare = Spare(["--runtime-api-address", args.runtime_api_address, *security, "--parent-pid", str(os.getpid())])
    plugin = AutoExecPlugin(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        runtime_dependency_install=False,  # only the installed fedmeta runs warm; nothing is installed at run time
        executor=WarmFirstRun(installed_fab_hash(), spare),
    )
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT from the parent monitor, or Ctrl-C
        serve(plugin, RuntimeApi(args.runtime_api_address, args.insecure, certificates), spare)


if __name__ == "__main__":
    main()
