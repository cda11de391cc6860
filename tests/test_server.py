"""The server: durable rounds, robustness to bad or missing hospitals, budgets, site-level DP, reports."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from server.app import initial_state, run_federation
from server.checkpoint import load_latest
from server.outcome import RunFailed, read_outcome
from server.round_log import Refusal, Rejection, RoundRecord, privacy_so_far, read_round_log
from shared.accounting import AccountingError, check_history
from shared.config import FedMetaConfig
from shared.data.federation import federation_dir
from shared.learning.maml import Params
from shared.run_folder import (
    CHECKPOINTS,
    EPSILON_PLOT,
    META_MODEL,
    METRICS,
    MODEL_CARD_JSON,
    MODEL_CARD_MD,
    STATUS,
    TRAIN_LOSS_PLOT,
)
from shared.wire import (
    GRADIENT_KEY,
    HOSPITAL_KEY,
    METRICS_KEY,
    PARAMS_KEY,
    REFUSED_BUDGET,
    REFUSED_POLICY,
    layout_key,
    named_reason,
    put_arrays,
    take_arrays,
)
from simulations.data.synthetic import write_synthetic_hospital
from tests.loopback import Interrupted, LoopbackGrid

Handler = Callable[[Message], Message | None]


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


def metrics(cfg: FedMetaConfig) -> list[RoundRecord]:
    return read_round_log(Path(cfg.server.out_dir))


def test_a_run_interrupted_after_round_2_resumes_to_the_same_meta_parameters(tmp_path: Path) -> None:
    whole = server_config(tmp_path, server={"out_dir": str(tmp_path / "whole")})
    run(whole)  # same hospitals (and site secrets, hence splits) for both runs
    split = server_config(tmp_path, server={"out_dir": str(tmp_path / "split")})
    grid = LoopbackGrid(split.to_flat(), 3)
    grid.train_rounds_left = 2  # the kill: round 3's messages never go out
    with pytest.raises(Interrupted):
        run(split, grid=grid)
    interrupted = load_latest(Path(split.server.out_dir))
    assert interrupted.round == 2
    with (Path(split.server.out_dir) / METRICS).open("a") as f:
        f.write('{"round": 3, "eligible": 3, "sam')  # what a kill while writing a round's line leaves
    assert sorted(interrupted.names.values()) == ["hospital-000", "hospital-001", "hospital-002"]
    run(split)  # a restarted server with the same out-dir
    expected = load_latest(Path(whole.server.out_dir)).meta_params
    resumed = load_latest(Path(split.server.out_dir))
    assert resumed.round == 4
    for name, value in expected.items():
        torch.testing.assert_close(resumed.meta_params[name], value, rtol=1e-5, atol=1e-6)
    assert [r.round for r in metrics(split)] == [1, 2, 3, 4]


def corrupt(grid: LoopbackGrid, node: int, how: str) -> None:
    honest = grid.handlers[node]

    def handler(msg: Message) -> Message | None:
        reply = honest(msg)
        if how == "vanish" and msg.metadata.message_type == "train":
            return None
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        grads = {n: a.copy() for n, a in take_arrays(reply.content, GRADIENT_KEY, "reply").items()}
        if how == "nan":
            grads["head.weight"][0, 0] = np.nan
        elif how == "shape":
            grads["head.bias"] = np.zeros(5, dtype=np.float32)
        elif how == "enormous":
            grads = {n: g * 1e9 for n, g in grads.items()}
        content = RecordDict({METRICS_KEY: reply.content[METRICS_KEY]})
        put_arrays(content, GRADIENT_KEY, grads)
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
    reasons = {r.hospital: r.reason for r in record.rejected}
    # the roll call named every hospital before round 1 (virtual hospitals are named after their folders)
    assert "non-finite" in reasons["hospital-000"]
    assert "has shape (5,)" in reasons["hospital-001"]
    assert "exceeds server.max-update-norm" in reasons["hospital-002"]
    assert record.participants == 2
    assert before is None and load_latest(Path(cfg.server.out_dir)).round == 1
    assert record.train is not None and record.train.update_norm > 0


def test_a_hospital_that_disappears_mid_round_is_reported_and_the_round_completes(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 2})
    grid = LoopbackGrid(cfg.to_flat(), 3)
    gone = sorted(grid.handlers)[0]
    corrupt(grid, gone, "vanish")
    run(cfg, grid=grid)
    for record in metrics(cfg):
        assert record.participants == 2
        assert Rejection("hospital-000", "no reply within server.round-timeout-s") in record.rejected


def test_a_hospital_with_a_spent_budget_refuses_and_is_not_sampled_again(tmp_path: Path) -> None:
    cfg = server_config(
        tmp_path, privacy={"enabled": True, "noise_multiplier": 1.0, "episode_groups": 8, "groups_per_step": 4}
    )
    grid = LoopbackGrid(cfg.to_flat(), 3)
    strict = sorted(grid.handlers)[0]
    # a real hospital (its own folder, policy and ledger): its stricter budget wins over the run's 8
    folder = write_synthetic_hospital(federation_dir(cfg), 0, seed=cfg.seed)
    policy = {"policy.epsilon-budget": 5.0, "policy.noise-multiplier": 1.0, "policy.episode-groups": 8}
    node = {"data-path": str(folder), "state-dir": str(tmp_path / "strict-state"), "hospital-name": "strict", **policy}
    grid.handlers[strict] = grid.client_handler(strict, 0, node)
    run(cfg, grid=grid)
    records = metrics(cfg)
    refused_rounds = [r.round for r in records if any(x.hospital == "strict" for x in r.refused)]
    assert len(refused_rounds) == 1, "refused once, then never asked again"
    later = [m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.dst_node_id == strict]
    assert len(later) == refused_rounds[0]
    refusal = records[refused_rounds[0] - 1].refused[0]
    assert refusal.kind == "budget" and "privacy budget exhausted" in refusal.reason
    assert max(r.epsilon["strict"] for r in records if "strict" in r.epsilon) <= 5.0


def test_site_level_dp_clips_each_hospital_adds_noise_and_reports_site_epsilon(tmp_path: Path) -> None:
    cfg = server_config(
        tmp_path, server={"rounds": 2, "site_dp": True, "site_clip": 0.01, "site_noise_multiplier": 1.1}
    )
    run(cfg)
    records = metrics(cfg)
    assert records[0].site_epsilon > 0
    assert records[1].site_epsilon > records[0].site_epsilon
    # noise std 0.011 per coordinate over ~1,000 coordinates dwarfs three clipped 0.01 gradients
    assert records[0].train.update_norm > 0.1


def test_replies_crossing_the_wire_hold_only_meta_parameter_shaped_arrays_and_fixed_metrics(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 1, "fraction_evaluate": 1.0})
    grid = run(cfg)
    params = load_latest(Path(cfg.server.out_dir)).meta_params
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    kinds, names = set(), set()
    for reply in grid.replies:
        assert not reply.has_error()
        kinds.add(reply.metadata.message_type)
        # the hospital's public name, and in a train reply the gradient's names and shapes; nothing else
        packed = {GRADIENT_KEY} if reply.metadata.message_type == "train" else set()
        assert set(reply.content.config_records) == {HOSPITAL_KEY} | {layout_key(k) for k in packed}
        assert list(reply.content[HOSPITAL_KEY]) == ["name"]
        names.add(reply.content[HOSPITAL_KEY]["name"])
        assert set(reply.content.array_records) == packed
        for key in packed:
            assert {n: a.shape for n, a in take_arrays(reply.content, key, "reply").items()} == shapes
        for record in reply.content.metric_records.values():
            assert all(isinstance(v, float) for v in record.values())
    assert kinds == {"train", "evaluate"}
    assert names == {"hospital-000", "hospital-001", "hospital-002"}
    assert sorted(metrics(cfg)[0].hospitals) == sorted(names)


def test_run_folder_has_model_card_plots_and_safetensors_model(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 2})
    run(cfg)
    out = Path(cfg.server.out_dir)
    for name in [META_MODEL, MODEL_CARD_MD, MODEL_CARD_JSON, TRAIN_LOSS_PLOT, METRICS]:
        assert (out / name).exists(), name
    assert (out / TRAIN_LOSS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- replies crafted at the wire: what any hospital (or anyone holding its key) could send ----------------


def no_dp_metrics(cfg: FedMetaConfig, **changes: float) -> dict[str, float]:
    episodes = cfg.episode.meta_batch * cfg.server.local_steps
    return {"episodes": float(episodes), "epsilon": 0.0, "delta": 0.0, "dp": 0.0, "query-loss": 0.5} | changes


def dp_metrics(cfg: FedMetaConfig, epsilon: float) -> dict[str, float]:
    episodes = cfg.privacy.groups_per_step * cfg.server.local_steps
    return {"episodes": float(episodes), "epsilon": epsilon, "delta": 1e-5, "dp": 1.0}


def crafted(metrics: dict[str, float], value: float = 0.01, drop: str = "", name: str | None = None) -> Handler:
    """A hospital that answers every train message with a gradient of ``value`` everywhere and these metrics,
    named ``name`` when one is given."""

    def handler(msg: Message) -> Message:
        shapes = {n: a.shape for n, a in take_arrays(msg.content, PARAMS_KEY, "message").items()}
        sent = MetricRecord({k: v for k, v in metrics.items() if k != drop})
        content = RecordDict({METRICS_KEY: sent})
        put_arrays(content, GRADIENT_KEY, {n: np.full(shape, value, dtype=np.float32) for n, shape in shapes.items()})
        if name is not None:
            content[HOSPITAL_KEY] = ConfigRecord({"name": name})
        return Message(content, reply_to=msg)

    return handler


def refusing(code: int, reason: str, name: str | None = None) -> Handler:
    sent = reason if name is None else named_reason(name, reason)
    return lambda msg: Message(Error(code, sent), reply_to=msg)


def crafted_grid(cfg: FedMetaConfig, handlers: list[Handler]) -> LoopbackGrid:
    grid = LoopbackGrid(cfg.to_flat(), len(handlers))
    for node, handler in zip(sorted(grid.handlers), handlers, strict=True):
        grid.handlers[node] = handler
    return grid


def label(grid: LoopbackGrid, index: int) -> str:
    """How the run shows the ``index``-th hospital: the name its real ClientApp gave at the roll call."""
    assert index < len(grid.handlers)
    return f"hospital-{index:03d}"


def test_malformed_metrics_and_inflated_episode_counts_are_rejected_with_reasons_and_the_round_steps(
    tmp_path: Path,
) -> None:
    cfg = server_config(tmp_path, server={"rounds": 1})
    episodes = cfg.episode.meta_batch * cfg.server.local_steps
    grid = crafted_grid(
        cfg,
        [
            crafted(no_dp_metrics(cfg, **{"query-loss": 0.4})),
            crafted(no_dp_metrics(cfg, **{"query-loss": 0.6})),
            crafted(no_dp_metrics(cfg), drop="epsilon"),
            crafted(no_dp_metrics(cfg, **{"query-loss": math.nan})),
            crafted(no_dp_metrics(cfg, episodes=10.0 * episodes)),
            crafted(dp_metrics(cfg, 1.0) | {"query-loss": 0.5}),  # DP releases no un-noised loss
            crafted(no_dp_metrics(cfg, dp=0.5)),
            crafted(no_dp_metrics(cfg), name="../etc"),
        ],
    )
    run(cfg, grid=grid)
    record = metrics(cfg)[0]
    reasons = {r.hospital: r.reason for r in record.rejected}
    assert "metric keys ['epsilon'] are missing" in reasons[label(grid, 2)]
    assert "'query-loss'=nan is not a finite number" in reasons[label(grid, 3)]
    assert f"'episodes'={10 * episodes} is outside [0, {episodes}]" in reasons[label(grid, 4)]
    assert "unexpected metric keys ['query-loss']" in reasons[label(grid, 5)]
    assert "'dp'=0.5 must be 0 (no DP) or 1 (DP)" in reasons[label(grid, 6)]
    assert "hospital name '../etc' does not fit" in reasons[label(grid, 7)]
    assert record.participants == 2 and len(reasons) == 6
    assert record.query_loss == pytest.approx(0.5)  # the two usable replies, each counted once
    assert record.train.episodes == 2 * episodes
    assert load_latest(Path(cfg.server.out_dir)).round == 1


def test_train_query_loss_is_absent_when_every_reply_ran_with_dp(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 1})
    run(cfg, grid=crafted_grid(cfg, [crafted(dp_metrics(cfg, 1.0)), crafted(dp_metrics(cfg, 2.0))]))
    record = metrics(cfg)[0]
    assert record.participants == 2 and record.train is not None and record.query_loss is None


def test_a_hospital_without_dp_is_shown_as_no_dp_in_the_round_line_metrics_and_model_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = server_config(tmp_path, server={"rounds": 2})
    grid = crafted_grid(
        cfg, [crafted(dp_metrics(cfg, 1.5)), crafted(dp_metrics(cfg, 2.1)), crafted(no_dp_metrics(cfg))]
    )
    run(cfg, grid=grid)
    raw = label(grid, 2)
    assert f"epsilon max no DP (1 of 3 hospitals without DP: {raw}; 2.10 at the others)" in capsys.readouterr().out
    record = metrics(cfg)[-1]
    assert record.epsilon[raw] is None and record.dp[raw] is False and record.epsilon_max is None
    assert record.epsilon[label(grid, 1)] == 2.1 and record.dp[label(grid, 1)] is True
    out = Path(cfg.server.out_dir)
    card = json.loads((out / MODEL_CARD_JSON).read_text())["privacy"]["epsilon"]
    assert card["per_hospital"][raw] is None and card["without_dp"] == [raw] and card["max"] is None
    markdown = (out / MODEL_CARD_MD).read_text().splitlines()
    assert f"| {raw} | no DP (epsilon infinite) |" in markdown
    assert "- max epsilon over hospitals: no DP, infinite (1 of 3 hospitals without DP; 2.1 at the others)" in markdown
    assert (out / EPSILON_PLOT).exists()


def test_a_round_line_holds_the_privacy_of_that_rounds_releases_and_the_fold_holds_every_hospital(
    tmp_path: Path,
) -> None:
    cfg = server_config(tmp_path, server={"rounds": 3, "fraction_train": 0.5})
    grid = crafted_grid(cfg, [crafted(dp_metrics(cfg, epsilon)) for epsilon in (1.0, 2.0, 3.0, 4.0)])
    run(cfg, grid=grid)
    records = metrics(cfg)
    assert all(sorted(r.epsilon) == sorted(r.dp) == r.released and r.sampled == 2 for r in records)
    standing = privacy_so_far(records)
    assert set(standing.epsilon) == {h for r in records for h in r.released} and all(standing.dp.values())
    for r, so_far in ((r, privacy_so_far(records[: r.round])) for r in records):
        assert r.epsilon_max == max(so_far.epsilon.values())


def test_policy_and_budget_refusals_exclude_the_hospital_and_are_reported_with_their_reasons(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 3})
    policy = "refused by the hospital's privacy policy: privacy.enabled=false asks for less than dp=true"
    grid = crafted_grid(
        cfg,
        [
            crafted(no_dp_metrics(cfg)),
            crafted(no_dp_metrics(cfg)),
            refusing(REFUSED_POLICY, policy),
            refusing(REFUSED_BUDGET, "privacy budget exhausted"),
        ],
    )
    run(cfg, grid=grid)
    records = metrics(cfg)
    assert records[0].refused == [
        Refusal(label(grid, 2), "policy", policy),
        Refusal(label(grid, 3), "budget", "privacy budget exhausted"),
    ]
    assert [r.refused for r in records[1:]] == [[], []]
    assert all(r.participants == 2 and not r.rejected for r in records)
    asked = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"]
    assert asked.count(sorted(grid.handlers)[2]) == asked.count(sorted(grid.handlers)[3]) == 1


def site_dp_config(tmp_path: Path, out: str, rounds: int = 1) -> FedMetaConfig:
    # SGD at learning rate 1: the step is exactly the released gradient
    server = {"rounds": rounds, "out_dir": str(tmp_path / out), "optimizer": "sgd", "meta_lr": 1.0}
    server |= {"lr_schedule": "constant", "site_dp": True, "site_clip": 1.0, "site_noise_multiplier": 1.0}
    return server_config(tmp_path, server=server)


def released_noise(cfg: FedMetaConfig, hospitals: int, value: float) -> Params:
    """Run one site-DP round over ``hospitals`` crafted replies and return the noise the release carried."""
    grid = crafted_grid(cfg, [crafted(no_dp_metrics(cfg), value=value) for _ in range(hospitals)])
    run(cfg, grid=grid)
    before = initial_state(cfg).meta_params
    after = load_latest(Path(cfg.server.out_dir)).meta_params
    # released = (sum of clipped gradients + noise) / hospitals; each gradient is within the clip here
    return {n: (before[n] - after[n]).double() * hospitals - hospitals * value for n in before}


def norm(tensors: Params) -> float:
    return float(torch.sqrt(sum(t.double().square().sum() for t in tensors.values())))


def test_site_level_dp_noise_is_fresh_every_run_and_not_recoverable_from_the_seed(tmp_path: Path) -> None:
    first = released_noise(site_dp_config(tmp_path, "first"), hospitals=3, value=1e-4)
    second = released_noise(site_dp_config(tmp_path, "second"), hospitals=3, value=1e-4)
    cfg = site_dp_config(tmp_path, "first")
    std = cfg.server.site_noise_multiplier * cfg.server.site_clip
    coordinates = sum(t.numel() for t in first.values())
    assert norm(first) == pytest.approx(std * math.sqrt(coordinates), rel=0.1)
    assert norm({n: first[n] - second[n] for n in first}) > norm(first)  # independent draws: about sqrt(2) x
    # what the old server did: noise from torch.Generator().manual_seed(cfg.seed), in parameter order
    seeded = torch.Generator().manual_seed(cfg.seed)
    regenerated = {n: std * torch.randn(t.shape, generator=seeded).double() for n, t in first.items()}
    assert norm({n: first[n] - regenerated[n] for n in first}) > norm(first)
    checkpoint = Path(cfg.server.out_dir) / CHECKPOINTS
    assert not list(checkpoint.rglob("rng*")), "no noise state is stored"


def test_a_site_dp_run_resumed_after_a_kill_accounts_every_release_once(tmp_path: Path) -> None:
    cfg = site_dp_config(tmp_path, "split", rounds=3)
    handlers = [crafted(no_dp_metrics(cfg)) for _ in range(3)]
    grid = crafted_grid(cfg, handlers)
    grid.train_rounds_left = 2
    with pytest.raises(Interrupted):
        run(cfg, grid=grid)
    run(cfg, grid=crafted_grid(cfg, handlers))
    records = metrics(cfg)
    assert [r.round for r in records] == [1, 2, 3]
    accountant = RDPAccountant()
    for record in records:
        accountant.step(noise_multiplier=cfg.server.site_noise_multiplier, sample_rate=cfg.server.fraction_train)
        assert record.site_epsilon == pytest.approx(accountant.get_epsilon(cfg.server.site_delta))
    assert load_latest(Path(cfg.server.out_dir)).site_accountant == [[1.0, 1.0, 3]]


def test_site_level_dp_samples_hospitals_by_poisson_and_accounts_at_that_rate(tmp_path: Path) -> None:
    cfg = site_dp_config(tmp_path, "poisson", rounds=10).replace(server={"fraction_train": 0.5, "min_train_nodes": 1})
    run(cfg, grid=crafted_grid(cfg, [crafted(no_dp_metrics(cfg)) for _ in range(4)]))
    # a fixed-size draw would take 2 of 4 every round; Poisson does so with probability 0.375 ** 10 = 5e-5
    assert {r.sampled for r in metrics(cfg)} != {2}
    assert load_latest(Path(cfg.server.out_dir)).site_accountant == [[1.0, 0.5, 10]]


def test_prv_accounting_that_would_take_gigabytes_is_refused_before_it_starts() -> None:
    check_history("prv", [(1.0, 0.25, 100)], delta=1e-5)
    with pytest.raises(AccountingError, match=re.escape("PRV accounting of noise multiplier 0.1 over 100 steps")):
        check_history("prv", [(0.1, 0.25, 100)], delta=1e-5)  # measured: 27 M grid points, 4.4 GB, 100 s
    with pytest.raises(AccountingError, match="over 10000 steps"):
        check_history("prv", [(0.5, 0.25, 10_000)], delta=1e-5)
    for history in ([(1.0, 0.25, -50)], [(0.0, 0.25, 1)], [(1.0, 1.5, 1)], [(1.0, 0.25, 10**12)]):
        with pytest.raises(AccountingError):
            check_history("rdp", history, delta=1e-5)


# -- hospitals by name; runs in which no hospital can train -------------------------------------------------


def test_hospitals_appear_by_their_chosen_names_in_round_lines_records_and_model_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = server_config(tmp_path, server={"rounds": 2, "fraction_evaluate": 1.0})
    grid = LoopbackGrid(cfg.to_flat(), 3)
    nodes = sorted(grid.handlers)
    for node, (partition, name) in zip(nodes, enumerate(["st-olav", "karolinska", "charite"]), strict=True):
        grid.handlers[node] = grid.client_handler(node, partition, {"hospital-name": name})
    grid.handlers[nodes[2]] = refusing(REFUSED_BUDGET, "privacy budget exhausted: epsilon spent 7.997", "charite")
    run(cfg, grid=grid)
    out = capsys.readouterr().out
    assert "fedmeta: round 1/2, 2/3 hospitals, 1 refused (charite)" in out
    assert re.search(r"query loss \d\.\d{3}", out)
    assert "epsilon max no DP (2 of 2 hospitals without DP: karolinska, st-olav)" in out
    records = metrics(cfg)
    assert records[0].refused[0].hospital == "charite"
    assert records[0].trained == ["karolinska", "st-olav"] and sorted(records[0].epsilon) == records[0].trained
    assert sorted(records[1].hospitals) == ["karolinska", "st-olav"]
    out_dir = Path(cfg.server.out_dir)
    card = json.loads((out_dir / MODEL_CARD_JSON).read_text())
    assert sorted(card["data"]["hospitals"]) == ["charite", "karolinska", "st-olav"]
    assert card["data"]["hospitals"]["st-olav"] == {"rounds_trained": 2, "releases": 2, "epsilon": None, "dp": False}
    markdown = (out_dir / MODEL_CARD_MD).read_text()
    assert "| st-olav | 2 | 2 | no DP (epsilon infinite) | off |  |" in markdown.splitlines()
    everything = markdown + (out_dir / METRICS).read_text() + out
    assert not any(str(node) in everything for node in nodes), "node ids stay out of what people read"


def test_two_hospitals_claiming_one_name_are_kept_apart_and_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = server_config(tmp_path, server={"rounds": 2})
    grid = crafted_grid(
        cfg,
        [
            crafted(no_dp_metrics(cfg), name="twin"),
            crafted(no_dp_metrics(cfg), name="twin"),
            crafted(no_dp_metrics(cfg), name="solo"),
        ],
    )
    first, second, _ = sorted(grid.handlers)
    with caplog.at_level("WARNING", logger="server.strategy"):
        run(cfg, grid=grid)
    for record in metrics(cfg):
        assert record.trained == sorted(["solo", f"twin (node {first})", f"twin (node {second})"])
    warnings = [r.getMessage() for r in caplog.records if "call themselves twin" in r.getMessage()]
    assert len(warnings) == 1 and "fedmeta client --name" in warnings[0]
    assert load_latest(Path(cfg.server.out_dir)).names == {
        first: "twin",
        second: "twin",
        sorted(grid.handlers)[2]: "solo",
    }


def test_a_run_where_every_hospital_refuses_stops_early_with_each_hospitals_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = server_config(
        tmp_path,
        server={"rounds": 3, "wait_for_nodes_s": 300.0},  # a stop must not wait for hospitals that refused
        privacy={"enabled": True, "noise_multiplier": 1.0, "episode_groups": 8, "groups_per_step": 4},
    )
    grid = LoopbackGrid(cfg.to_flat(), 3)
    policies = [
        # the first release would pass the budget
        {"policy.epsilon-budget": 1e-3, "policy.noise-multiplier": 1.0, "policy.episode-groups": 8},
        {"policy.epsilon-budget": 1e-3, "policy.noise-multiplier": 1.0, "policy.episode-groups": 8},
        {"policy.max-meta-batch": 1},
    ]
    for index, (node, policy) in enumerate(zip(sorted(grid.handlers), policies, strict=True)):
        folder = write_synthetic_hospital(federation_dir(cfg), index, seed=cfg.seed)
        settings = {"data-path": str(folder), "state-dir": str(tmp_path / f"h{index}"), "hospital-name": f"h{index}"}
        grid.handlers[node] = grid.client_handler(node, index, settings | policy)
    with pytest.raises(RunFailed) as stopped:
        run(cfg, grid=grid)
    reason = str(stopped.value).splitlines()
    assert reason[0] == "no hospital can train:"
    assert reason[1].startswith("  h0 refused (budget): privacy budget exhausted: epsilon spent 0.000")
    assert reason[2].startswith("  h1 refused (budget): privacy budget exhausted")
    assert reason[3] == (
        "  h2 refused (policy): refused by the hospital's privacy policy: the run asks episode.meta-batch=2; "
        "this hospital allows at most max-meta-batch = 1"
    )
    assert "raises epsilon-budget in its policy.toml" in reason[4]
    assert [m.metadata.message_type for m in grid.sent] == ["train"] * 3, "round 2 never started"
    out_dir = Path(cfg.server.out_dir)
    outcome = read_outcome(out_dir)
    assert outcome.state == "failed" and outcome.reason == str(stopped.value) and outcome.rounds_trained == 0
    assert [r.round for r in metrics(cfg)] == [1] and not (out_dir / META_MODEL).exists()
    assert "**Failed**" in (out_dir / MODEL_CARD_MD).read_text()
    out = capsys.readouterr().out
    assert "fedmeta: round 1/3, 0/3 hospitals, 3 refused (h0, h1, h2)" in out
    assert "fedmeta: stopped: no hospital can train:" in out and "finished" not in out


def test_a_run_in_which_no_round_trains_fails_instead_of_finishing(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 2})
    grid = crafted_grid(cfg, [crafted(no_dp_metrics(cfg, **{"query-loss": math.nan}), name=f"h{i}") for i in range(2)])
    with pytest.raises(
        RunFailed, match=r"no round trained the meta-model: every round had fewer than server\.min-train"
    ):
        run(cfg, grid=grid)
    assert [r.participants for r in metrics(cfg)] == [0, 0]
    assert read_outcome(Path(cfg.server.out_dir)).state == "failed"


def test_a_run_no_hospital_connects_to_stops_with_that_reason(tmp_path: Path) -> None:
    cfg = server_config(tmp_path)
    with pytest.raises(RunFailed, match=re.escape("no hospital connected within server.wait-for-nodes-s=0s")):
        run(cfg, hospitals=0)
    status = json.loads((Path(cfg.server.out_dir) / STATUS).read_text())
    assert status["state"] == "failed" and status["rounds_trained"] == 0


def test_a_completed_run_records_its_outcome(tmp_path: Path) -> None:
    cfg = server_config(tmp_path, server={"rounds": 1})
    run(cfg, grid=crafted_grid(cfg, [crafted(no_dp_metrics(cfg)) for _ in range(2)]))
    outcome = read_outcome(Path(cfg.server.out_dir))
    assert (outcome.state, outcome.reason, outcome.rounds, outcome.rounds_trained) == ("completed", "", 1, 1)
