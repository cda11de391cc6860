"""The server: durable rounds, robustness to bad or missing hospitals, budgets, site-level DP, reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from server.app import run_federation
from server.checkpoint import load_latest
from shared.config import FedMetaConfig
from shared.wire import GRADIENT_KEY, METRICS_KEY
from tests.loopback import Interrupted, LoopbackGrid


def server_config(tmp_path: Path, **sections: dict) -> FedMetaConfig:
    cfg = FedMetaConfig().replace(
        data={
            "federation_dir": str(tmp_path / "federation"),
            "heldout_hospitals": 0,
            "state_dir": str(tmp_path / "state"),
        },
        model={"width": 8},
        maml={"inner_steps": 1},
        episode={"k_shot": 2, "q_query": 2, "meta_batch": 2, "eval_episodes": 2, "eval_steps": 1},
        privacy={"enabled": False},
        server={
            "rounds": 4,
            "out_dir": str(tmp_path / "run"),
            "min_train_nodes": 2,
            "wait_for_nodes_s": 0.0,
            "lr_schedule": "cosine",
            "meta_lr": 0.01,
        },
    )
    return cfg.replace(**sections)


def run(cfg: FedMetaConfig, hospitals: int = 3, grid: LoopbackGrid | None = None) -> LoopbackGrid:
    grid = grid or LoopbackGrid(cfg.to_flat(), hospitals)
    run_federation(grid, cfg)
    return grid


def metrics(cfg: FedMetaConfig) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.server.out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_run_interrupted_after_round_2_resumes_to_the_same_meta_parameters(tmp_path: Path) -> None:
    whole = server_config(tmp_path, server={"out_dir": str(tmp_path / "whole")})
    run(whole)  # same hospitals (and site secrets, hence splits) for both runs
    split = server_config(tmp_path, server={"out_dir": str(tmp_path / "split")})
    grid = LoopbackGrid(split.to_flat(), 3)
    grid.train_rounds_left = 2  # the kill: round 3's messages never go out
    with pytest.raises(Interrupted):
        run(split, grid=grid)
    assert load_latest(Path(split.server.out_dir)).round == 2
    run(split)  # a restarted server with the same out-dir
    expected = load_latest(Path(whole.server.out_dir)).meta_params
    resumed = load_latest(Path(split.server.out_dir))
    assert resumed.round == 4
    for name, value in expected.items():
        torch.testing.assert_close(resumed.meta_params[name], value, rtol=1e-5, atol=1e-6)
    assert [r["round"] for r in metrics(split)] == [1, 2, 3, 4]


def corrupt(grid: LoopbackGrid, node: int, how: str) -> None:
    honest = grid.handlers[node]

    def handler(msg: Message) -> Message | None:
        reply = honest(msg)
        if how == "vanish" and msg.metadata.message_type == "train":
            return None
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        grads = {n: a.numpy().copy() for n, a in reply.content.array_records[GRADIENT_KEY].items()}
        if how == "nan":
            grads["head.weight"][0, 0] = np.nan
        elif how == "shape":
            grads["head.bias"] = np.zeros(5, dtype=np.float32)
        elif how == "enormous":
            grads = {n: g * 1e9 for n, g in grads.items()}
        content = RecordDict(
            {
                GRADIENT_KEY: ArrayRecord({n: Array(g) for n, g in grads.items()}),
                METRICS_KEY: reply.content[METRICS_KEY],
            }
        )
        return Message(content, reply_to=msg)

    grid.handlers[node] = handler


def test_nan_wrong_shape_and_enormous_gradients_are_rejected_with_reasons_and_the_round_completes(
    tmp_path: Path,
) -> None:
    cfg = server_config(tmp_path, server={"rounds": 1})
    grid = LoopbackGrid(cfg.to_flat(), 5)
    nodes = sorted(grid.handlers)
    for node, how in zip(nodes, ["nan", "shape", "enormous"]):
        corrupt(grid, node, how)
    before = load_latest(Path(cfg.server.out_dir))
    run(cfg, grid=grid)
    record = metrics(cfg)[0]
    reasons = {r["hospital"]: r["reason"] for r in record["rejected"]}
    assert "non-finite" in reasons[f"node-{nodes[0]}"]
    assert "has shape (5,)" in reasons[f"node-{nodes[1]}"]
    assert "exceeds server.max-update-norm" in reasons[f"node-{nodes[2]}"]
    assert record["participants"] == 2
    assert before is None and load_latest(Path(cfg.server.out_dir)).round == 1
    assert record["train"]["update-norm"] > 0


def test_a_hospital_that_disappears_mid_round_is_reported_and_the_round_completes(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 2})
    grid = LoopbackGrid(cfg.to_flat(), 3)
    gone = sorted(grid.handlers)[0]
    corrupt(grid, gone, "vanish")
    run(cfg, grid=grid)
    for record in metrics(cfg):
        assert record["participants"] == 2
        assert {"hospital": f"node-{gone}", "reason": "no reply within server.round-timeout-s"} in record["rejected"]


def test_a_hospital_with_a_spent_budget_refuses_and_is_not_sampled_again(tmp_path: Path) -> None:
    cfg = server_config(
        tmp_path, privacy={"enabled": True, "noise_multiplier": 1.0, "episode_groups": 8, "groups_per_step": 4}
    )
    grid = LoopbackGrid(cfg.to_flat(), 3)
    strict = sorted(grid.handlers)[0]
    # the hospital's own, stricter budget wins over the server's default of 8
    grid.handlers[strict] = grid.client_handler(strict, 0, {"privacy.target-epsilon": 5.0})
    run(cfg, grid=grid)
    records = metrics(cfg)
    refused_rounds = [r["round"] for r in records if any(x["hospital"] == f"node-{strict}" for x in r["refused"])]
    assert len(refused_rounds) == 1, "refused once, then never asked again"
    later = [m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.dst_node_id == strict]
    assert len(later) == refused_rounds[0]
    assert "privacy budget exhausted" in records[refused_rounds[0] - 1]["refused"][0]["reason"]
    assert max(r["epsilon"][f"node-{strict}"] for r in records if f"node-{strict}" in r["epsilon"]) <= 5.0


def test_site_level_dp_clips_each_hospital_adds_noise_and_reports_site_epsilon(tmp_path: Path) -> None:
    cfg = server_config(
        tmp_path, server={"rounds": 2, "site_dp": True, "site_clip": 0.01, "site_noise_multiplier": 1.1}
    )
    run(cfg)
    records = metrics(cfg)
    assert records[0]["site_epsilon"] > 0
    assert records[1]["site_epsilon"] > records[0]["site_epsilon"]
    # noise std 0.011 per coordinate over ~1,000 coordinates dwarfs three clipped 0.01 gradients
    assert records[0]["train"]["update-norm"] > 0.1


def test_replies_crossing_the_wire_hold_only_meta_parameter_shaped_arrays_and_fixed_metrics(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 1, "fraction_evaluate": 1.0})
    grid = run(cfg)
    params = load_latest(Path(cfg.server.out_dir)).meta_params
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    kinds = set()
    for reply in grid.replies:
        assert not reply.has_error()
        kinds.add(reply.metadata.message_type)
        assert not reply.content.config_records
        for record in reply.content.array_records.values():
            assert {n: tuple(a.shape) for n, a in record.items()} == shapes
        for record in reply.content.metric_records.values():
            assert all(isinstance(v, float) for v in record.values())
    assert kinds == {"train", "evaluate"}
    assert "hospitals" in metrics(cfg)[0]


def test_run_folder_has_model_card_plots_and_safetensors_model(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 2})
    run(cfg)
    out = Path(cfg.server.out_dir)
    for name in ["meta-model.safetensors", "MODEL_CARD.md", "model-card.json", "train-loss.png", "metrics.jsonl"]:
        assert (out / name).exists(), name
    assert (out / "train-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
