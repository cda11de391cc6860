"""A hospital runs only the fedmeta it installed, in one process that stays up: the ClientApp executor of
``fedmeta client``.

A Flower run ships its app as a FAB. Flower's SuperNode starts ``flower-superexec``, which starts one
``flwr-clientapp`` process per message; that process installs and imports whatever code the FAB holds
(torch and all: seconds, every message), answers the one message and exits. Flower's own check
(``flower-supernode --trusted-entities``) accepts only FABs signed through Flower Hub, which a local
``flwr run`` never is.

So ``fedmeta client`` puts this module first on PATH as ``flower-superexec`` (see
:func:`write_task_commands`): the SuperNode starts it with the address of its Runtime API, and it ends
with the SuperNode. It hashes the FAB that Flower's own builder makes from this hospital's installed
fedmeta, then imports the installed ClientApp, once, then claims the SuperNode's tasks one after another
and serves each with its own task token the way ``flwr-clientapp`` would, in this process: data, model
code and libraries stay loaded between messages and rounds. While the first tasks come (the server's roll
call is answered at once), it computes what the hospital's first training step would compute once per
process (:func:`client.app.warm_up`, from the node config ``fedmeta client`` gives its SuperNode too); a
train or evaluate task waits for that to finish. A task whose FAB is not byte-identical to the
installed one (other code, another version, an extra file) is answered with an error, and nothing of it
is unpacked or imported; the FAB of an accepted task is not installed either, since the code it holds is
already running. Every other kind of task (an agent app) is refused, and every other Flower task command
on that PATH (``flwr-clientapp`` included) refuses to start.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shlex
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.flower_processes import PROJECT_DIR, prompt_object_pulls
from shared.installed_app import RuntimeApi, installed_fab_hash, task_gone

log = logging.getLogger(__name__)

REFUSED_PREFIX = "fedmeta: refused run"
EXECUTOR_COMMAND = "flower-superexec"
LOCAL_PULL_RETRY_S = 0.05  # the SuperNode is on this machine
TASK_COMMANDS = ("flwr-agentapp", "flwr-clientapp", "flwr-connector", "flwr-model", "flwr-serverapp", "flwr-simulation")


def refusal(task_type: str, fab_content: bytes, installed: str) -> str | None:
    """Why this hospital does not run the task, or None when it is its installed ClientApp's."""
    from flwr.supercore.constant import TaskType

    if task_type != TaskType.CLIENT_APP:
        return f"a hospital runs only its installed ClientApp, not {task_type}"
    received = hashlib.sha256(fab_content).hexdigest()
    if received != installed:
        return (
            f"its app (FAB sha256 {received[:12]}) is not this hospital's installed fedmeta "
            f"(sha256 {installed[:12]} of {PROJECT_DIR} when this client started); nothing of it was installed or run"
        )
    return None


def write_task_commands(bin_dir: Path, node_config: str) -> None:
    """The executables the SuperNode finds first on PATH: this module as ``flower-superexec`` (with the
    SuperNode's ``node_config``), a refusal for every task command (nothing but this module starts the
    hospital's tasks)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    python = shlex.quote(sys.executable)
    executor = f"exec {python} -m client.trusted_app --node-config {shlex.quote(node_config)}"
    scripts = {EXECUTOR_COMMAND: f'{executor} "$@"\n'}
    for name in TASK_COMMANDS:
        scripts[name] = (
            f"echo '{REFUSED_PREFIX}: a hospital runs only its installed ClientApp, not {name}' >&2\nexit 1\n"
        )
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)


def task_heartbeat(client: Any) -> Callable[[], bool]:
    """Flower's task heartbeat without its SIGINT when the SuperNode no longer knows the task (stopped or
    expired): that ends a one-task ``flwr-clientapp``, and would end this executor with it."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except httpx.HTTPError:
            return False
        return True

    return beat


def serve_task(
    client: Any, task_type: str, installed: str, app: Callable[..., Any], warmed_up: threading.Thread
) -> None:
    """One task, served as ``flwr-clientapp`` serves it: by the installed ClientApp, or refused. Only the
    roll call (a query) goes ahead of the warm-up."""
    from flwr.app import Error, Message, MessageType
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    heartbeat = HeartbeatSender(task_heartbeat(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "the hospital's ClientApp failed; see the hospital's log"
    try:
        message, context, run, fab = pull_task_input(client)
        refused = refusal(task_type, fab.content, installed)
        if refused is None:
            if message.metadata.message_type != MessageType.QUERY:
                warmed_up.join()
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        else:
            print(f"{REFUSED_PREFIX} {run.run_id}: {refused}", file=sys.stderr, flush=True)
            reply, details = Message(Error(ErrorCode.INVALID_FAB, refused), reply_to=message), refused
    except Exception as err:  # the ClientApp answers its own failures; this is Flower's part failing
        if task_gone(err):  # its run was stopped: nobody waits for an answer, and the task has ended
            log.info("a task of a stopped run ended unanswered")
            status = SubStatus.STOPPED
        else:
            log.exception("a task failed")
            if message is not None:
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, details), reply_to=message)
    try:
        if reply is not None and context is not None:
            push_message(client, reply, context)
    except Exception:
        log.exception("the reply could not be handed to the SuperNode")
    finally:
        heartbeat.stop()
        if status != SubStatus.STOPPED:
            push_task_output(client, context, status, details)
        client.close()


def serve(api: RuntimeApi, installed: str, app: Callable[..., Any], warmed_up: threading.Thread) -> None:
    """Claim the SuperNode's tasks and serve them, one at a time (the SuperNode hands out one at a time)."""
    from flwr.supercore.constant import TaskType
    from flwr.supernode.runtime import run_clientapp

    # a task is claimed as soon as the SuperNode makes it, before the SuperNode has the message's arrays
    prompt_object_pulls(run_clientapp, "pull_and_inflate_object_from_tree", LOCAL_PULL_RETRY_S)
    for token, task in api.claimed_tasks([TaskType.CLIENT_APP, TaskType.AGENT_APP], "SuperNode"):
        serve_task(api.client("flwr-clientapp", token), task.type, installed, app, warmed_up)


def warm_up(node_config: str) -> None:
    """:func:`client.app.warm_up` for the SuperNode's ``--node-config``; a failure is the first task's to report."""
    from flwr.common.config import parse_config_args

    from client.app import warm_up as warm_up_app

    try:
        warm_up_app(parse_config_args([node_config]))
    except Exception as err:  # the first task meets the same problem and answers it as a task does
        log.info("warm-up skipped: %s", err)


def main() -> None:
    """``flower-superexec`` as the SuperNode starts it: ``--runtime-api-address``, ``--insecure`` or
    ``--root-certificates``, ``--parent-pid``; and, from :func:`write_task_commands`, ``--node-config``."""
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    parser = argparse.ArgumentParser(prog="flower-superexec (fedmeta's hospital executor)")
    parser.add_argument("--node-config", required=True, help="the SuperNode's --node-config")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    parser.add_argument("--parent-pid", type=int)
    # accepted and ignored: this executor installs nothing, a FAB's dependencies included
    parser.add_argument("--allow-runtime-dependency-installation", action="store_true")
    args = parser.parse_args()
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # it raises SIGINT here when the SuperNode is gone
    try:
        installed = installed_fab_hash()
        from client.app import app  # after hashing: the code that runs is the code that was hashed

        warmed_up = threading.Thread(target=warm_up, args=(args.node_config,), daemon=True)
        warmed_up.start()
        certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
        serve(RuntimeApi(args.runtime_api_address, args.insecure, certificates), installed, app, warmed_up)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
