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

from client.ledger import BudgetExhausted, PrivacyLedger
from client.privacy import NoiseCalibration, PrivateRelease, calibrate_accountant_noise
from shared.config import FedMetaConfig, PrivacyConfig
from shared.dicom import PreprocessConfig
from shared.episodes import (
    MAML_TASKS,
    EpisodeIndices,
    EpisodeSampler,
    TaskDesign,
    finish_episode,
    fitting_query_count,
    stack_episodes,
    task_pools,
)
from shared.evaluation import FewShotTask, adapt_and_predict, classification_metrics, few_shot_tasks
from shared.hospital import HospitalData, load_hospital
from shared.maml import MetaLearner, OuterGrads, Params
from shared.models import build_model

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"


@dataclass(frozen=True)
class TrainResult:
    outer_grad: Params
    metrics: dict[str, float]


def preprocess_for(cfg: FedMetaConfig) -> PreprocessConfig:
    return PreprocessConfig(image_size=cfg.model.image_size, channels=cfg.model.in_channels)


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
    def __init__(self, folder: Path, cfg: FedMetaConfig, device: torch.device | None = None) -> None:
        self.folder = Path(folder)
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.state_dir = Path(cfg.data.state_dir) / self.folder.name if cfg.data.state_dir else self.folder / ".fedmeta"
        self.learner = MetaLearner(build_model(cfg.model).to(self.device), cfg.maml)

    @cached_property
    def data(self) -> HospitalData:
        return load_hospital(self.folder, preprocess_for(self.cfg))

    def _pool(self, split: str) -> tuple[HospitalData, torch.Tensor]:
        part = self.data.split(split)
        return part, torch.from_numpy(part.images).to(self.device)

    def open_ledger(self) -> PrivacyLedger:
        return PrivacyLedger.open(self.state_dir / LEDGER_FILE, self.cfg.privacy)

    def calibration(self, ledger: PrivacyLedger) -> NoiseCalibration:
        """The noise this hospital releases with: fixed in its ledger at the first release."""
        privacy = self.cfg.privacy
        if ledger.noise_multiplier is not None:
            sigma = ledger.noise_multiplier
        elif privacy.noise_multiplier > 0:
            sigma = privacy.noise_multiplier
        else:
            planned_steps = self.cfg.server.rounds * self.cfg.server.local_steps
            sigma = calibrate_accountant_noise(
                privacy.target_epsilon, privacy.delta, privacy.sample_rate, planned_steps, privacy.accountant
            )
        return NoiseCalibration(sigma, privacy.max_grad_norm)

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
            return self._result(outers, [o.mean() for o in outers], epsilon=0.0, dp=False)

        rng = np.random.default_rng(secrets.randbits(128))
        ledger = self.open_ledger()
        calibration = self.calibration(ledger)
        units = [p or r for p, r in zip(train.patient_keys, train.record_ids, strict=True)]
        groups = episode_groups(units, ledger.grouping_key, privacy.episode_groups)
        noise = torch.Generator(device=self.device).manual_seed(secrets.randbits(63))
        release = PrivateRelease(meta_params, calibration, expected_episodes=privacy.groups_per_step, generator=noise)
        outers, released = [], []
        refusal = None
        for _ in range(steps):
            refusal = ledger.check(calibration.accountant_noise_multiplier, privacy.sample_rate)
            if refusal is not None:
                break
            outer = self._group_outer_grads(meta_params, train.labels, images, groups, privacy, rng)
            ledger.record(calibration.accountant_noise_multiplier, privacy.sample_rate)  # durable before release
            outers.append(outer)
            released.append(release.release(outer))
        if not released:
            return refusal
        return self._result(outers, released, epsilon=ledger.epsilon(), dp=True)

    def _group_outer_grads(
        self,
        meta_params: Params,
        labels: np.ndarray,
        images: torch.Tensor,
        groups: np.ndarray,
        privacy: PrivacyConfig,
        rng: np.random.Generator,
    ) -> OuterGrads:
        """One clipped-to-be gradient per Poisson-sampled group that can form an episode."""
        episode = self.cfg.episode
        episodes = sampled_group_episodes(
            groups,
            labels,
            privacy,
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

    def _result(self, outers: list[OuterGrads], grads: list[Params], epsilon: float, dp: bool) -> TrainResult:
        mean = {n: torch.stack([g[n] for g in grads]).mean(0).float().cpu() for n in grads[0]}
        losses = torch.cat([o.query_losses for o in outers])
        episodes = float(len(losses))
        return TrainResult(
            outer_grad=mean,
            metrics={
                "episodes": episodes,
                "query-loss": float(losses.mean()) if episodes else 0.0,
                "epsilon": float(epsilon),
                "delta": float(self.cfg.privacy.delta) if dp else 0.0,
                "dp": 1.0 if dp else 0.0,
                "num-examples": max(episodes, 1.0),
            },
        )

    def few_shot_tasks(self, seed: int = 0) -> list[FewShotTask]:
        """The evaluation tasks: K labelled train scans per class, the test split as queries."""
        episode = self.cfg.episode
        return few_shot_tasks(
            self.data.split("train").labels,
            self.data.split("test").labels,
            self.cfg.model.n_way,
            episode.k_shot,
            episode.eval_episodes,
            seed,
        )

    def evaluate(self, meta_params: Params, steps: int | None = None, seed: int = 0) -> dict[str, float]:
        """Few-shot metrics on the hospital's test split (aggregates only)."""
        steps = self.cfg.episode.eval_steps if steps is None else steps
        meta_params = {n: p.to(self.device) for n, p in meta_params.items()}
        _, train_images = self._pool("train")
        test, test_images = self._pool("test")
        tasks = self.few_shot_tasks(seed)
        probs, truth = [], []
        for task in tasks:
            probs.append(adapt_and_predict(self.learner, meta_params, task, train_images, test_images, steps))
            truth.append(task.query_y)
        metrics = classification_metrics(np.concatenate(truth), np.concatenate(probs))
        return {**metrics, "episodes": float(len(tasks)), "num-examples": float(len(test))}
