"""``fedmeta client``: join one hospital to a fedmeta server, until Ctrl-C or SIGTERM.

It runs a Flower SuperNode as its own child: TLS to the server (the deployment's ``ca.crt``), the
hospital's private key for SuperNode authentication, the hospital folder, its public name and its own
privacy policy (``--policy FILE``, ``--privacy KEY=VALUE`` overrides) in the node config, and a local
port of its own so several hospitals can share a machine. Flower's state (installed app bundles) and
the SuperNode's log live in ``HOSPITAL/.fedmeta/``.

The SuperNode runs only this hospital's installed fedmeta, in one process that stays up: it finds
:mod:`client.trusted_app` first on PATH as its ``flower-superexec``, which serves every message with the
installed ClientApp, loaded once, and refuses a run whose app differs before any of it is unpacked. The
SuperNode is Flower's, run by this module (``python -m client.deploy``) so that it asks the server for
work every 0.3 s instead of every 3 s, and serves on after a run stopped while it received a message
(:func:`survive_stopped_runs`).

The SuperLink refuses a key that is not registered, and also, for up to two missed heartbeats
(about a minute), the key of a client that crashed and has not been noticed gone yet: so a refused
client tries again for ``--activation-timeout`` seconds before it gives up with a clear message.

Flower's SuperNode retries a server that does not answer forever, one ``Connection attempt failed``
warning each time. Here it retries for ``--wait-for-server`` seconds (its ``--max-wait-time``), and the
hospital is told once that the server does not answer (at start, or after a run: ``fedmeta server`` stops
its SuperLink when the run ends) and once that it answers again. A SuperLink that no longer knows this
SuperNode (a new server run folder) makes Flower's SuperNode exit; the client joins again.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from client.policy import policy_from_mapping
from client.trusted_app import REFUSED_PREFIX, write_task_commands
from shared.certs import CA_CERT, hospital_key
from shared.config import parse_assignments
from shared.data.site_keys import STATE_FOLDER
from shared.errors import UserError
from shared.flower_processes import (
    PROJECT_DIR,
    ProcessTree,
    flower_env,
    follow,
    free_port,
    port_is_free,
    prompt_object_pulls,
    prompt_sleeps,
    sigterm_as_interrupt,
    stop_process_tree,
    toml_value,
)

if TYPE_CHECKING:
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

ACTIVATION_TIMEOUT_S = 1.5 * HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
SERVER_WAIT_S = 600.0
RETRY_PAUSE_S = 5.0
# Flower 1.42's SuperNode sleeps a fixed 3 s between asks for work and 0.5 s between checks for its reply
SUPERNODE_SPEEDUP = 10
SERVER_PULL_RETRY_S = 0.1  # a message's arrays still on their way to the server are asked for again this soon
# What Flower's SuperNode logs, in the order of a session
CONNECTED = re.compile(r"SuperNode ID: (\d+)")
RUN = re.compile(r"\[RUN (\d+)")
RECEIVING = re.compile(r"Receiving: (\w+) message")
RETRYING = "Connection attempt failed"
ANSWERS_AGAIN = "Connection successful after"
GAVE_UP = "Giving up reconnection"
SUPERNODE_ENDED = "SuperNode terminated gracefully"
REFUSED = "Failed to activate SuperNode"
ASKED = {"train": "asked to train", "evaluate": "asked to evaluate", "query": "asked for its name (roll call)"}
TLS_FAILED = re.compile(r"\[SSL[^\]]*\][^(]*|SSL/TLS handshake error")
# an exit is explained by this command, and --insecure by its own warning
WORTH_SHOWING = re.compile(r"\b(WARNING|ERROR)\b(?!.*(Exit Code|Option `--insecure`))")


def say(message: str) -> None:
    print(f"fedmeta client: {message}", flush=True)


@dataclass(frozen=True)
class ClientSettings:
    hospital: Path
    name: str
    server: str  # HOST:PORT
    ca: Path | None  # None with key None: --insecure
    key: Path | None
    port: int  # the SuperNode's local port for its ClientApps
    policy_file: Path | None  # None: the ClientApp's default, HOSPITAL/.fedmeta/policy.toml
    policy_overrides: dict[str, object]  # policy key -> typed value, from --privacy
    activation_timeout_s: float
    server_wait_s: float  # 0: wait for a server that does not answer forever

    @property
    def state_dir(self) -> Path:
        return self.hospital / STATE_FOLDER

    def node_config(self) -> str:
        items: dict[str, object] = {"data-path": str(self.hospital), "hospital-name": self.name}
        if self.policy_file is not None:
            items["policy-file"] = str(self.policy_file)
        items.update({f"policy.{k}": v for k, v in self.policy_overrides.items()})
        return " ".join(f"{k}={toml_value(v)}" for k, v in items.items())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "client", help="join a hospital to a fedmeta server: a SuperNode on the hospital's folder"
    )
    parser.add_argument("--hospital", type=Path, required=True, help="the hospital's folder of DICOM files")
    parser.add_argument("--name", required=True, help="the hospital's name, as in its key file NAME.key")
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the fedmeta server, e.g. 10.0.0.5:8000")
    parser.add_argument("--certs", type=Path, help="folder with ca.crt and hospitals/NAME.key (from `fedmeta certs`)")
    parser.add_argument("--ca", type=Path, help="the deployment's ca.crt (instead of --certs)")
    parser.add_argument("--key", type=Path, help="this hospital's private key NAME.key (instead of --certs)")
    parser.add_argument("--port", type=int, default=None, help="local port for the ClientApps (default: a free one)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no authentication: a local trial")
    parser.add_argument(
        "--policy", type=Path, help="this hospital's privacy policy file (default HOSPITAL/.fedmeta/policy.toml)"
    )
    parser.add_argument(
        "--privacy",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override single fields of the policy file, e.g. epsilon-budget=3 dp=false",
    )
    parser.add_argument(
        "--activation-timeout",
        type=float,
        default=ACTIVATION_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long a refused key is tried again (default {ACTIVATION_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--wait-for-server",
        type=float,
        default=SERVER_WAIT_S,
        metavar="SECONDS",
        help="how long a server that does not answer (not started yet, its run ended, restarting) is waited for "
        f"before the client exits; 0: forever (default {SERVER_WAIT_S:.0f})",
    )
    parser.set_defaults(handler=_run)


def settings_from_args(args: argparse.Namespace) -> ClientSettings:
    hospital = args.hospital.expanduser().resolve()
    if not hospital.is_dir():
        raise UserError(f"hospital folder {hospital} does not exist: pass the folder of its DICOM files to --hospital")
    if not (PROJECT_DIR / "pyproject.toml").is_file():
        raise UserError(
            f"{PROJECT_DIR} holds no pyproject.toml: install fedmeta from its source folder (`pip install -e .`); "
            "that folder is the only app this hospital runs"
        )
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--server {args.server!r}: write HOST:PORT, e.g. 127.0.0.1:8000")
    ca, key = _credentials(args)
    policy_file = args.policy and args.policy.expanduser().resolve()
    if policy_file is not None and not policy_file.is_file():
        raise UserError(f"--policy {policy_file} does not exist: give the hospital's policy TOML file, or leave it out")
    overrides = _policy_overrides(args.privacy)
    local_port = free_port() if args.port is None else args.port
    if args.activation_timeout < 0 or args.wait_for_server < 0:
        raise UserError("--activation-timeout and --wait-for-server are seconds, 0 or more")
    if not port_is_free("127.0.0.1", local_port):
        raise UserError(f"local port {local_port} is in use (another hospital's client?): pick another --port")
    return ClientSettings(
        hospital=hospital,
        name=args.name,
        server=args.server,
        ca=ca,
        key=key,
        port=local_port,
        policy_file=policy_file,
        policy_overrides=overrides,
        activation_timeout_s=args.activation_timeout,
        server_wait_s=args.wait_for_server,
    )


def _policy_overrides(pairs: list[str]) -> dict[str, object]:
    """``--privacy KEY=VALUE`` as typed policy fields; an unknown key or a bad value is a one-line error."""
    given = parse_assignments(pairs, "--privacy")
    policy = policy_from_mapping(given, "--privacy")
    return {key: getattr(policy, key.replace("-", "_")) for key in given}


def _credentials(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    if args.insecure:
        if args.certs or args.ca or args.key:
            raise UserError("--insecure excludes --certs, --ca and --key")
        return None, None
    if args.certs:
        if args.ca or args.key:
            raise UserError("give --certs DIR, or --ca and --key, not both")
        ca, key = args.certs / CA_CERT, hospital_key(args.certs, args.name)
    elif args.ca and args.key:
        ca, key = args.ca, args.key
    else:
        raise UserError("give --certs DIR, or --ca CA_CERT and --key PRIVATE_KEY (or --insecure for a local trial)")
    if not ca.is_file():
        raise UserError(f"{ca} is missing: copy the deployment's ca.crt from the server")
    if not key.is_file():
        raise UserError(
            f"{key} is missing: make this hospital's key pair with `fedmeta certs --hospital-key {args.name} --out DIR`"
        )
    try:
        private = load_ssh_private_key(key.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        private = None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise UserError(
            f"{key} is not an unencrypted OpenSSH EC private key: use the key from `fedmeta certs` "
            "(or `ssh-keygen -t ecdsa -b 384 -N ''`)"
        )
    return ca.resolve(), key.resolve()


def _run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.key is None:
        say("warning: --insecure: no TLS and no hospital authentication; for local trials only")
    join(settings)
    return 0


def supernode_command(settings: ClientSettings) -> list[str]:
    command = [sys.executable, "-m", "client.deploy", "--superlink", settings.server]
    if settings.key is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(settings.ca), "--auth-supernode-private-key", str(settings.key)]
    if settings.server_wait_s > 0:
        command += ["--max-wait-time", f"{settings.server_wait_s:g}"]
    return [
        *command,
        *("--isolation", "subprocess"),
        *("--port", str(settings.port)),
        *("--node-config", settings.node_config()),
    ]


class SupernodeOutput:
    """What the SuperNode says that matters, in the hospital's words: connected, each request, the server
    gone and back (once each, instead of Flower's retry warning every few seconds), a refused key or run,
    a TLS failure; other warnings once."""

    def __init__(self, settings: ClientSettings, stop: Callable[[], None]) -> None:
        self.settings = settings
        self.stop = stop  # once connected, Flower's SuperNode stays up after it gives up on the server
        self.node_id: str | None = None
        self.refused = False
        self.gave_up = False
        self.ended = False
        self.tls_error = ""
        self.server_silent = False
        self.run = ""  # the run of the latest request, for the line that says the server stopped answering
        self.requests: Counter[str] = Counter()  # run -> requests so far
        self._run_logged = ""
        self._last_shown = ""

    def __call__(self, line: str) -> None:
        if connected := CONNECTED.search(line):
            self.node_id, self.server_silent = connected.group(1), False
            say(f"hospital {self.settings.name} connected to {self.settings.server} as SuperNode {self.node_id}")
        elif RETRYING in line:
            if not (self.server_silent or self.gave_up or self.ended):
                self.server_silent = True
                say(self.server_silent_text())
        elif ANSWERS_AGAIN in line:
            if self.server_silent and self.node_id is not None:
                say(f"the server at {self.settings.server} answers again")
            self.server_silent = False
        elif GAVE_UP in line:
            self.gave_up = True
            if self.node_id is not None:
                self.stop()
        elif SUPERNODE_ENDED in line:
            self.ended = True
        elif REFUSED in line:
            self.refused = True
        elif REFUSED_PREFIX in line:
            say(line[line.index(REFUSED_PREFIX) :].removeprefix("fedmeta: "))
        elif tls := TLS_FAILED.search(line):  # keep OpenSSL's reason over the generic line
            self.tls_error = max(self.tls_error, tls.group(0).strip(), key=len)
        elif run := RUN.search(line):
            self._run_logged = run.group(1)
        elif received := RECEIVING.search(line):
            self.run, kind = self._run_logged, received.group(1)
            self.requests[self.run] += 1
            say(f"run {self.run}, request {self.requests[self.run]}: {ASKED.get(kind, f'a {kind} message')}")
        elif self.gave_up:
            return  # the errors of a SuperNode that gave up on the server: join() says what happened
        elif WORTH_SHOWING.search(line):
            shown = re.sub(r"[\d.]+", "#", line)  # a line repeated with other numbers is shown once
            if shown != self._last_shown:
                self._last_shown = shown
                print(line, flush=True)

    def server_silent_text(self) -> str:
        wait_s = self.settings.server_wait_s
        limit = f"up to {wait_s:.0f}s (--wait-for-server)" if wait_s > 0 else "until Ctrl-C"
        if self.node_id is None:
            return f"waiting for the server at {self.settings.server} to answer, {limit}"
        after = f" after run {self.run}" if self.run else ""
        return (
            f"the server at {self.settings.server} stopped answering{after}: its run ended, or it stopped or "
            f"restarts; waiting for it {limit}"
        )


Ending = Literal["refused", "server gone", "forgotten"]


def join(settings: ClientSettings) -> None:
    """Run the SuperNode until Ctrl-C, SIGTERM, or a server that stopped answering for ``--wait-for-server``."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.state_dir / "supernode.log"
    env = flower_env(settings.state_dir / "flower")
    task_commands = settings.state_dir / "bin"
    write_task_commands(task_commands, settings.node_config())
    env["PATH"] = f"{task_commands}{os.pathsep}{env['PATH']}"
    security = "TLS, key " + str(settings.key) if settings.key else "INSECURE"
    say(f"hospital {settings.name} ({settings.hospital}) joining {settings.server} ({security}); log {log_path}")
    refused_since: float | None = None
    with sigterm_as_interrupt():
        while True:
            ending = run_supernode(settings, env, log_path)
            if ending == "server gone":
                say(
                    f"the server at {settings.server} has not answered for {settings.server_wait_s:.0f}s: stopping. "
                    "Start `fedmeta client` again to join the server's next run"
                )
                return
            if ending == "forgotten":
                refused_since = None
                say(f"the server at {settings.server} no longer knows this SuperNode (a new run folder?): joining")
                continue
            now = time.monotonic()
            refused_since = now if refused_since is None else refused_since
            if now + RETRY_PAUSE_S > refused_since + settings.activation_timeout_s:
                raise UserError(
                    f"{settings.server} refused hospital {settings.name}'s key {settings.key}: register "
                    f"{settings.name}.key.pub at the server (`fedmeta server` registers each key in CERTS/hospitals/), "
                    "or stop the other client using this key"
                )
            if refused_since == now:
                say(
                    f"waiting for the server to accept hospital {settings.name}'s key, up to "
                    f"{settings.activation_timeout_s:.0f}s: `fedmeta server` registers keys as it starts, and lets go "
                    "of an earlier client with this key within a minute"
                )
            time.sleep(RETRY_PAUSE_S)


def run_supernode(settings: ClientSettings, env: dict[str, str], log_path: Path) -> Ending:
    """Run one SuperNode until it ends; how it ended, or a UserError for what the hospital must fix."""
    supernode = ProcessTree(supernode_command(settings), env)
    output = SupernodeOutput(settings, stop=supernode.terminate)
    try:
        status = follow(supernode, log_path, output)
    finally:
        stop_process_tree(supernode)
    if output.tls_error:
        raise UserError(
            f"TLS with {settings.server} failed ({output.tls_error}): use the ca.crt of that server and a "
            "host name its certificate lists (`fedmeta certs --server-host`)"
        )
    if output.refused:
        return "refused"
    if output.gave_up and output.node_id is None:
        raise UserError(
            f"the server at {settings.server} did not answer within {settings.server_wait_s:.0f}s: check --server "
            "HOST:PORT and that `fedmeta server` runs there (or wait longer: --wait-for-server SECONDS)"
        )
    if output.gave_up:
        return "server gone"
    if status == 0 and output.node_id is not None:
        return "forgotten"
    raise UserError(f"the Flower SuperNode exited with status {status}; see {log_path}")


class _Receiving:
    """A SuperNode's state as one receive of Flower's uses it, noting the message it stores and the task it creates."""

    def __init__(self, state: InMemoryNodeState) -> None:
        self.state = state
        self.message_id: str | None = None
        self.task_id: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.state, name)

    def store_message(self, message: Any) -> str | None:
        self.message_id = self.state.store_message(message)
        return self.message_id

    def create_task(self, **kwargs: Any) -> int | None:
        self.task_id = self.state.create_task(**kwargs)
        return self.task_id


