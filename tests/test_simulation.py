"""The simulation path end to end: ``fedmeta simulate`` through a real SuperLink, ``flwr run`` and Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil

from shared.config import FedMetaConfig

PROJECT = Path(__file__).resolve().parents[1]
FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp", "raylet", "gcs_server")


def flower_processes() -> set[int]:
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if any(name in cmdline for name in FLOWER_PROCESSES):
            found.add(p.info["pid"])
    return found


def test_pyproject_run_config_defaults_are_the_typed_config_defaults() -> None:
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    def flatten(table: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in table.items():
            if isinstance(value, dict):
                out.update(flatten(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    assert flatten(config) == FedMetaConfig().to_flat()


def test_simulate_runs_virtual_hospitals_through_flower_and_leaves_no_process_behind(tmp_path: Path) -> None:
    before = flower_processes()
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "shared.cli", "simulate", "--hospitals", "3", "--rounds", "2", "--clients-per-round", "2",
        "--out", str(out), "--json", "--set", "model.width=8", "maml.inner-steps=1", "episode.meta-batch=2",
        "episode.eval-episodes=2", "episode.eval-steps=1", "data.heldout-hospitals=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=PROJECT, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["rounds_completed"] == 2
    assert result["hospitals"] == 3
    assert result["clients_per_round"] == 2
    assert len(result["round_seconds"]) == 2
    assert 0 < result["epsilon_max"] <= 8.0
    assert result["peak_rss_mb"] > 100
    assert set(result["few_shot"]) == {"meta", "meta+fine-tune", "scratch"}
    assert "balanced-accuracy" in result["few_shot"]["meta"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in records] == [2, 2]
    assert records[0]["bytes_up"] == records[0]["bytes_down"]  # a gradient per meta-parameter, nothing more
    assert (out / "meta-model.safetensors").exists()
    assert not flower_processes() - before
