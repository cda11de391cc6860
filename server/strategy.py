"""The meta-gradient strategy: hospitals send private outer-loop gradients, the server steps its
meta-optimizer.

Flower's built-in FedAvg/FedAdam aggregate *weights*; here every reply is a gradient, so this
strategy subclasses FedAvg only for its round loop (``start``) and replaces sampling, aggregation
and evaluation. Each round is three steps that a wrapper strategy can recombine
(:class:`server.site_dp.SiteLevelDP` does): choose hospitals, accept the replies that fit the wire
contract and the run's settings, step the meta-optimizer with one outer-loop gradient.

A reply that does not fit is rejected with a reason and the round goes on with the others; a hospital
that refuses (its budget is spent, or the run asks what its policy does not allow) is not asked again.
When no connected hospital is left to ask, or none connected at all, the run stops with
:class:`NoHospitalCanTrain`, whose message gives each hospital's reason.

Hospitals are shown by the public name each one sends with its replies (``shared.wire.HOSPITAL_KEY``, or
the ``[name]`` prefix of an error's reason); the strategy keeps node id -> name (checkpointed) and keys its
own bookkeeping by node id. A hospital not yet named is shown as ``node-ID``; two nodes with the same
name as ``NAME (node ID)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.checkpoint import ServerState, save
from server.outcome import RunFailed
from server.round_log import (
    HEADLINE_METRIC,
    Metrics,
    PrivacySoFar,
    Refusal,
    Rejection,
    RoundRecord,
    TrainStep,
    Worst,
    append_round,
    as_json,
    mean_metrics,
)
from shared.config import FedMetaConfig
from shared.learning.maml import Params
from shared.run_folder import METRICS
from shared.wire import (
    CONFIG_KEY,
    EVALUATE_METRICS,
    GRADIENT_KEY,
    HOSPITAL_KEY,
    METRICS_KEY,
    NO_DP_TRAIN_METRICS,
    PARAMS_KEY,
    REFUSED_BUDGET,
    REFUSED_POLICY,
    TRAIN_METRICS,
    WireError,
    WireSchema,
    put_arrays,
    split_named_reason,
    take_arrays,
    validate_hospital_record,
    validate_metrics,
)

log = logging.getLogger(__name__)
HeldoutEvaluation = Callable[[Params], dict[str, Metrics]]
# A usable train reply: its gradient arrays and its metrics.
Accepted = tuple[dict[str, np.ndarray], dict[str, float]]
# Error codes by which a hospital says no for the rest of the run, and what the round record calls them.
REFUSAL_KINDS = {REFUSED_BUDGET: "budget", REFUSED_POLICY: "policy"}
# What each kind of refusal leaves the operator to do; the hospital alone decides.
REFUSAL_HINTS = {
    "budget": (
        "A new budget is each hospital's decision: it raises epsilon-budget in its policy.toml "
        "(a simulation's virtual hospitals start afresh in a new run folder)."
    ),
    "policy": "Each refusal names a setting: run with settings every policy allows, or ask the hospital.",
}
# The most hospitals a stop message lists one per line; the rest are counted.
LISTED_HOSPITALS = 20
# A reply with the node it came from and, when its name claim does not fit the wire contract, why.
Sender = tuple[int, Message, str | None]


class NoHospitalCanTrain(RunFailed):
    """Every connected hospital has refused this run, or none connected: the run stops."""


def node_label(node_id: int) -> str:
    return f"node-{node_id}"


def claimed_name(reply: Message, what: str) -> str | None:
    """The public name a reply carries, or None; raises WireError when the claim does not fit."""
    if reply.has_error():
        return split_named_reason(reply.error.reason, what)[0]
    record = reply.content.config_records.get(HOSPITAL_KEY)
    return None if record is None else validate_hospital_record(record, what)


def error_reason(reply: Message) -> str:
    """An error reply's reason without its name prefix (call after :func:`claimed_name` accepted it)."""
    return first_line(split_named_reason(reply.error.reason, "error reply")[1])


