"""``fedmeta server``: the server of a real deployment, one command from start to finished run.

It starts a Flower SuperLink (deployment engine, TLS, SuperNode authentication, its state in
``RUN_DIR/superlink.db``) as its own child, after its ServerApp executor (:mod:`server.serverapp_executor`,
which imports the installed fedmeta's ServerApp while the SuperLink starts), with only the Fleet API on the
hospitals' ``--host/--port`` and the operator's Control and Runtime APIs on ``127.0.0.1:--control-port``
(:mod:`server.superlink` says why Flower's own ``flower-superlink`` cannot do that), registers every hospital
public key found in ``CERTS/hospitals/``, submits the fedmeta run with ``flwr run`` and prints the ServerApp's
``fedmeta: round i/R ...`` lines as they come. When the run ends, fails or is interrupted (Ctrl-C,
SIGTERM) it stops every process it started. Started again with the same ``--out``, it continues from
the last complete round.

Waiting for hospitals: each round, the ServerApp waits up to ``server.wait-for-nodes-s`` for
``server.min-train-nodes`` hospitals, so by default the run is submitted at once and the ServerApp's
start-up (about 10 s here) overlaps the hospitals connecting. Only ``--min-hospitals`` above
``server.min-train-nodes`` (round 1 should see more hospitals than a round needs) makes this command
wait first, bounded by the same ``server.wait-for-nodes-s``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.outcome import RunOutcome, read_outcome
from shared.certs import CA_CERT, SERVER_CERT, SERVER_KEY, hospital_public_keys
from shared.config import FedMetaConfig, parse_assignments
from shared.errors import UserError
from shared.flower_processes import (
    CONNECTION,
    ProcessTree,
    flower_bin,
    flower_env,
    flwr_run_command,
    follow,
    port_is_free,
    sigterm_as_interrupt,
    stop_process_tree,
    wait_for_port,
    write_connection,
)

if TYPE_CHECKING:
    from server.control import ControlApi

CONTROL_HOST = "127.0.0.1"  # the Control and Runtime APIs listen on loopback only
LOG_LINE = re.compile(r"^\d\d/\d\d/\d{4} [\d:]+:(WARNING|ERROR):(.*)$")  # the ServerApp's Python logging
FLOWER_LOG_LINE = re.compile(r"^(WARNING|ERROR) :\s+(.*)$")  # Flower's own, in the ServerApp's process
# Flower's lines that this command says better or that do not apply: fedmeta evaluates on held-out hospitals
# itself, and a failed run's reason is this command's error
NOT_WORTH_SHOWING = ("Exit Code", "fraction_evaluate is set to 0.0", "ServerApp raised an exception")
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
EXCEPTION = re.compile(r"^(?:\w+\.)*(\w+(?:Error|Exception)): (.+)$")  # the last line of a traceback
POLL_S = 2.0


def say(message: str) -> None:
    print(f"fedmeta server: {message}", flush=True)


@dataclass(frozen=True)
class ServerSettings:
    cfg: FedMetaConfig  # the run config submitted; cfg.server.out_dir is the run folder
    host: str
    port: int  # the hospitals' port: Fleet API only
    control_port: int  # the operator's port, on loopback: Control and Runtime APIs
    certs: Path | None  # None: --insecure
    min_hospitals: int

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.server.out_dir)

    @property
    def control_address(self) -> str:
        """Where this machine's ``flwr`` and the SuperLink's own SuperExec reach it (inside the cert's SAN)."""
        return f"{CONTROL_HOST}:{self.control_port}"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "server", help="run the fedmeta server: a TLS SuperLink, hospital keys registered, the run streamed"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/server"), help="run folder (reused: resume)")
    parser.add_argument("--rounds", type=int, default=None, help="total rounds (default: server.rounds)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 to accept hospitals on other machines"
    )
    parser.add_argument("--port", type=int, default=8000, help="the one port hospitals connect to (default 8000)")
    parser.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="the operator's port on 127.0.0.1 (register keys, submit and stop runs; default --port + 1)",
    )
    parser.add_argument("--certs", type=Path, help="folder made by `fedmeta certs` (ca.crt, server.*, hospitals/)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no hospital authentication: a local trial")
    parser.add_argument(
        "--run-config", nargs="+", default=[], metavar="KEY=VALUE", help="run settings, e.g. maml.inner-steps=1"
    )
    parser.add_argument(
        "--min-hospitals",
        type=int,
        default=None,
        help="connected hospitals to wait for before the run starts (default: server.min-train-nodes)",
    )
    parser.set_defaults(handler=_run)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    overrides = parse_assignments(args.run_config, "--run-config")
    if "server.out-dir" in overrides:
        raise UserError("--run-config server.out-dir: the run folder is --out")
    flat: dict[str, Any] = {"data.heldout-hospitals": 0, **overrides, "server.out-dir": str(args.out.resolve())}
    if args.rounds is not None:
        flat["server.rounds"] = args.rounds
    cfg = FedMetaConfig.from_flat(flat)
    if cfg.model.init:
        from shared.learning.pretrained import with_checked_init  # torch: only when a run starts from weights

        cfg = with_checked_init(cfg)
    if args.insecure == (args.certs is not None):
        raise UserError("give --certs DIR (made by `fedmeta certs`), or --insecure for a local trial without TLS")
    min_hospitals = cfg.server.min_train_nodes if args.min_hospitals is None else args.min_hospitals
    if min_hospitals < 1:
        raise UserError(f"--min-hospitals {min_hospitals}: wait for at least one hospital")
    control_port = args.port + 1 if args.control_port is None else args.control_port
    if control_port == args.port:
        raise UserError(f"--control-port {control_port}: pick a port other than --port, which hospitals reach")
    certs = args.certs and args.certs.resolve()
    return ServerSettings(cfg, args.host, args.port, control_port, certs, min_hospitals)