def survive_stopped_runs(supernode: ModuleType) -> None:
    """Flower 1.42's SuperNode (``supernode``: its ``start_client_internal`` module) after a run is stopped while
    one of its messages is being received: it stops receiving but leaves the message and its task for the
    ClientApp, which waits for arrays that never come (minutes, while the next run's messages queue behind it)
    or, when the message had arrived, answers it after the SuperNode's one chance to send that answer. And the
    SuperNode sends replies only right after it received a message, whichever are ready then: the late answer
    went out in place of the reply to the next message, and that reply never did (the server waits for it, so
    no message comes to send it after). Here a receive the run's stop cut short also drops its message and ends
    its task, and an ask for work that brings nothing sends the replies that are ready."""
    receive = supernode._pull_and_store_message

    def receive_within_runs(*, state: InMemoryNodeState, object_store: Any, **kwargs: Any) -> int | None:
        from flwr.common.constant import SubStatus

        receiving = _Receiving(state)
        run_id = receive(state=receiving, object_store=object_store, **kwargs)
        if run_id is None and receiving.task_id is not None and receiving.message_id is not None:
            state.delete_messages(message_ids=[receiving.message_id])
            object_store.delete(receiving.message_id)
            state.finish_task(receiving.task_id, SubStatus.STOPPED, "its run stopped while its message was received")
        if run_id is None:
            with state.lock_msg_store:  # what get_messages_legacy would return, without taking it
                ready = [
                    entry.message.metadata.run_id
                    for entry in state.msg_store.values()
                    if entry.message.metadata.reply_to_message_id and not entry.is_retrieved
                ]
            run_id = ready[0] if ready else None
        return run_id

    supernode._pull_and_store_message = receive_within_runs  # type: ignore[attr-defined]


def supernode_main() -> None:
    """``python -m client.deploy ARGS``: Flower's ``flower-supernode ARGS``, SUPERNODE_SPEEDUP times as prompt, and
    serving on after a stopped run."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    prompt_sleeps(start_client_internal, SUPERNODE_SPEEDUP)
    survive_stopped_runs(start_client_internal)
    prompt_object_pulls(start_client_internal, "pull_objects", SERVER_PULL_RETRY_S)
    flower_supernode()


if __name__ == "__main__":
    supernode_main()