def content_digest(arrays: dict[str, np.ndarray]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    return digest.digest()


def first_line(text: str | None, limit: int = 200) -> str:
    lines = (text or "").strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def worst_hospital(per_hospital: dict[str, Metrics]) -> Worst | None:
    scored = [(m[HEADLINE_METRIC], h) for h, m in per_hospital.items() if HEADLINE_METRIC in m]
    if not scored:
        return None
    value, hospital = min(scored)
    return Worst(hospital, value)


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
            weighted_by_key="episodes" if server.aggregation == "episodes" and not server.site_dp else "uniform",
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
        # node id -> the hospital's public name, and how many nodes claim each name
        self.names = dict(state.names)
        self.claims = Counter(self.names.values())
        self.duplicates_warned = {name for name, count in self.claims.items() if count > 1}
        self.excluded = dict(state.excluded)  # node id -> "kind: reason" it refused training with
        self.excluded_evaluate = dict(state.excluded_evaluate)
        self.privacy = {node: {**p, "dp": bool(p["dp"])} for node, p in state.privacy.items()}
        # the site-level DP accountant's history (noise multiplier, sample rate, steps): public, checkpointed
        self.site_accountant = [list(step) for step in state.site_accountant]
        # The most episodes a reply may say its mean gradient is over (dp -> bound): what the run asks for.
        self.max_episodes = {
            False: cfg.episode.meta_batch * server.local_steps,
            True: cfg.privacy.groups_per_step * server.local_steps,
        }
        self.record = RoundRecord(state.round)
        self._sent: list[Message] = []
        self._round_started = 0.0

    # -- names -----------------------------------------------------------------------------

    def label(self, node: int) -> str:
        """What the operator sees for ``node``: its name, kept apart from another node with the same name."""
        name = self.names.get(node)
        if name is None:
            return node_label(node)
        return f"{name} (node {node})" if self.claims[name] > 1 else name

    def _learn_name(self, node: int, name: str) -> None:
        old = self.names.get(node)
        if old == name:
            return
        if old is not None:
            self.claims[old] -= 1
            log.info("node %d now calls itself %s (was %s)", node, name, old)
        self.names[node] = name
        self.claims[name] += 1
        log.debug("hospital %s is node %d", name, node)
        if self.claims[name] > 1 and name not in self.duplicates_warned:
            self.duplicates_warned.add(name)
            nodes = sorted(n for n, claimed in self.names.items() if claimed == name)
            log.warning(
                "%d hospitals call themselves %s (nodes %s): shown as '%s (node ID)'; "
                "each hospital should choose its own name (fedmeta client --name)",
                len(nodes),
                name,
                ", ".join(map(str, nodes)),
                name,
            )

    # -- sampling ------------------------------------------------------------------------

    def _eligible_nodes(self, grid: Grid) -> list[int]:
        """The connected hospitals that have not refused; raises :class:`NoHospitalCanTrain` when there are none.

        Waits up to server.wait-for-nodes-s for server.min-train-nodes of them, but not once every connected
        hospital has refused."""
        server = self.cfg.server
        deadline, reported = time.monotonic() + server.wait_for_nodes_s, None
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            eligible = [n for n in nodes if n not in self.excluded]
            if len(eligible) >= server.min_train_nodes or time.monotonic() >= deadline:
                break
            if nodes and not eligible:
                break
            if len(eligible) != reported:  # a line when the count changes, none while nothing happens
                reported = len(eligible)
                print(
                    f"fedmeta: round {self.record.round} waits for hospitals: {reported} of "
                    f"server.min-train-nodes={server.min_train_nodes} connected (up to {server.wait_for_nodes_s:g}s)",
                    flush=True,
                )
            time.sleep(0.5)
        if not nodes:
            raise NoHospitalCanTrain(
                f"no hospital connected within server.wait-for-nodes-s={self.cfg.server.wait_for_nodes_s:g}s: "
                "start `fedmeta client` at each hospital and check it reaches this server"
            )
        if not eligible:
            raise NoHospitalCanTrain(self.refusals_text(nodes))
        self.roll_call(grid, eligible)
        return eligible

    def roll_call(self, grid: Grid, nodes: list[int]) -> None:
        """Ask hospitals not yet named for their public name (a query message; they read no data), so that
        sampling can follow names, which stay the same from run to run, where node ids do not."""
        unnamed = [n for n in nodes if n not in self.names]
        if not unnamed:
            return
        query = RecordDict({CONFIG_KEY: ConfigRecord({"server-round": self.record.round})})
        ttl = self.cfg.server.round_timeout_s
        messages = [Message(query, dst_node_id=n, message_type=MessageType.QUERY, ttl=ttl) for n in unnamed]
        for reply in grid.send_and_receive(messages, timeout=ttl):
            if reply.has_error():
                continue
            try:
                name = claimed_name(reply, f"roll call reply from {node_label(reply.metadata.src_node_id)}")
            except WireError as err:
                log.warning("%s", err)
                continue
            if name is not None:
                self._learn_name(int(reply.metadata.src_node_id), name)

    def refusals_text(self, nodes: list[int]) -> str:
        """``no hospital can train:``, one line per refused hospital with its reason, then what can be done."""
        lines, kinds = [], set()
        for node in nodes[:LISTED_HOSPITALS]:
            kind, _, reason = self.excluded[node].partition(": ")
            kinds.add(kind)
            lines.append(f"  {self.label(node)} refused ({kind}): {reason}")
        if len(nodes) > LISTED_HOSPITALS:
            lines.append(f"  ... and {len(nodes) - LISTED_HOSPITALS} more (their reasons are in {METRICS})")
        kinds |= {self.excluded[node].partition(": ")[0] for node in nodes[LISTED_HOSPITALS:]}
        hints = [REFUSAL_HINTS[kind] for kind in sorted(kinds) if kind in REFUSAL_HINTS]
        return "\n".join(["no hospital can train:", *lines, *hints])

    def cannot_train(self, grid: Grid) -> str | None:
        """Why no connected hospital can train now, or None while one can."""
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if nodes and all(n in self.excluded for n in nodes):
            return self.refusals_text(nodes)
        return None

    def _sample(self, nodes: list[int], size: int) -> list[int]:
        """``size`` of ``nodes`` drawn by the seeded sampler, in the order of their names: the same hospitals for
        the same seed in every run (node ids are new each run)."""
        ordered = sorted(nodes, key=lambda n: (self.names.get(n) is None, self.names.get(n) or "", n))
        # node ids are unsigned 64-bit: numpy would turn a mix of large ones into float64
        return sorted(ordered[i] for i in self.sampler.choice(len(ordered), size=size, replace=False)) if size else []

    def _messages(
        self, nodes: Iterable[int], arrays: ArrayRecord, message_type: str, server_round: int
    ) -> list[Message]:
        content = RecordDict({CONFIG_KEY: ConfigRecord({"server-round": server_round})})
        put_arrays(content, PARAMS_KEY, {name: array.numpy() for name, array in arrays.items()})
        ttl = self.cfg.server.round_timeout_s
        return [Message(content, dst_node_id=int(n), message_type=message_type, ttl=ttl) for n in nodes]

    def begin_train_round(self, server_round: int, grid: Grid) -> list[int]:
        """Start the round's record; returns the hospitals that may be sampled (connected, not refused)."""
        self._round_started = time.monotonic()
        self.record = RoundRecord(server_round + self.round_offset)
        eligible = self._eligible_nodes(grid)
        self.record.eligible = len(eligible)
        return eligible

    def train_messages(self, chosen: list[int], arrays: ArrayRecord) -> list[Message]:
        self._sent = self._messages(chosen, arrays, MessageType.TRAIN, self.record.round)
        self.record.sampled = len(chosen)
        self.record.bytes_down = len(chosen) * sum(p.numel() * 4 for p in self.params.values())
        return self._sent

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        eligible = self.begin_train_round(server_round, grid)
        size = min(
            len(eligible),
            max(self.cfg.server.min_train_nodes, math.ceil(self.cfg.server.fraction_train * len(eligible))),
        )
        return self.train_messages(self._sample(eligible, size), arrays)

    def evaluates(self, absolute_round: int) -> bool:
        server = self.cfg.server
        return absolute_round % server.eval_every == 0 or absolute_round == server.rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.cfg.server.fraction_evaluate <= 0 or not self.evaluates(server_round + self.round_offset):
            return []
        nodes = sorted(int(n) for n in grid.get_node_ids())
        eligible = [n for n in nodes if n not in self.excluded_evaluate]
        size = max(1, math.ceil(self.cfg.server.fraction_evaluate * len(eligible))) if eligible else 0
        chosen = self._sample(eligible, size)
        self._sent = self._messages(chosen, arrays, MessageType.EVALUATE, server_round + self.round_offset)
        return self._sent

    def _by_sender(self, replies: Iterable[Message]) -> list[Sender]:
        """Each reply with its node; learns the names the replies carry before anything is labelled."""
        # errors the SuperLink makes itself (node gone, reply expired) come from node 1: map them back
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        senders: list[Sender] = []
        for reply in replies:
            node = int(sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id))
            try:
                name = claimed_name(reply, f"reply from {node_label(node)}")
            except WireError as err:
                senders.append((node, reply, str(err)))
                continue
            if name is not None:
                self._learn_name(node, name)
            senders.append((node, reply, None))
        return senders

    # -- aggregation ---------------------------------------------------------------------

    def _validated_gradient(self, reply: Message, hospital: str) -> Accepted:
        what = f"reply from {hospital}"
        metrics_record = reply.content.metric_records.get(METRICS_KEY)
        if metrics_record is None:
            raise WireError(f"{what} lacks '{METRICS_KEY}'")
        grads = take_arrays(reply.content, GRADIENT_KEY, what)
        self.schema.validate(grads, what)
        metrics = dict(metrics_record)
        dp = metrics.get("dp")
        if "dp" in metrics and dp not in (0.0, 1.0):
            raise WireError(f"{what}: metric 'dp'={dp!r} must be 0 (no DP) or 1 (DP)")
        # only a reply without DP may carry the (un-noised) query loss
        validate_metrics(metrics, NO_DP_TRAIN_METRICS if dp == 0 else TRAIN_METRICS, what, required=TRAIN_METRICS)
        bound = self.max_episodes[dp == 1.0]
        if not 0 <= metrics["episodes"] <= bound:
            setting = "privacy.groups-per-step" if dp == 1.0 else "episode.meta-batch"
            raise WireError(
                f"{what}: 'episodes'={metrics['episodes']:g} is outside [0, {bound}], "
                f"the most the run asks for ({setting} x server.local-steps)"
            )
        if metrics["epsilon"] < 0 or not 0 <= metrics["delta"] < 1:
            raise WireError(f"{what}: 'epsilon' must be >= 0 and 'delta' in [0, 1)")
        norm = math.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads.values()))
        if norm > self.cfg.server.max_update_norm:
            raise WireError(
                f"{what}: gradient norm {norm:.3g} exceeds server.max-update-norm {self.cfg.server.max_update_norm:.3g}"
            )
        return grads, metrics

    def _note_privacy(self, node: int, metrics: dict[str, float]) -> None:
        # a hospital that released once without DP has an unbounded epsilon for the rest of the run
        dp = metrics["dp"] == 1.0 and self.privacy.get(node, {}).get("dp", True)
        self.privacy[node] = {"epsilon": metrics["epsilon"] if dp else None, "delta": metrics["delta"], "dp": dp}

    def accept_replies(self, replies: Iterable[Message]) -> list[Accepted]:
        """The train replies that fit; the others go into the round record with a reason, never raising.

        A hospital that refuses (budget spent, or the run asks what its policy does not allow) is not
        sampled again this run."""
        accepted: list[Accepted] = []
        rejected: list[Rejection] = []
        refused: list[Refusal] = []
        trained, released = [], []
        answered = set()
        for node, reply, misfit in self._by_sender(replies):
            answered.add(node)
            hospital = self.label(node)
            if misfit is not None:
                rejected.append(Rejection(hospital, misfit))
                continue
            if reply.has_error():
                reason = error_reason(reply)
                kind = REFUSAL_KINDS.get(reply.error.code)
                if kind is None:
                    rejected.append(Rejection(hospital, f"error {reply.error.code}: {reason}"))
                else:
                    refused.append(Refusal(hospital, kind, reason))
                    self.excluded[node] = f"{kind}: {reason}"
                continue
            released.append(hospital)
            try:
                grads, metrics = self._validated_gradient(reply, hospital)
            except WireError as err:
                rejected.append(Rejection(hospital, str(err)))
                continue
            accepted.append((grads, metrics))
            trained.append(hospital)
            self._note_privacy(node, metrics)
        for message in self._sent:
            node = int(message.metadata.dst_node_id)
            if node not in answered:
                rejected.append(Rejection(self.label(node), "no reply within server.round-timeout-s"))
        record = self.record
        for rejection in rejected:
            log.warning("round %d: %s not used: %s", record.round, rejection.hospital, rejection.reason)
        for refusal in refused:
            log.warning(
                "round %d: %s refused (%s), not asked again this run: %s",
                record.round,
                refusal.hospital,
                refusal.kind,
                refusal.reason,
            )
        record.participants, record.rejected, record.refused = len(accepted), rejected, refused
        record.trained, record.released = sorted(trained), sorted(released)
        record.bytes_up = sum(sum(g.nbytes for g in grads.values()) for grads, _ in accepted)
        # Float sums depend on their order: sum replies in an order fixed by their content, not by arrival or by
        # the node ids Flower's simulation draws at random each run, so a seeded run repeats exactly.
        return sorted(accepted, key=lambda reply: content_digest(reply[0]))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept_replies(replies)
        if len(accepted) < self.cfg.server.min_train_nodes:
            log.warning(
                "round %d: %d usable replies < server.min-train-nodes=%d: meta-parameters unchanged",
                self.record.round,
                len(accepted),
                self.cfg.server.min_train_nodes,
            )
            return None, None
        return self.apply_outer_grad(self._weighted_mean(accepted), accepted)

    def _weighted_mean(self, accepted: list[Accepted]) -> Params:
        grads = [{n: torch.from_numpy(np.array(g)) for n, g in grads.items()} for grads, _ in accepted]
        weights = np.full(len(accepted), 1 / len(accepted))
        if self.cfg.server.aggregation == "episodes":
            episodes = np.array([m["episodes"] for _, m in accepted])  # bounded by the run's settings
            if episodes.sum() > 0:
                weights = episodes / episodes.sum()
        return {n: sum(float(w) * g[n] for w, g in zip(weights, grads, strict=True)) for n in self.params}

    def apply_outer_grad(self, outer_grad: Params, accepted: list[Accepted]) -> tuple[ArrayRecord, MetricRecord]:
        """Step the meta-optimizer with ``outer_grad``; the round's train record from the ``accepted`` replies."""
        for name, p in self.params.items():
            p.grad = outer_grad[name].to(p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        losses = [m["query-loss"] for _, m in accepted if "query-loss" in m]  # replies without DP only
        self.record.train = TrainStep(
            episodes=float(sum(m["episodes"] for _, m in accepted)),
            update_norm=float(torch.sqrt(sum(g.square().sum() for g in outer_grad.values()))),
            lr=float(self.scheduler.get_last_lr()[0]),
            query_loss=float(np.mean(losses)) if losses else None,
        )
        arrays = ArrayRecord({n: p.detach().clone() for n, p in self.params.items()})
        return arrays, MetricRecord(as_json(self.record.train))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_hospital: dict[str, Metrics] = {}
        refused: list[Refusal] = []
        for node, reply, misfit in self._by_sender(replies):
            hospital = self.label(node)
            if misfit is not None:
                log.warning("evaluation from %s not used: %s", hospital, misfit)
                continue
            if reply.has_error():
                reason = error_reason(reply)
                kind = REFUSAL_KINDS.get(reply.error.code)
                if kind is None:
                    log.warning("evaluation from %s failed: %s", hospital, reason)
                else:
                    log.warning("%s refuses evaluation (%s), not asked again this run: %s", hospital, kind, reason)
                    refused.append(Refusal(hospital, kind, reason))
                    self.excluded_evaluate[node] = f"{kind}: {reason}"
                continue
            metrics = dict(reply.content.metric_records.get(METRICS_KEY) or {})
            try:
                validate_metrics(metrics, EVALUATE_METRICS, f"evaluation from {hospital}")
            except WireError as err:
                log.warning("%s", err)
                continue
            per_hospital[hospital] = metrics
        self.record.evaluation_refused = refused
        if not per_hospital:
            return None
        self.record.hospitals = per_hospital
        self.record.worst_hospital = worst_hospital(per_hospital)
        return MetricRecord(mean_metrics(per_hospital))

    # -- end of round: held-out evaluation, metrics line, checkpoint -------------------------

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: called after every round (and once before the first, skipped)."""
        if server_round == 0:
            return None
        record = self.record
        if self.heldout is not None and self.evaluates(record.round):
            # held-out folders (FEDERATION/heldout/hospital-NNN) share names with training hospitals: keep them apart
            evaluated = self.heldout({n: p.detach() for n, p in self.params.items()})
            record.heldout = {f"heldout/{name}": metrics for name, metrics in evaluated.items()}
            record.heldout_mean = mean_metrics(record.heldout)
            record.heldout_worst = worst_hospital(record.heldout)
        standing = PrivacySoFar(*privacy_fields({self.label(node): p for node, p in self.privacy.items()}))
        released = set(record.released)
        record.epsilon = {h: e for h, e in standing.epsilon.items() if h in released}
        record.dp = {h: dp for h, dp in standing.dp.items() if h in released}
        record.epsilon_max = epsilon_max(standing)
        record.seconds = time.monotonic() - self._round_started
        append_round(self.run_dir, record)
        save(self.run_dir, self.state())
        print(progress_line(record, standing, self.cfg.server.rounds), flush=True)
        return MetricRecord(record.heldout_mean) if record.heldout_mean else None

    def state(self) -> ServerState:
        return ServerState(
            round=self.record.round,
            meta_params={n: p.detach() for n, p in self.params.items()},
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            sampler_rng=self.sampler.bit_generator.state,
            excluded=self.excluded,
            excluded_evaluate=self.excluded_evaluate,
            privacy=self.privacy,
            names=self.names,
            site_accountant=self.site_accountant,
            config=self.cfg.to_flat(),
        )


def privacy_fields(privacy: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, bool]]:
    """Each hospital's epsilon and dp: a hospital that released without DP has epsilon None and dp False."""
    dp = {h: bool(p["dp"]) for h, p in privacy.items()}
    return {h: p["epsilon"] if dp[h] else None for h, p in privacy.items()}, dp


def epsilon_max(standing: PrivacySoFar) -> float | None:
    """The largest epsilon over the hospitals, None (unbounded) once one released without DP."""
    if standing.without_dp:
        return None
    return max((e for e in standing.epsilon.values() if e is not None), default=0.0)


def epsilon_text(standing: PrivacySoFar) -> str:
    """``epsilon max 2.10 (h1)``, or ``epsilon max no DP (1 of 3 hospitals without DP: h2; 2.10 at the others)``."""
    without = standing.without_dp
    finite = {h: e for h, e in standing.epsilon.items() if e is not None}
    if not without:
        top = max(finite, key=finite.__getitem__, default=None)
        return f"epsilon max {finite[top]:.2f} ({top})" if top is not None else "epsilon max 0.00"
    others = f"; {max(finite.values()):.2f} at the others" if finite else ""
    counted = f"{len(without)} of {len(standing.dp)} hospitals without DP"
    return f"epsilon max no DP ({counted}: {names_text(without)}{others})"


def names_text(hospitals: list[str], listed: int = 5) -> str:
    """``h0, h1`` or, past ``listed`` of them, ``h0, h1, h2, h3, h4 and 7 more``."""
    more = f" and {len(hospitals) - listed} more" if len(hospitals) > listed else ""
    return ", ".join(hospitals[:listed]) + more


def progress_line(record: RoundRecord, standing: PrivacySoFar, rounds: int) -> str:
    parts = [f"round {record.round}/{rounds}", f"{record.participants}/{record.sampled} hospitals"]
    for what, hospitals in (
        ("rejected", [r.hospital for r in record.rejected]),
        ("refused", [r.hospital for r in record.refused]),
    ):
        if hospitals:  # by name: the operator needs to know which site
            parts.append(f"{len(hospitals)} {what} ({names_text(hospitals)})")
    if record.query_loss is not None:
        parts.append(f"query loss {record.query_loss:.3f}")
    if record.heldout_mean:
        parts.append(f"held-out balanced acc {record.heldout_mean.get(HEADLINE_METRIC, float('nan')):.3f}")
    parts.append(epsilon_text(standing))
    if record.site_epsilon is not None:
        parts.append(f"site epsilon {record.site_epsilon:.2f}")
    parts.append(f"{record.seconds:.1f}s")
    return "fedmeta: " + ", ".join(parts)
