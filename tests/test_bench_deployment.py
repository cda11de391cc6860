"""``fedmeta bench deployment`` compares like with like: the server trains the in-process run's configuration."""

from __future__ import annotations

import argparse
from pathlib import Path

from server.deploy import settings_from_args
from simulations.bench.deployment import LOCAL_KEYS, ServerOutput, in_process_config, server_run_config


def test_the_server_gets_the_in_process_runs_settings_apart_from_its_folders(tmp_path: Path) -> None:
    bench = argparse.Namespace(hospitals=3, rounds=4, set=["maml.inner-steps=1", "privacy.enabled=false"])
    in_process = in_process_config(bench, tmp_path / "in-process")
    server_args = argparse.Namespace(
        run_config=server_run_config(in_process), out=tmp_path / "run", rounds=in_process.server.rounds,
        host="127.0.0.1", port=8000, control_port=None, certs=None, insecure=True, min_hospitals=None,
    )  # fmt: skip
    deployed = settings_from_args(server_args).cfg

    def training(flat: dict) -> dict:
        return {k: v for k, v in flat.items() if k not in LOCAL_KEYS}

    assert training(deployed.to_flat()) == training(in_process.to_flat())
    assert deployed.server.rounds == 4 and deployed.server.min_train_nodes == 3
    assert deployed.maml.inner_steps == 1 and not deployed.privacy.enabled


def test_server_output_marks_when_keys_are_registered_and_each_round_ends() -> None:
    output = ServerOutput()
    for line in [
        "fedmeta server: hospital hospital-000 registered",
        "fedmeta server: round 1 starts when 3 hospitals are connected",
        "fedmeta: round 1/4, 3/3 hospitals, epsilon max 1.16 (hospital-000), 28.3s",
        "fedmeta: round 2/4, 3/3 hospitals, epsilon max 1.43 (hospital-001), 19.9s",
    ]:
        output(line)
    assert output.keys_registered.is_set()
    assert sorted(output.round_ends) == [1, 2]
    assert output.keys_registered_at is not None and output.keys_registered_at <= output.round_ends[1]
