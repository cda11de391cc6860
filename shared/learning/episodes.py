"""N-way K-shot episode sampling from a labelled pool.

Episodes are class-balanced whatever the pool's prevalence: N classes drawn uniformly from those
with at least K + Q examples, then K support and Q query examples per class without replacement.
Episode labels are the position of the class in the draw (0..N-1), so the head never learns a
fixed class order. A pool with fewer than N such classes is an error, never a smaller episode.

A :class:`TaskDesign` makes more tasks from the same labels, each a switch:

- ``one-vs-rest``: 2-way tasks "class c against all the others" (a 5-grade retina set gives 5 tasks
  besides its 10 class pairs);
- ``permute_labels=False``: episode labels in class order instead, so the head can memorise classes
  (what supervised FedAvg-style training needs);
- ``augment``: each episode is seen through its own random scanner (gamma, gain, offset, noise,
  flip), so one hospital's scans yield tasks from many simulated sites.

This sampler redraws classes and scans every episode and may reuse a scan across the episodes of
one step: use it for non-private training and for evaluation. DP training samples episode groups
(``client.hospital.sampled_group_episodes``; why groups, in ``client.privacy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.config import EpisodeConfig, TaskKind
from shared.errors import UserError
from shared.learning.maml import EpisodeBatch


class EpisodeError(UserError, ValueError):
    """The pool cannot provide the requested episode."""


@dataclass(frozen=True)
class EpisodeIndices:
    """Pool indices and episode labels of one episode; ``scanner`` seeds its augmentation, if any."""

    support: np.ndarray
    support_y: np.ndarray
    query: np.ndarray
    query_y: np.ndarray
    scanner: int | None = None


@dataclass(frozen=True)
class TaskDesign:
    tasks: TaskKind = "class-subsets"
    permute_labels: bool = True
    augment: bool = False

    @classmethod
    def of(cls, episode: EpisodeConfig) -> TaskDesign:
        return cls(episode.tasks, episode.permute_labels, episode.augment)


MAML_TASKS = TaskDesign()


def task_pools(
    members: np.ndarray, labels: np.ndarray, n_way: int, need: int, design: TaskDesign, rng: np.random.Generator
) -> list[np.ndarray] | None:
    """The ``members`` that make up each episode label's class, or ``None`` when the members cannot
    form such a task with at least ``need`` examples per episode label."""
    member_labels = labels[members]
    classes, counts = np.unique(member_labels, return_counts=True)
    if design.tasks == "one-vs-rest":
        positives = classes[(counts >= need) & (len(members) - counts >= need)]
        if len(positives) == 0:
            return None
        positive = rng.choice(positives)
        pools = [members[member_labels != positive], members[member_labels == positive]]
        return [pools[i] for i in rng.permutation(2)] if design.permute_labels else pools
    eligible = classes[counts >= need]
    if len(eligible) < n_way:
        return None
    chosen = rng.choice(eligible, size=n_way, replace=False)  # the draw order is the label permutation
    return [members[member_labels == c] for c in (chosen if design.permute_labels else np.sort(chosen))]


def finish_episode(
    support: list[np.ndarray], query: list[np.ndarray], design: TaskDesign, rng: np.random.Generator
) -> EpisodeIndices:
    episode_labels = np.arange(len(support))
    return EpisodeIndices(
        support=np.concatenate(support),
        support_y=np.repeat(episode_labels, [len(s) for s in support]),
        query=np.concatenate(query),
        query_y=np.repeat(episode_labels, [len(q) for q in query]),
        scanner=int(rng.integers(2**63)) if design.augment else None,
    )


class EpisodeSampler:
    def __init__(
        self, labels: np.ndarray, n_way: int, k_shot: int, q_query: int, seed: int, design: TaskDesign = MAML_TASKS
    ) -> None:
        self.labels = np.asarray(labels)
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.design = design
        self.rng = np.random.default_rng(seed)
        self.members = np.arange(len(self.labels))
        if task_pools(self.members, self.labels, n_way, k_shot + q_query, design, np.random.default_rng(0)) is None:
            classes, counts = np.unique(self.labels, return_counts=True)
            have = ", ".join(f"class {c}: {n}" for c, n in zip(classes, counts, strict=True))
            raise EpisodeError(
                f"{n_way}-way {k_shot}-shot {design.tasks} episodes with {q_query} queries need {n_way} classes "
                f"with at least {k_shot + q_query} examples each; the pool has {have}. "
                "Lower episode.k-shot / episode.q-query or n-way, or add labelled scans."
            )

    def sample(self) -> EpisodeIndices:
        pools = task_pools(self.members, self.labels, self.n_way, self.k_shot + self.q_query, self.design, self.rng)
        assert pools is not None  # checked in __init__
        support, query = [], []
        for pool in pools:
            picked = self.rng.choice(pool, size=self.k_shot + self.q_query, replace=False)
            support.append(picked[: self.k_shot])
            query.append(picked[self.k_shot :])
        return finish_episode(support, query, self.design, self.rng)

    def sample_batch(self, images: torch.Tensor, meta_batch: int) -> EpisodeBatch:
        return stack_episodes(images, [self.sample() for _ in range(meta_batch)])


def fitting_query_count(labels: np.ndarray, n_way: int, k_shot: int, q_query: int) -> int:
    """The most queries per class, up to ``q_query``, with which ``labels`` still give ``n_way``-way
    ``k_shot`` episodes: the documented fallback for small hospitals (at least one query per class)."""
    counts = np.sort(np.unique(np.asarray(labels), return_counts=True)[1])[::-1]
    if len(counts) < n_way or counts[n_way - 1] < k_shot + 1:
        return q_query  # nothing fits: let EpisodeSampler raise its explanation
    return int(min(q_query, counts[n_way - 1] - k_shot))


def stack_episodes(images: torch.Tensor, episodes: list[EpisodeIndices]) -> EpisodeBatch:
    """Gather pool ``images`` ``[P, C, H, W]`` into an :class:`EpisodeBatch`."""

    def gather(key: str) -> torch.Tensor:
        return images[torch.from_numpy(np.stack([getattr(e, key) for e in episodes]))]

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(e, key) for e in episodes])).long().to(images.device)

    support_x, query_x = gather("support"), gather("query")
    for i, episode in enumerate(episodes):
        if episode.scanner is not None:
            support_x[i], query_x[i] = random_scanner(torch.cat([support_x[i], query_x[i]]), episode.scanner).split(
                [support_x.shape[1], query_x.shape[1]]
            )
    return EpisodeBatch(support_x, labels("support_y"), query_x, labels("query_y"))


def random_scanner(images: torch.Tensor, seed: int) -> torch.Tensor:
    """``images [S, C, H, W]`` in [0, 1] as one random scanner would show them: gamma, gain, offset,
    Gaussian noise and a left-right flip, all drawn once for the whole episode."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    gamma, gain, offset, noise = uniform(0.7, 1.4), uniform(0.8, 1.2), uniform(-0.1, 0.1), uniform(0.0, 0.05)
    flip = uniform(0, 1) < 0.5
    shifted = gain * images.clamp(0, 1) ** gamma + offset
    shifted = shifted + noise * torch.randn(shifted.shape, generator=generator).to(shifted.device, shifted.dtype)
    return (shifted.flip(-1) if flip else shifted).clamp(0, 1)
