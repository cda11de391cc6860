"""The meta-gradient strategy: hospitals send private outer-loop gradients, the server steps its
meta-optimizer.

Flower's built-in FedAvg/FedAdam aggregate *weights*; here every reply is a gradient, so this
strategy subclasses FedAvg only for its round loop (``start``) and replaces sampling, aggregation
and evaluation. Flower's DP wrappers clip ``client arrays - global arrays`` (weights too), so
site-level DP (protecting a whole hospital) is implemented here as well: clip each hospital's
gradient, sum, add Gaussian noise, divide by the number sampled, account with Opacus' RDP.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from client.privacy import make_accountant
from server.checkpoint import ServerState, save
from shared.config import FedMetaConfig
from shared.maml import Params
from shared.wire import (
    CONFIG_KEY,
    EVALUATE_METRICS,
    GRADIENT_KEY,
    METRICS_KEY,
    PARAMS_KEY,
    REFUSED_BUDGET,
    TRAIN_METRICS,
    WireError,
    WireSchema,
    validate_metrics,
)

log = logging.getLogger(__name__)
HeldoutEvaluation = Callable[[Params], dict[str, dict[str, float]]]
PRIMARY_METRIC = "balanced-accuracy"


def hospital_label(node_id: int) -> str:
    return f"node-{node_id}"


def first_line(text: str | None, limit: int = 200) -> str:
    lines = (text or "").strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def mean_metrics(per_hospital: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for m in per_hospital.values() for k in m})
    return {k: float(np.mean([m[k] for m in per_hospital.values() if k in m])) for k in keys}


def worst_hospital(per_hospital: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    scored = [(m[PRIMARY_METRIC], h) for h, m in per_hospital.items() if PRIMARY_METRIC in m]
    if not scored:
        return None
    value, hospital = min(scored)
    return {"hospital": hospital, PRIMARY_METRIC: value}


class MetaGradientStrategy(FedAvg):
    def __init__(
        self,
        cfg: FedMetaConfig,
        run_dir: Path,
        state: ServerState,
        heldout: HeldoutEvaluation | None = None,
    ) -> None:
        server = cfg.server
        super().__init__(
            fraction_train=server.fraction_train,
            fraction_evaluate=server.fraction_evaluate,
            min_train_nodes=server.min_train_nodes,
            min_available_nodes=server.min_train_nodes,
        )
        self.cfg = cfg
        self.run_dir = run_dir
        self.heldout = heldout
        self.round_offset = state.round
        self.params = {n: torch.nn.Parameter(p.detach().clone().float()) for n, p in state.meta_params.items()}
        self.schema = WireSchema.of({n: p.detach().numpy() for n, p in self.params.items()})
        optimizer_cls = torch.optim.Adam if server.optimizer == "adam" else torch.optim.SGD
        self.optimizer = optimizer_cls(list(self.params.values()), lr=server.meta_lr)
        self.scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=server.rounds)
            if server.lr_schedule == "cosine"
            else torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        )
        if state.optimizer:
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
        self.sampler = np.random.default_rng(cfg.seed)
        if state.sampler_rng:
            self.sampler.bit_generator.state = state.sampler_rng
        self.site_noise = torch.Generator().manual_seed(cfg.seed)
        if state.site_noise_rng.numel():
            self.site_noise.set_state(state.site_noise_rng)
        self.excluded = dict(state.excluded)
        self.privacy = dict(state.privacy)
        self.site_accountant = [list(step) for step in state.site_accountant]
        self.record: dict[str, Any] = {}
        self._sent: list[Message] = []
        self._round_started = 0.0

    # -- sampling ------------------------------------------------------------------------

    def _eligible_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.cfg.server.wait_for_nodes_s
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            eligible = [n for n in nodes if hospital_label(n) not in self.excluded]
            if len(eligible) >= self.cfg.server.min_train_nodes or time.monotonic() >= deadline:
                return eligible
            time.sleep(0.5)

    def _sample(self, nodes: list[int], size: int) -> list[int]:
        # node ids are unsigned 64-bit: numpy would turn a mix of large ones into float64
        return sorted(nodes[i] for i in self.sampler.choice(len(nodes), size=size, replace=False)) if size else []

    def _messages(
        self, nodes: Iterable[int], arrays: ArrayRecord, message_type: str, server_round: int
    ) -> list[Message]:
        content = RecordDict({PARAMS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": server_round})})
        ttl = self.cfg.server.round_timeout_s
        return [Message(content, dst_node_id=int(n), message_type=message_type, ttl=ttl) for n in nodes]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        self._round_started = time.monotonic()
        self.record = {"round": absolute}
        eligible = self._eligible_nodes(grid)
        size = min(
            len(eligible),
            max(self.cfg.server.min_train_nodes, math.ceil(self.cfg.server.fraction_train * len(eligible))),
        )
        chosen = self._sample(eligible, size)
        self._sent = self._messages(chosen, arrays, MessageType.TRAIN, absolute)
        self.record["sampled"] = len(chosen)
        self.record["eligible"] = len(eligible)
        self.record["bytes_down"] = len(chosen) * sum(p.numel() * 4 for p in self.params.values())
        return self._sent

    def evaluates(self, absolute_round: int) -> bool:
        server = self.cfg.server
        return absolute_round % server.eval_every == 0 or absolute_round == server.rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.cfg.server.fraction_evaluate <= 0 or not self.evaluates(server_round + self.round_offset):
            return []
        eligible = sorted(int(n) for n in grid.get_node_ids())
        size = max(1, math.ceil(self.cfg.server.fraction_evaluate * len(eligible))) if eligible else 0
        chosen = self._sample(eligible, size)
        self._sent = self._messages(chosen, arrays, MessageType.EVALUATE, server_round + self.round_offset)
        return self._sent

    def _by_sender(self, replies: Iterable[Message]) -> list[tuple[str, Message]]:
        # errors the SuperLink makes itself (node gone, reply expired) come from node 1: map them back
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        return [(hospital_label(sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)), r) for r in replies]

    # -- aggregation ---------------------------------------------------------------------

    def _validated_gradient(self, reply: Message, hospital: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        record = reply.content.array_records.get(GRADIENT_KEY)
        metrics = reply.content.metric_records.get(METRICS_KEY)
        if record is None or metrics is None:
            raise WireError(f"reply from {hospital} lacks '{GRADIENT_KEY}' or '{METRICS_KEY}'")
        grads = {name: array.numpy() for name, array in record.items()}
        self.schema.validate(grads, f"reply from {hospital}")
        metrics = dict(metrics)
        validate_metrics(metrics, TRAIN_METRICS, f"reply from {hospital}")
        norm = math.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads.values()))
        if norm > self.cfg.server.max_update_norm:
            raise WireError(
                f"reply from {hospital}: gradient norm {norm:.3g} exceeds server.max-update-norm "
                f"{self.cfg.server.max_update_norm:.3g}"
            )
        return grads, metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[tuple[dict[str, np.ndarray], dict[str, float]]] = []
        rejected, refused = [], []
        answered = set()
        for hospital, reply in self._by_sender(replies):
            answered.add(hospital)
            if reply.has_error():
                reason = first_line(reply.error.reason)
                if reply.error.code == REFUSED_BUDGET:
                    refused.append({"hospital": hospital, "reason": reason})
                    self.excluded[hospital] = reason
                else:
                    rejected.append({"hospital": hospital, "reason": f"error {reply.error.code}: {reason}"})
                continue
            try:
                grads, metrics = self._validated_gradient(reply, hospital)
            except WireError as err:
                rejected.append({"hospital": hospital, "reason": str(err)})
                continue
            accepted.append((grads, metrics))
            self.privacy[hospital] = {"epsilon": metrics["epsilon"], "delta": metrics["delta"], "dp": metrics["dp"]}
        for message in self._sent:
            hospital = hospital_label(message.metadata.dst_node_id)
            if hospital not in answered:
                rejected.append({"hospital": hospital, "reason": "no reply within server.round-timeout-s"})
        for entry in rejected + refused:
            log.warning("round %d: %s not used: %s", self.record["round"], entry["hospital"], entry["reason"])
        self.record.update(participants=len(accepted), rejected=rejected, refused=refused)
        self.record["bytes_up"] = sum(sum(g.nbytes for g in grads.values()) for grads, _ in accepted)
        if len(accepted) < self.cfg.server.min_train_nodes:
            log.warning(
                "round %d: %d usable replies < server.min-train-nodes=%d: meta-parameters unchanged",
                self.record["round"],
                len(accepted),
                self.cfg.server.min_train_nodes,
            )
            return None, None
        outer_grad = self._aggregate(accepted)
        for name, p in self.params.items():
            p.grad = outer_grad[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        episodes = [m["episodes"] for _, m in accepted]
        losses = [m["query-loss"] for _, m in accepted]
        self.record["train"] = {
            "query-loss": float(np.average(losses, weights=np.maximum(episodes, 1e-9))),
            "episodes": float(sum(episodes)),
            "update-norm": float(torch.sqrt(sum(g.square().sum() for g in outer_grad.values()))),
            "lr": float(self.scheduler.get_last_lr()[0]),
        }
        return ArrayRecord({n: p.detach().clone() for n, p in self.params.items()}), MetricRecord(self.record["train"])

    def _aggregate(self, accepted: list[tuple[dict[str, np.ndarray], dict[str, float]]]) -> Params:
        server = self.cfg.server
        grads = [{n: torch.from_numpy(np.array(g)) for n, g in grads.items()} for grads, _ in accepted]
        if server.site_dp:
            return self._site_private_sum(grads)
        if server.aggregation == "episodes":
            weights = np.array([max(m["episodes"], 0.0) for _, m in accepted])
            weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(accepted), 1 / len(accepted))
        else:
            weights = np.full(len(accepted), 1 / len(accepted))
        return {n: sum(float(w) * g[n] for w, g in zip(weights, grads, strict=True)) for n in self.params}

    def _site_private_sum(self, grads: list[Params]) -> Params:
        """Clip each hospital to ``site-clip``, sum, add N(0, (z * clip)^2), divide by the number sampled.
        Uniform weights: weighting by episodes would make a hospital's sensitivity data-dependent."""
        server = self.cfg.server
        clipped = []
        for g in grads:
            norm = float(torch.sqrt(sum(t.square().sum() for t in g.values())))
            scale = min(1.0, server.site_clip / (norm + 1e-12))
            clipped.append({n: t * scale for n, t in g.items()})
        std = server.site_noise_multiplier * server.site_clip
        sampled = max(1, self.record["sampled"])
        noisy = {
            n: (sum(c[n] for c in clipped) + std * torch.randn(p.shape, generator=self.site_noise)) / sampled
            for n, p in self.params.items()
        }
        sample_rate = self.record["sampled"] / max(1, self.record["eligible"])
        self.site_accountant.append([server.site_noise_multiplier, sample_rate, 1])
        return noisy

    def site_epsilon(self) -> float | None:
        if not self.cfg.server.site_dp or not self.site_accountant:
            return None
        accountant = make_accountant("rdp")
        accountant.history = [(z, q, int(n)) for z, q, n in self.site_accountant]
        return float(accountant.get_epsilon(delta=self.cfg.server.site_delta))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_hospital = {}
        for hospital, reply in self._by_sender(replies):
            if reply.has_error():
                log.warning("evaluation from %s failed: %s", hospital, first_line(reply.error.reason))
                continue
            metrics = dict(reply.content.metric_records.get(METRICS_KEY) or {})
            try:
                validate_metrics(metrics, EVALUATE_METRICS, f"evaluation from {hospital}")
            except WireError as err:
                log.warning("%s", err)
                continue
            per_hospital[hospital] = metrics
        if not per_hospital:
            return None
        self.record["hospitals"] = per_hospital
        self.record["worst_hospital"] = worst_hospital(per_hospital)
        return MetricRecord(mean_metrics(per_hospital))

    # -- end of round: held-out evaluation, metrics line, checkpoint -------------------------

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: called after every round (and once before the first, skipped)."""
        if server_round == 0:
            return None
        if self.heldout is not None and self.evaluates(self.record["round"]):
            heldout = self.heldout({n: p.detach() for n, p in self.params.items()})
            self.record["heldout"] = heldout
            self.record["heldout_mean"] = mean_metrics(heldout)
            self.record["heldout_worst"] = worst_hospital(heldout)
        self.record["epsilon"] = {h: p["epsilon"] for h, p in self.privacy.items()}
        self.record["epsilon_max"] = max(self.record["epsilon"].values(), default=0.0)
        self.record["site_epsilon"] = self.site_epsilon()
        self.record["seconds"] = time.monotonic() - self._round_started
        self._append_metrics(self.record)
        save(self.run_dir, self.state())
        print(progress_line(self.record, self.cfg.server.rounds), flush=True)
        return MetricRecord(self.record["heldout_mean"]) if "heldout_mean" in self.record else None

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def state(self) -> ServerState:
        return ServerState(
            round=self.record["round"],
            meta_params={n: p.detach() for n, p in self.params.items()},
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            sampler_rng=self.sampler.bit_generator.state,
            site_noise_rng=self.site_noise.get_state(),
            excluded=self.excluded,
            privacy=self.privacy,
            site_accountant=self.site_accountant,
            config=self.cfg.to_flat(),
        )


def progress_line(record: dict[str, Any], rounds: int) -> str:
    parts = [
        f"round {record['round']}/{rounds}",
        f"{record.get('participants', 0)}/{record.get('sampled', 0)} hospitals",
    ]
    if record.get("rejected") or record.get("refused"):
        parts.append(f"{len(record.get('rejected', []))} rejected, {len(record.get('refused', []))} refused")
    if "train" in record:
        parts.append(f"query loss {record['train']['query-loss']:.3f}")
    if "heldout_mean" in record:
        parts.append(f"held-out balanced acc {record['heldout_mean'].get(PRIMARY_METRIC, float('nan')):.3f}")
    parts.append(f"epsilon max {record['epsilon_max']:.2f}")
    parts.append(f"{record['seconds']:.1f}s")
    return "fedmeta: " + ", ".join(parts)