def _run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.certs is None:
        say("warning: --insecure: no TLS and no hospital authentication; for local trials only")
    serve(settings)
    return 0


def check_certs(certs: Path) -> dict[str, Path]:
    """The hospital public keys to register; every file the SuperLink needs must be there."""
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (certs / name).is_file():
            raise UserError(f"{certs / name} is missing: make the folder with `fedmeta certs --out {certs} ...`")
    keys = hospital_public_keys(certs)
    if not keys:
        raise UserError(
            f"no hospital keys in {certs}/hospitals: copy each hospital's NAME.key.pub there "
            "(made at the hospital by `fedmeta certs --hospital-key NAME`)"
        )
    return keys


def superlink_command(settings: ServerSettings) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "server.superlink",
        "--fleet-host",
        settings.host,
        "--fleet-port",
        str(settings.port),
    ]
    if settings.certs is None:
        command.append("--insecure")
    else:
        certs = settings.certs
        command += [
            *("--ssl-ca-certfile", str(certs / CA_CERT)),
            *("--ssl-certfile", str(certs / SERVER_CERT)),
            *("--ssl-keyfile", str(certs / SERVER_KEY)),
            "--enable-supernode-auth",
        ]
    return [
        *command,
        *("--isolation", "process"),  # its ServerApp executor is ours, started first: executor_command
        *("--host", CONTROL_HOST),
        *("--port", str(settings.control_port)),
        *("--database", str(settings.run_dir / "superlink.db")),
    ]


def executor_command(settings: ServerSettings) -> list[str]:
    """The SuperLink's ServerApp executor (:mod:`server.serverapp_executor`), on its loopback Runtime API."""
    security = ["--insecure"] if settings.certs is None else ["--root-certificates", str(settings.certs / CA_CERT)]
    return [
        sys.executable,
        "-m",
        "server.serverapp_executor",
        *("--runtime-api-address", settings.control_address),
        *security,
        *("--parent-pid", str(os.getpid())),
    ]


