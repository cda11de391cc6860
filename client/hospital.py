"""A hospital's side of fedmeta, independent of Flower: private meta-training and few-shot evaluation.

All per-hospital state lives on the hospital's disk (scan cache, site secret, privacy ledger under
``HOSPITAL/.fedmeta``), so a process rebuilt for every message, as Flower's virtual clients are,
behaves like a long-lived one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from client.ledger import LEDGER_FILE, BudgetExhausted, PrivacyLedger
from client.policy import HospitalPolicy, PolicyRefusal
from client.privacy import zero_diverged
from client.private_training import PrivateTraining
from shared.config import FedMetaConfig, PrivacyConfig
from shared.data.hospital_folder import HospitalData, load_hospital, preprocess_for
from shared.data.site_keys import STATE_FOLDER
from shared.learning.episodes import (
    MAML_TASKS,
    EpisodeIndices,
    EpisodeSampler,
    TaskDesign,
    finish_episode,
    fitting_query_count,
    stack_episodes,
    task_pools,
)
from shared.learning.evaluation import few_shot_metrics
from shared.learning.maml import MetaLearner, OuterGrads, Params
from shared.learning.models import build_model
from shared.wire import EVALUATE_METRICS, validate_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    outer_grad: Params
    metrics: dict[str, float]


def episode_groups(units: list[str], grouping_key: str, n_groups: int) -> np.ndarray:
    """Episode group of each privacy unit: a keyed hash of the unit's own id, nothing else."""
    key = bytes.fromhex(grouping_key)
    return np.array(
        [int.from_bytes(hmac.new(key, u.encode(), hashlib.sha256).digest()[:8], "big") % n_groups for u in units],
        dtype=np.int64,
    )


def group_episode(
    members: np.ndarray,
    labels: np.ndarray,
    n_way: int,
    k_shot: int,
    q_query: int,
    rng: np.random.Generator,
    design: TaskDesign = MAML_TASKS,
) -> EpisodeIndices | None:
    """An episode from one group's records only: ``None`` when the group cannot form the task with
    two records per episode label (its clipped gradient is then zero).

    Each episode label's records are split in two disjoint halves; support and query draw from their
    half with replacement, so small groups still give fixed-shape episodes and a record never
    appears in both sets.
    """
    pools = task_pools(members, labels, n_way, 2, design, rng)
    if pools is None:
        return None
    support, query = [], []
    for pool in pools:
        records = rng.permutation(pool)
        half = len(records) // 2
        support.append(rng.choice(records[:half], size=k_shot))
        query.append(rng.choice(records[half:], size=q_query))
    return finish_episode(support, query, design, rng)


def sampled_group_episodes(
    groups: np.ndarray,
    labels: np.ndarray,
    privacy: PrivacyConfig,
    n_way: int,
    k_shot: int,
    q_query: int,
    step_seed: int,
    design: TaskDesign = MAML_TASKS,
) -> list[EpisodeIndices]:
    """Poisson-sample episode groups and build one episode from each sampled group.

    Each group draws from its own random stream, so changing one record changes at most the
    episode of that record's group (the coupling the 2C sensitivity bound rests on).
    """
    sampled = np.flatnonzero(np.random.default_rng([step_seed, 0]).random(privacy.episode_groups) < privacy.sample_rate)
    episodes = []
    for g in sampled:
        group_rng = np.random.default_rng([step_seed, 1, int(g)])
        episode = group_episode(np.flatnonzero(groups == g), labels, n_way, k_shot, q_query, group_rng, design)
        if episode is not None:
            episodes.append(episode)
    return episodes


