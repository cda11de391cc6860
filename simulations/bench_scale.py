"""Simulation scale and communication: round time, peak memory and bytes per hospital as the
federation grows with the same number of hospitals sampled per round.

Each size is a full ``fedmeta simulate`` run (SuperLink, ``flwr run``, Ray) on synthetic
hospitals written on first use; only sampled hospitals cost anything. Round time is the median
over the rounds after the first (the first pays for Ray's start-up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from server.report import read_metrics
from simulations.simulate import run_simulation, simulation_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="10,100,1000", help="comma-separated federation sizes")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: temporary)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run settings for every size")


def measure(size: int, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    sim_args = argparse.Namespace(
        hospitals=size,
        rounds=args.rounds,
        clients_per_round=min(args.clients_per_round, size),
        data=None,
        method="fedmeta",
        no_dp=False,
        out=work_dir / f"scale-{size}",
        seed=0,
        set=["data.heldout-hospitals=0", "server.fraction-evaluate=0", *args.set],
        json=True,
    )
    result = run_simulation(simulation_config(sim_args), size, quiet=True)
    records = read_metrics(Path(result["run_dir"]))
    model_bytes = sum(
        t.numel() * t.element_size() for t in load_file(Path(result["run_dir"]) / "meta-model.safetensors").values()
    )
    later = result["round_seconds"][1:] or result["round_seconds"]
    return {
        "hospitals": size,
        "clients_per_round": min(args.clients_per_round, size),
        "round_seconds": result["round_seconds"],
        "median_round_seconds": round(statistics.median(later), 2),
        "peak_rss_mb": result["peak_rss_mb"],
        "model_bytes": model_bytes,
        "bytes_up_per_hospital": [r["bytes_up"] / max(1, r["participants"]) for r in records],
        "bytes_down_per_hospital": [r["bytes_down"] / max(1, r["sampled"]) for r in records],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        results = [measure(size, args, work_dir) for size in sizes]
    base = results[0]["median_round_seconds"]
    for r in results:
        r["round_time_vs_smallest"] = round(r["median_round_seconds"] / base, 3)
    return {"runs": results}