def flwr_json(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``flwr ARGS --format json``: its JSON answer (``success`` false with ``error-message`` on failure)."""
    out = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True, check=False
    ).stdout
    try:
        return json.loads(out[out.index("{") :])
    except ValueError:
        return {"success": False, "error-message": out.strip() or f"`flwr {' '.join(args)}` printed nothing"}


def register_hospitals(keys: dict[str, Path], control: ControlApi) -> None:
    """Register each hospital key under its name; a key registered by an earlier start is fine."""
    for name, public_key in keys.items():
        if control.register(name, public_key):
            say(f"hospital {name} registered")
        else:  # the SuperLink's database remembers earlier starts
            say(f"hospital {name} was registered before")


def wait_for_hospitals(settings: ServerSettings, control: ControlApi) -> None:
    wanted, wait_s = settings.min_hospitals, settings.cfg.server.wait_for_nodes_s
    deadline = time.monotonic() + wait_s
    online = -1
    while True:
        now_online = control.online_nodes()
        if now_online != online:
            online = now_online
            say(f"{online}/{wanted} hospitals connected")
        if online >= wanted:
            return
        if time.monotonic() >= deadline:
            raise UserError(
                f"only {online} of {wanted} hospitals connected within server.wait-for-nodes-s={wait_s:.0f}s: "
                "start `fedmeta client` at the missing hospitals, or lower --min-hospitals"
            )
        time.sleep(POLL_S)


class RunOutput:
    """Echo the ServerApp's progress lines and warnings from ``flwr run --stream``; remember the run id and
    the exception that ended a failed run."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.failure = ""
        self.stopping = False  # the ServerApp printed why it stops: the command's error says it once

    def __call__(self, line: str) -> None:
        if started := RUN_STARTED.search(line):
            self.run_id = started.group(1)
        elif line.startswith("fedmeta:"):
            self.stopping = self.stopping or line.startswith("fedmeta: stopped:")
            if not self.stopping:
                print(line, flush=True)
        elif raised := EXCEPTION.match(line):
            self.failure = f"{raised.group(1)}: {raised.group(2)}"
        elif (logged := LOG_LINE.match(line) or FLOWER_LOG_LINE.match(line)) and not any(
            known in line for known in NOT_WORTH_SHOWING
        ):
            level, message = logged.groups()
            say(f"{level.lower()}: {message.strip()}")


def serve(settings: ServerSettings) -> None:
    run_dir = settings.run_dir
    keys = check_certs(settings.certs) if settings.certs else {}
    for host, port, option in (
        (settings.host, settings.port, "--port"),
        (CONTROL_HOST, settings.control_port, "--control-port"),
    ):
        if not port_is_free(host, port):
            raise UserError(
                f"port {port} on {host} is in use (another fedmeta server?): stop it or pick another {option}"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / "flwr-home"
    ca = settings.certs and settings.certs / CA_CERT
    write_connection(flwr_home, CONNECTION, settings.control_address, ca)
    env = flower_env(flwr_home)
    log_path = run_dir / "superlink.log"
    with sigterm_as_interrupt(), open(log_path, "ab") as log_file:
        # first: its spare ServerApp imports fedmeta while the SuperLink starts
        executor = ProcessTree(executor_command(settings), env, log_file)
        superlink = ProcessTree(superlink_command(settings), env, log_file)
        # Flower's Control API client (its CLI modules: seconds of imports) loads while the SuperLink starts
        threading.Thread(target=importlib.import_module, args=("server.control",), daemon=True).start()
        try:
            wait_for_port(settings.control_port, superlink, log_path)
            security = "TLS, hospital authentication" if settings.certs else "INSECURE"
            say(
                f"SuperLink: hospitals on {settings.host}:{settings.port} (Fleet API only, {security}); "
                f"operator on {settings.control_address} (this machine only); log {log_path}"
            )
            from server.control import ControlApi

            with contextlib.closing(ControlApi(CONNECTION, settings.control_address, ca)) as control:
                register_hospitals(keys, control)
                if settings.min_hospitals > settings.cfg.server.min_train_nodes:
                    wait_for_hospitals(settings, control)
                else:
                    say(f"round 1 starts when {settings.cfg.server.min_train_nodes} hospitals are connected")
            outcome = submit(settings, env)
        finally:
            stop_process_tree(executor)
            stop_process_tree(superlink)
    if outcome is not None and outcome.rounds_trained < outcome.rounds:
        say(
            f"warning: {outcome.rounds_trained} of {outcome.rounds} rounds trained the meta-model; the others had "
            "fewer than server.min-train-nodes usable replies (reasons in metrics.jsonl)"
        )
    say(f"finished; results in {run_dir} (metrics.jsonl, MODEL_CARD.md, meta-model.safetensors)")


def submit(settings: ServerSettings, env: dict[str, str]) -> RunOutcome | None:
    """``flwr run`` the fedmeta app with the run config and follow it to the end; how the ServerApp says it ended."""
    run_dir = settings.run_dir
    log_path = run_dir / "flwr-run.log"
    output = RunOutput()
    process = ProcessTree(flwr_run_command(settings.cfg.to_flat(), {}, run_dir), env)
    try:
        status = follow(process, log_path, output)
    finally:
        stop_process_tree(process)
    if output.run_id is None:
        raise UserError(f"`flwr run` could not start the run (status {status}); see {log_path}")
    outcome = read_outcome(run_dir)
    if outcome is not None and outcome.state == "failed":
        raise UserError(f"the run stopped: {outcome.reason}\nrecords and report so far in {run_dir}")
    runs = flwr_json(["ls", CONNECTION, "--run-id", output.run_id], env).get("runs", [])
    state = runs[0].get("status", "unknown") if runs else "unknown"
    if state != "finished:completed":
        reason = f": {output.failure}" if output.failure else ""
        raise UserError(f"the fedmeta run ended {state}{reason}; see {log_path}")
    return outcome
