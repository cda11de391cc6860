"""Deployment round time: ``fedmeta server`` and N ``fedmeta client`` processes on loopback, against the
same run in the in-process engine.

The deployment is the real one (TLS, every hospital authenticated by its own key), each hospital a
folder of the same synthetic DICOM files the in-process run trains on. Hospitals start once the server
has registered their keys, as they would join a server that is up. ``time_to_first_round_s`` runs from
starting ``fedmeta server`` to the end of round 1; round times are the ServerApp's own (``seconds`` in
``metrics.jsonl``), median over the rounds after the first (round 1 also asks the hospitals' names).
Every process the bench starts is stopped, with everything Flower started under it, when it ends,
fails or is interrupted.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from server.round_log import read_round_log
from shared.certs import make_certs
from shared.config import FedMetaConfig
from shared.data.federation import hospital_name
from shared.errors import UserError
from shared.flower_processes import (
    ProcessTree,
    flower_env,
    follow,
    free_port,
    sigterm_as_interrupt,
    stop_process_tree,
)
from simulations.data.synthetic import write_synthetic_hospital
from simulations.simulate import DEFAULT_METHOD, run_simulation, simulation_config

ROUND_LINE = re.compile(r"^fedmeta: round (\d+)/\d+")
# `fedmeta server` prints one of these once the hospitals' keys are registered
KEYS_REGISTERED = re.compile(r"round 1 starts when|hospitals connected")
# where each engine's run keeps its own folders; not part of the run's settings
LOCAL_KEYS = ("server.out-dir", "server.rounds", "data.federation-dir", "data.synthetic", "data.state-dir")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hospitals", type=int, default=3, help="hospitals, each a `fedmeta client` process")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (at least 2: round 1 is not timed)")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep the runs here, replacing earlier ones (default: temporary)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run settings for both engines")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, metavar="SECONDS", help="give up on the deployment after this long"
    )


def in_process_config(args: argparse.Namespace, run_dir: Path) -> FedMetaConfig:
    """The in-process run's configuration: ``fedmeta simulate``'s, every hospital in every round."""
    return simulation_config(
        argparse.Namespace(
            hospitals=args.hospitals,
            rounds=args.rounds,
            clients_per_round=0,
            data=None,
            method=DEFAULT_METHOD,
            no_dp=False,
            out=run_dir,
            seed=0,
            set=[
                f"server.min-train-nodes={args.hospitals}",  # round 1 of the deployment waits for every hospital
                "data.heldout-hospitals=0",
                "server.fraction-evaluate=0",
                *args.set,
            ],
            json=True,
        )
    )


def server_run_config(cfg: FedMetaConfig) -> list[str]:
    """``fedmeta server --run-config`` for the same run: every setting that differs from the defaults."""
    defaults = FedMetaConfig().to_flat()
    return [f"{k}={v}" for k, v in cfg.to_flat().items() if k not in LOCAL_KEYS and v != defaults[k]]


def median_after_first(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] or seconds)


class ServerOutput:
    """When ``fedmeta server`` had the keys registered and printed each round line; its last lines."""

    def __init__(self) -> None:
        self.keys_registered = threading.Event()
        self.keys_registered_at: float | None = None
        self.round_ends: dict[int, float] = {}
        self.last_lines: list[str] = []

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        self.last_lines = [*self.last_lines[-19:], line]
        if KEYS_REGISTERED.search(line) and not self.keys_registered.is_set():
            self.keys_registered_at = now
            self.keys_registered.set()
        if ended := ROUND_LINE.match(line):
            self.round_ends[int(ended.group(1))] = now


def fedmeta_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", *args]


def run_deployment(cfg: FedMetaConfig, hospitals: int, work_dir: Path, timeout_s: float) -> dict[str, Any]:
    run_dir, certs = work_dir / "run", work_dir / "certs"
    names = [hospital_name(i) for i in range(hospitals)]
    make_certs(certs, names, [])
    folders = [write_synthetic_hospital(work_dir / "hospitals", i, seed=cfg.seed) for i in range(hospitals)]
    env = flower_env(work_dir / "flwr-home")
    port = free_port()
    server_command = fedmeta_command(
        "server", "--out", str(run_dir), "--port", str(port), "--control-port", str(free_port()),
        "--certs", str(certs), "--rounds", str(cfg.server.rounds), "--run-config", *server_run_config(cfg),
    )  # fmt: skip
    own_policy = [] if cfg.privacy.enabled else ["--privacy", "dp=false"]  # a DP hospital refuses a run without DP
    output = ServerOutput()
    started: list[ProcessTree] = []
    deadline = time.monotonic() + timeout_s
    try:
        began = time.monotonic()
        server = ProcessTree(server_command, env)
        started.append(server)
        follower = threading.Thread(target=follow, args=(server, work_dir / "server.log", output), daemon=True)
        follower.start()
        while not output.keys_registered.wait(0.2):
            if not follower.is_alive() or time.monotonic() > deadline:
                raise UserError(_server_failed(server, output, work_dir))
        for name, folder in zip(names, folders, strict=True):
            client_command = fedmeta_command(
                "client", "--hospital", str(folder), "--name", name,
                "--server", f"127.0.0.1:{port}", "--certs", str(certs), *own_policy,
            )  # fmt: skip
            with open(work_dir / f"{name}.log", "ab") as log:
                started.append(ProcessTree(client_command, env, log))
        while follower.is_alive():
            follower.join(timeout=0.5)
            if time.monotonic() > deadline:
                raise UserError(f"the deployment did not finish within --timeout {timeout_s:.0f}s; see {work_dir}")
        if server.wait() != 0 or 1 not in output.round_ends:
            raise UserError(_server_failed(server, output, work_dir))
    finally:
        for process in reversed(started):
            stop_process_tree(process)
    ends = [output.round_ends[r] for r in sorted(output.round_ends)]
    return {
        "keys_registered_s": round((output.keys_registered_at or began) - began, 2),
        "time_to_first_round_s": round(output.round_ends[1] - began, 2),
        "round_seconds": [round(r.seconds, 2) for r in read_round_log(run_dir)],
        "round_line_intervals_s": [round(b - a, 2) for a, b in itertools.pairwise(ends)],
    }


def _server_failed(server: ProcessTree, output: ServerOutput, work_dir: Path) -> str:
    status = "is still running" if server.poll() is None else f"exited with status {server.returncode}"
    tail = "\n".join(output.last_lines[-5:])
    return f"`fedmeta server` {status} before the run finished; its log is {work_dir / 'server.log'}:\n{tail}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.hospitals < 1 or args.rounds < 2:
        raise UserError("--hospitals must be at least 1 and --rounds at least 2 (round 1 is not timed)")
    with tempfile.TemporaryDirectory(prefix="fedmeta-bench-deployment-") as tmp:
        work_dir = (args.work_dir or Path(tmp)).expanduser().resolve()
        for folder in ("deployment", "in-process"):  # a run folder left there would resume, not start afresh
            shutil.rmtree(work_dir / folder, ignore_errors=True)
        (work_dir / "deployment").mkdir(parents=True)
        cfg = in_process_config(args, work_dir / "in-process")
        with sigterm_as_interrupt():  # `kill PID` stops the server, the hospitals and all under them
            deployment = run_deployment(cfg, args.hospitals, work_dir / "deployment", args.timeout)
        in_process = run_simulation(cfg, args.hospitals, quiet=True, engine="in-process")["round_seconds"]
    median_round = median_after_first(deployment["round_seconds"])
    in_process_median = median_after_first(in_process)
    return {
        "benchmark": "deployment",
        "hospitals": args.hospitals,
        "rounds": args.rounds,
        "run_config": server_run_config(cfg),
        **deployment,
        "median_round_s": round(median_round, 2),
        "in_process_round_seconds": in_process,
        "in_process_median_round_s": round(in_process_median, 2),
        "ratio": round(median_round / in_process_median, 2),
    }
