"""``fedmeta simulate``: many virtual hospitals on Flower's simulation engine, on this machine.

The run goes through ``flwr run`` against a simulation SuperLink this command starts and stops,
so it exercises exactly the app a real federation runs. Synthetic hospitals are written into the run
folder before it starts, from the seed and their index (or taken from ``--data``); the apps only read
them. Each run keeps its virtual hospitals' privacy ledgers in its own folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import psutil
from tqdm import tqdm

from server.outcome import read_outcome
from server.round_log import mean_metrics, privacy_so_far, read_round_log
from shared.config import FedMetaConfig, parse_assignments
from shared.errors import UserError
from shared.flower_processes import sigterm_as_interrupt, stop_process_tree
from shared.learning.pretrained import with_checked_init
from shared.run_folder import (
    DEPLOYED,
    FEDERATION,
    FLOWER_LOG,
    HELDOUT_COMPARISON,
    HOSPITAL_STATE,
    META_MODEL,
    METRICS,
)
from simulations.data.synthetic import write_synthetic_federation
from simulations.launcher import flwr_run, simulation_superlink

HELDOUT_METHODS = (DEPLOYED, "meta", "meta+fine-tune", "scratch")
_MAML = {
    "maml.order": "second",
    "maml.anil": False,
    "maml.norm-affine": False,
    "maml.meta-sgd": False,
    "maml.head-init": "learned",
}
_FIRST_ORDER_ZERO_HEAD = {**_MAML, "maml.order": "first", "maml.head-init": "zero"}
# Every method is a preset of run settings over the same app; ``--set`` still wins.
METHODS: dict[str, dict[str, Any]] = {
    "fedmeta": _MAML,
    "fedmeta-first-order": {**_MAML, "maml.order": "first"},
    # A task's head starts at zero (the zeroing trick) or at its support scans' class prototypes (Proto-MAML):
    # episode label order costs nothing, and what is meta-trained is what a new hospital fine-tunes.
    "fedmeta-first-order-zero-head": _FIRST_ORDER_ZERO_HEAD,
    # Inner rate 0.01: from a prototype head, steps at 0.1 overshoot (blood training hospitals: 0.780 vs 0.958)
    "proto-maml-first-order": {**_MAML, "maml.order": "first", "maml.head-init": "prototypes", "maml.inner-lr": 0.01},
    "anil": {**_MAML, "maml.anil": True},
    # The inner loop adapts the zero head and the GroupNorm scale and shift only (issue 14 item 2).
    "norm-affine-first-order-zero-head": {**_FIRST_ORDER_ZERO_HEAD, "maml.norm-affine": True},
    "meta-sgd": {**_MAML, "maml.meta-sgd": True},
    # FedAvg in gradient form (one local step, server Adam): supervised gradients on class-balanced
    # batches with classes in fixed order; fine-tuned on a new hospital's shots.
    "fedavg": {**_MAML, "maml.inner-steps": 0, "episode.permute-labels": False},
    # The first half of the rounds are FedAvg, then second-order FedMeta from that model.
    "pretrain-then-meta": _MAML,
    # Non-private upper bound: every hospital every round, no DP; the meta-batch is the union of
    # the hospitals' episodes, which is second-order MAML on the pooled data with hospitals as tasks.
    "centralised": {**_MAML, "privacy.enabled": False},
}
# What a run trains when no --method is given: the typed config's defaults (first order, zero head).
DEFAULT_METHOD = "fedmeta-first-order-zero-head"
ENGINES = ("flower", "in-process")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="a federated run with many virtual hospitals on this machine",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--hospitals", type=int, default=10, help="virtual training hospitals")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds")
    parser.add_argument("--clients-per-round", type=int, default=0, help="hospitals sampled per round (0: all)")
    parser.add_argument("--data", type=Path, help="federation folder of hospital-NNN folders (None: synthetic)")
    parser.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD, help="training method")
    parser.add_argument("--no-dp", action="store_true", help="non-private baseline: no clipping, no noise")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="flower",
        help="flower: SuperLink + Ray, as a real federation; in-process: the same apps in this process, no network",
    )
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the virtual hospitals on this running Ray cluster (flower engine; default: start one here)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/simulation"), help="run folder (reused: resume)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data, sampling and model")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="any run setting, e.g. maml.inner-lr=0.05"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.set_defaults(handler=run)


def simulation_config(args: argparse.Namespace) -> FedMetaConfig:
    run_dir = args.out.expanduser().resolve()
    if args.hospitals < 1 or args.rounds < 1:
        raise UserError("--hospitals and --rounds must be at least 1")
    per_round = args.clients_per_round or args.hospitals
    if not 1 <= per_round <= args.hospitals:
        raise UserError(f"--clients-per-round {per_round} must be between 1 and --hospitals {args.hospitals}")
    method: dict[str, Any] = {}
    if args.method == "pretrain-then-meta":
        method["server.pretrain-rounds"] = args.rounds // 2
    flat: dict[str, Any] = {
        **FedMetaConfig().to_flat(),
        "seed": args.seed,
        "data.federation-dir": str(args.data.expanduser().resolve() if args.data else run_dir / FEDERATION),
        "data.synthetic": args.data is None,
        "data.state-dir": str(run_dir / HOSPITAL_STATE),
        "server.rounds": args.rounds,
        "server.out-dir": str(run_dir),
        "server.fraction-train": per_round / args.hospitals,
        "server.min-train-nodes": min(2, per_round),
        "privacy.enabled": not args.no_dp,
        **METHODS[args.method],
        **method,
    }
    flat.update(parse_assignments(args.set, "--set"))
    cfg = with_checked_init(FedMetaConfig.from_flat(flat))
    if args.method == "centralised":  # everyone every step, as many episodes per step as the federated runs
        meta_batch = max(1, round(cfg.episode.meta_batch * per_round / args.hospitals))
        cfg = cfg.replace(episode={"meta_batch": meta_batch}, server={"fraction_train": 1.0})
    return cfg


def process_tree_rss(root: psutil.Process) -> int:
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


class PeakMemory(threading.Thread):
    """Samples the RSS of this process and all its descendants (SuperLink, simulation, Ray)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            self.peak = max(self.peak, process_tree_rss(me))
            self.stop.wait(self.interval_s)


