"""Simulation scale and communication: round time, peak memory and bytes per hospital as the
federation grows with the same number of hospitals sampled per round.

Each size is a full ``fedmeta simulate`` run (SuperLink, ``flwr run``, Ray); only sampled hospitals
cost anything. Round time is the median over the rounds after the first (the first pays for Ray's
start-up). Hospital data is already on disk, as in a real federation: ``--clients-per-round`` synthetic
hospitals are written and ingested once, before any timing (``first_use_seconds`` per hospital); every
hospital of every size is a link to one of them, with its own privacy ledger. Round time then measures
the federation.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from server.round_log import read_round_log
from shared.config import FedMetaConfig
from shared.data.dicom import PreprocessConfig
from shared.data.federation import hospital_name
from shared.data.hospital_folder import load_hospital
from shared.run_folder import META_MODEL
from simulations.data.synthetic import write_synthetic_hospital
from simulations.simulate import DEFAULT_METHOD, run_simulation, simulation_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="10,100,1000", help="comma-separated federation sizes")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: temporary)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run settings for every size")


def written_hospitals(count: int, folder: Path) -> float | None:
    """Write and ingest ``count`` synthetic hospitals under ``folder``; seconds per hospital written
    (``None`` when an earlier run of this work dir wrote them all)."""
    model = FedMetaConfig().model
    preprocess = PreprocessConfig(image_size=model.image_size, channels=model.in_channels)
    new = sum(not (folder / hospital_name(index)).exists() for index in range(count))
    started = time.perf_counter()
    for index in range(count):
        load_hospital(write_synthetic_hospital(folder, index, seed=0), preprocess)
    return (time.perf_counter() - started) / new if new else None


def linked_federation(size: int, base: Path, base_count: int, work_dir: Path) -> Path:
    federation = work_dir / f"federation-{size}"
    federation.mkdir(parents=True, exist_ok=True)
    for index in range(size):
        link = federation / hospital_name(index)
        if not link.is_symlink():
            link.symlink_to(base / hospital_name(index % base_count), target_is_directory=True)
    return federation


def measure(size: int, args: argparse.Namespace, work_dir: Path, federation: Path) -> dict[str, Any]:
    sim_args = argparse.Namespace(
        hospitals=size,
        rounds=args.rounds,
        clients_per_round=min(args.clients_per_round, size),
        data=federation,
        method=DEFAULT_METHOD,
        no_dp=False,
        out=work_dir / f"scale-{size}",
        seed=0,
        set=["data.heldout-hospitals=0", "server.fraction-evaluate=0", *args.set],
        json=True,
    )
    result = run_simulation(simulation_config(sim_args), size, quiet=True)
    run_dir = Path(result["run_dir"])
    records = read_round_log(run_dir)
    model_bytes = sum(t.numel() * t.element_size() for t in load_file(run_dir / META_MODEL).values())
    later = result["round_seconds"][1:] or result["round_seconds"]
    return {
        "hospitals": size,
        "clients_per_round": min(args.clients_per_round, size),
        "round_seconds": result["round_seconds"],
        "median_round_seconds": round(statistics.median(later), 2),
        "peak_rss_mb": result["peak_rss_mb"],
        "model_bytes": model_bytes,
        "bytes_up_per_hospital": [r.bytes_up / max(1, r.participants) for r in records],
        "bytes_down_per_hospital": [r.bytes_down / max(1, r.sampled) for r in records],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = (args.work_dir or Path(tmp)).resolve()
        base_count = args.clients_per_round
        first_use = written_hospitals(base_count, work_dir / "base")
        results = []
        for size in sizes:
            federation = linked_federation(size, work_dir / "base", base_count, work_dir)
            results.append(measure(size, args, work_dir, federation))
    base = results[0]["median_round_seconds"]
    for r in results:
        r["round_time_vs_smallest"] = round(r["median_round_seconds"] / base, 3)
    first_use_seconds = round(first_use, 2) if first_use is not None else None
    return {"federation": "linked", "first_use_seconds": first_use_seconds, "runs": results}