class Hospital:
    """One hospital: its data, its model, and its privacy (policy, ledger) on its own disk.

    ``cfg`` is what the hospital trains with: a run's settings after its policy governed them
    (:meth:`client.policy.HospitalPolicy.govern`). ``state_dir`` (ledger, default ``HOSPITAL/.fedmeta``)
    is the hospital's choice; a simulation keeps its virtual hospitals' state under ``data.state-dir``.
    """

    def __init__(
        self,
        folder: Path,
        cfg: FedMetaConfig,
        device: torch.device | None = None,
        state_dir: Path | None = None,
        policy: HospitalPolicy | None = None,
    ) -> None:
        self.folder = Path(folder)
        if policy is None:  # a virtual hospital: the run is its policy
            policy = HospitalPolicy.for_virtual_hospital(cfg)
            governed = policy.govern(cfg)
            assert isinstance(governed, FedMetaConfig), governed
            cfg = governed
        self.cfg = cfg
        self.policy = policy
        self.device = device or torch.device("cpu")
        self.state_dir = state_dir or virtual_state_dir(self.folder, cfg)
        self.learner = MetaLearner(build_model(cfg.model).to(self.device), cfg.maml)

    @cached_property
    def data(self) -> HospitalData:
        return load_hospital(self.folder, preprocess_for(self.cfg))

    def _pool(self, split: str) -> tuple[HospitalData, torch.Tensor]:
        part = self.data.split(split)
        return part, torch.from_numpy(part.images).to(self.device)

    @cached_property
    def privacy_units(self) -> list[str]:
        """The protected record of each train image: its patient (when known and the unit) or the image itself."""
        train = self.data.split("train")
        if self.cfg.privacy.unit == "record":
            return list(train.record_ids)
        return [p or r for p, r in zip(train.patient_keys, train.record_ids, strict=True)]

    def private_training(self) -> PrivateTraining:
        units = len(set(self.privacy_units))
        return PrivateTraining(self.state_dir / LEDGER_FILE, self.cfg.privacy, self.policy, units)

    def open_ledger(self) -> PrivacyLedger:
        return self.private_training().open_ledger()

    def warm_up_accountant(self) -> None:
        """What a process computes once, at its first release, computed ahead: a new ledger's noise calibration
        (seconds) and the RDP curve of the next step. The ledger is read, never written; the scans are not read, so
        a new ledger's delta is the one of a hospital of at most 1 / (10 delta) privacy units (a larger one pays
        its own calibration at its first release, as without this)."""
        if self.cfg.privacy.enabled:
            PrivateTraining(self.state_dir / LEDGER_FILE, self.cfg.privacy, self.policy, units=1).warm_up()

    def train(self, meta_params: Params, server_round: int = 0) -> TrainResult | BudgetExhausted:
        """``local_steps`` meta-gradients at ``meta_params``, averaged; private unless DP is off.

        Without DP the episodes follow from (seed, round, hospital), so runs repeat exactly; with DP
        the group sampling and the noise come from the operating system's randomness.
        """
        meta_params = {n: p.to(self.device) for n, p in meta_params.items()}
        train, images = self._pool("train")
        privacy = self.cfg.privacy
        steps = self.cfg.server.local_steps
        if not privacy.enabled:
            site = int.from_bytes(hashlib.sha256(self.folder.name.encode()).digest()[:8], "big")
            rng = np.random.default_rng([self.cfg.seed, server_round, site])
            queries = fitting_query_count(
                train.labels, self.cfg.model.n_way, self.cfg.episode.k_shot, self.cfg.episode.q_query
            )
            if queries < self.cfg.episode.q_query:
                log.info(
                    "small classes: training with %d queries per class instead of %d", queries, self.cfg.episode.q_query
                )
            sampler = EpisodeSampler(
                train.labels,
                self.cfg.model.n_way,
                self.cfg.episode.k_shot,
                queries,
                seed=int(rng.integers(2**63)),
                design=TaskDesign.of(self.cfg.episode),
            )
            outers = [
                self.learner.per_episode_outer_grads(
                    meta_params, sampler.sample_batch(images, self.cfg.episode.meta_batch)
                )
                for _ in range(steps)
            ]
            means = [{n: g.mean(0) for n, g in zero_diverged(o).items()} for o in outers]
            metrics = {"episodes": float(self.cfg.episode.meta_batch * steps), "epsilon": 0.0, "delta": 0.0, "dp": 0.0}
            losses = torch.cat([o.query_losses for o in outers])
            metrics["query-loss"] = float(losses[losses.isfinite()].mean()) if losses.isfinite().any() else 0.0
            return TrainResult(_mean(means), metrics)

        rng = np.random.default_rng(secrets.randbits(128))
        units = self.privacy_units
        groups_by_key: dict[str, np.ndarray] = {}

        def step(grouping_key: str) -> OuterGrads:
            if grouping_key not in groups_by_key:
                groups_by_key[grouping_key] = episode_groups(units, grouping_key, privacy.episode_groups)
            return self._group_outer_grads(meta_params, train.labels, images, groups_by_key[grouping_key], rng)

        outcome = self.private_training().run(meta_params, steps, step)
        if isinstance(outcome, BudgetExhausted):
            return outcome
        metrics = {
            "episodes": float(privacy.groups_per_step * len(outcome.released)),
            "epsilon": outcome.epsilon,
            "delta": outcome.delta,
            "dp": 1.0,
        }
        return TrainResult(_mean(outcome.released), metrics)

    def _group_outer_grads(
        self,
        meta_params: Params,
        labels: np.ndarray,
        images: torch.Tensor,
        groups: np.ndarray,
        rng: np.random.Generator,
    ) -> OuterGrads:
        """One clipped-to-be gradient per Poisson-sampled group that can form an episode."""
        episode = self.cfg.episode
        episodes = sampled_group_episodes(
            groups,
            labels,
            self.cfg.privacy,
            self.cfg.model.n_way,
            episode.k_shot,
            episode.q_query,
            int(rng.integers(2**63)),
            TaskDesign.of(episode),
        )
        if not episodes:  # an empty step: zero rows clip to zero and add nothing to the sum
            zeros = {n: torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for n, p in meta_params.items()}
            return OuterGrads(zeros, torch.zeros(0, device=self.device))
        return self.learner.per_episode_outer_grads(meta_params, stack_episodes(images, episodes))

    def evaluate(self, meta_params: Params) -> dict[str, float]:
        """Few-shot metrics on the hospital's test split (aggregates only, no counts)."""
        meta_params = {n: p.to(self.device) for n, p in meta_params.items()}
        metrics = few_shot_metrics(self.learner, meta_params, self.data, self.cfg)
        return {k: v for k, v in metrics.items() if k in EVALUATE_METRICS}

    def answer_evaluation(self, meta_params: Params) -> dict[str, float] | PolicyRefusal:
        """:meth:`evaluate` for a server, when the policy lets it: each answer counts against the policy's
        ``evaluation-requests``, and none is given once the privacy budget is spent."""
        policy = self.policy
        private = self.private_training()
        with PrivacyLedger.locked(private.ledger_path):
            ledger = private.open_ledger()
            if ledger.evaluations_answered >= policy.evaluation_requests:
                return PolicyRefusal(
                    f"this hospital answers at most evaluation-requests = {policy.evaluation_requests} evaluations "
                    f"and has answered {ledger.evaluations_answered}"
                )
            if self.cfg.privacy.enabled:
                calibration = private.calibration(ledger)
                if ledger.check(calibration.accountant_noise_multiplier, self.cfg.privacy.sample_rate) is not None:
                    return PolicyRefusal("this hospital's privacy budget is spent: it answers no more evaluations")
            metrics = self.evaluate(meta_params)
            validate_metrics(metrics, EVALUATE_METRICS, "evaluation reply", required=EVALUATE_METRICS)
            ledger.record_evaluation()  # counted only when an answer goes out
            return metrics


def virtual_state_dir(folder: Path, cfg: FedMetaConfig) -> Path:
    """A simulated hospital's state: under ``data.state-dir`` when the simulation sets one, else its own folder."""
    return Path(cfg.data.state_dir) / folder.name if cfg.data.state_dir else folder / STATE_FOLDER


def _mean(grads: list[Params]) -> Params:
    return {n: torch.stack([g[n] for g in grads]).mean(0).float().cpu() for n in grads[0]}