class LineProgress:
    """tqdm's ``n``, ``update`` and ``close`` for a stderr that is not a terminal: a plain line each time a
    ``step`` more is done and at the end, where a bar's redraws would make one endless line in a log file."""

    def __init__(self, total: int, desc: str, initial: int = 0, step: int = 1) -> None:
        self.total, self.desc, self.n, self.step = total, desc, initial, max(1, step)

    def update(self, n: int) -> None:
        before, self.n = self.n, self.n + n
        if n > 0 and (self.n >= self.total or self.n // self.step > before // self.step):
            print(f"fedmeta simulate: {self.desc} {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


Progress = tqdm | LineProgress


def progress_bar(
    total: int, desc: str, unit: str, initial: int = 0, quiet: bool = False, line_step: int = 1
) -> Progress:
    """A bar on a terminal, plain lines (every ``line_step``) otherwise, nothing when quiet."""
    if quiet or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=quiet)
    return LineProgress(total, desc, initial, line_step)


def write_hospitals(cfg: FedMetaConfig, hospitals: int, quiet: bool) -> None:
    """The run's synthetic hospitals, before it starts: a bar on a terminal, a line per tenth in a log file."""
    total = hospitals + cfg.data.heldout_hospitals
    bar = progress_bar(total, "writing hospitals", "hospital", quiet=quiet, line_step=total // 10)
    write_synthetic_federation(cfg, hospitals, lambda done, _: bar.update(done - bar.n))
    bar.close()


def run_simulation(
    cfg: FedMetaConfig, hospitals: int, quiet: bool = False, engine: str = "flower", ray_address: str | None = None
) -> dict[str, Any]:
    if ray_address and engine != "flower":
        raise UserError(f"--ray-address runs Flower's simulation on a Ray cluster; drop --engine {engine}")
    run_dir = Path(cfg.server.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / FLOWER_LOG
    if cfg.data.synthetic:
        write_hospitals(cfg, hospitals, quiet)
    memory = PeakMemory()
    memory.start()
    progress = RoundProgress(cfg, quiet)
    try:
        if engine == "in-process":
            with open(log_path, "a") as log, contextlib.redirect_stdout(log), flower_console_to(log):
                _run_in_process(cfg, hospitals, progress)
        else:
            _run_on_flower(cfg, hospitals, run_dir, log_path, progress, ray_address)
    finally:
        progress.close()
        memory.stop.set()
        memory.join()
    outcome = read_outcome(run_dir)
    if outcome is not None and outcome.state == "failed":
        raise UserError(f"the simulation stopped: {outcome.reason}\nrecords and report so far in {run_dir}")
    records = read_round_log(run_dir)
    if len(records) < cfg.server.rounds or not (run_dir / META_MODEL).exists():
        raise UserError(
            f"the simulation stopped after {len(records)} of {cfg.server.rounds} rounds; see {log_path} "
            "(rerun the same command to resume from the last complete round)"
        )
    comparison_path = run_dir / HELDOUT_COMPARISON
    comparison = json.loads(comparison_path.read_text()) if comparison_path.exists() else {}
    return {
        "run_dir": str(run_dir),
        "rounds_completed": len(records),
        "hospitals": hospitals,
        "clients_per_round": records[-1].sampled,
        "few_shot": few_shot_summary(comparison),
        "heldout": comparison,
        "epsilon_max": max((r.epsilon_max or 0.0 for r in records), default=0.0),
        "epsilon": privacy_so_far(records).epsilon,
        "peak_rss_mb": round(memory.peak / 2**20, 1),
        "round_seconds": [round(r.seconds, 2) for r in records],
    }


@contextlib.contextmanager
def flower_console_to(log: TextIO) -> Iterator[None]:
    """Flower's console lines into the run's log while its apps run in this process (the in-process engine),
    as the Flower engine's go to its log file; the server's summary comes with stdout."""
    from flwr.common.logger import console_handler

    previous = console_handler.setStream(log)
    try:
        yield
    finally:
        console_handler.setStream(previous)


class RoundProgress:
    """The rounds written to the run's round log so far, then the held-out comparison that follows them."""

    def __init__(self, cfg: FedMetaConfig, quiet: bool) -> None:
        self.run_dir, self.rounds, self.quiet = Path(cfg.server.out_dir), cfg.server.rounds, quiet
        self.heldout = cfg.data.heldout_hospitals
        self.log_size, self.written = -1, 0
        self.bar = progress_bar(self.rounds, "rounds", "round", initial=self.rounds_written(), quiet=quiet)
        self.announced = False

    def rounds_written(self) -> int:
        """Rounds in the log, read again only when the log has grown or shrunk (a poll is a ``stat``)."""
        try:
            size = (self.run_dir / METRICS).stat().st_size
        except FileNotFoundError:
            size = 0
        if size != self.log_size:
            self.log_size, self.written = size, len(read_round_log(self.run_dir))
        return self.written

    def poll(self) -> None:
        self.bar.update(self.rounds_written() - self.bar.n)
        if self.bar.n >= self.rounds and self.heldout and not (self.announced or self.quiet):
            self.bar.close()
            print(
                f"fedmeta simulate: rounds done; comparing the meta-model with scratch on {self.heldout} held-out "
                f"hospital{'s' if self.heldout > 1 else ''} (on each of their few-shot tasks: fedmeta adapt's "
                "cross-validated choice with 2 or more shots per class, a fine-tune and a model from scratch)",
                file=sys.stderr,
                flush=True,
            )
            self.announced = True

    def close(self) -> None:
        self.bar.close()


def _run_on_flower(
    cfg: FedMetaConfig,
    hospitals: int,
    run_dir: Path,
    log_path: Path,
    progress: RoundProgress,
    ray_address: str | None,
) -> None:
    federation: dict[str, Any] = {
        "num-supernodes": hospitals,
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0.0,
    }
    if not ray_address:  # a cluster someone else started has its own resources: Ray refuses them at init
        federation |= {"init-args-num-cpus": psutil.cpu_count() or 2, "init-args-num-gpus": 0}
    with simulation_superlink(run_dir, ray_address) as (_, env):
        flwr = flwr_run(cfg.to_flat(), federation, run_dir, env, log_path)
        try:
            while flwr.poll() is None:
                time.sleep(1.0)
                progress.poll()
        finally:
            stop_process_tree(flwr)
        progress.poll()


def _run_in_process(cfg: FedMetaConfig, hospitals: int, progress: RoundProgress) -> None:
    from simulations.inprocess import run_in_process

    failure: list[BaseException] = []

    def federation() -> None:
        try:
            run_in_process(cfg, hospitals)
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    # A daemon: an interrupted run exits without waiting for the round in progress (rounds are checkpointed).
    worker = threading.Thread(target=federation, name="federation", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=1.0)
        progress.poll()
    if failure:
        raise failure[0]


def few_shot_summary(comparison: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Mean over held-out hospitals of each method's few-shot metrics (a method no hospital has is left out)."""
    means = {
        method: mean_metrics({name: h[method] for name, h in comparison.items() if method in h})
        for method in HELDOUT_METHODS
    }
    return {method: metrics for method, metrics in means.items() if metrics}


def results_table(result: dict[str, Any]) -> str:
    lines = [
        f"fedmeta simulation: {result['rounds_completed']} rounds, {result['hospitals']} hospitals, "
        f"run folder {result['run_dir']}",
        "",
        "Few-shot on hospitals that never trained: balanced accuracy / AUC on the same shots and scans.",
        "deployed = what `fedmeta adapt` deploys (meta+ft, or scratch where cross-validation on the shots clearly",
        "prefers it); meta = meta-model after the inner loop; meta+ft = meta-init fine-tuned with Adam; scratch =",
        "a fresh model trained with Adam on the same shots; gains: paired per task against scratch, mean ± 95% CI.",
        f"{'hospital':<14}{'deployed':>13}{'meta':>13}{'meta+ft':>13}{'scratch':>13}"
        f"{'deployed gain':>18}{'meta+ft gain':>18}",
    ]
    for name, h in result["heldout"].items():
        lines.append(
            f"{name:<14}{_pair(h.get(DEPLOYED)):>13}{_pair(h['meta']):>13}{_pair(h['meta+fine-tune']):>13}"
            f"{_pair(h['scratch']):>13}{_gain(h.get(f'{DEPLOYED} gain')):>18}{_gain(h['meta+fine-tune gain']):>18}"
        )
    for name, h in result["heldout"].items():
        if picks := h.get(f"{DEPLOYED} picks"):
            lines.append(f"  {name} deployed: " + ", ".join(f"{pick} {n}" for pick, n in picks.items()))
    lines += ["", "Privacy spent (epsilon per hospital, last report):"]
    epsilon = result["epsilon"]
    if not epsilon:
        lines.append("  DP off" if result["epsilon_max"] == 0 else "  none reported")
    # most spent first (no DP first of all), then by name
    for hospital, value in sorted(epsilon.items(), key=lambda kv: (-float("inf") if kv[1] is None else -kv[1], kv[0])):
        lines.append(f"  {hospital:<28}{'no DP':>8}" if value is None else f"  {hospital:<28}{value:8.3f}")
    return "\n".join(lines)


def _pair(metrics: dict[str, float] | None) -> str:
    if metrics is None:
        return "-"
    auc = metrics.get("auc")
    return (
        f"{metrics['balanced-accuracy']:.3f}/{auc:.3f}" if auc is not None else f"{metrics['balanced-accuracy']:.3f}/-"
    )


def _gain(gain: dict[str, float] | None) -> str:
    return "-" if gain is None else f"{gain['mean']:+.3f} ± {gain['ci95']:.3f}"


def run(args: argparse.Namespace) -> int:
    cfg = simulation_config(args)
    with sigterm_as_interrupt():  # `kill PID` stops the SuperLink, superexec, simulation and Ray with us
        result = run_simulation(cfg, args.hospitals, args.json, args.engine, args.ray_address)
    print(json.dumps(result, indent=2) if args.json else results_table(result))
    return 0
