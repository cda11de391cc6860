"""N-way K-shot episode sampling from a labelled pool.

Episodes are class-balanced whatever the pool's prevalence: N classes drawn uniformly from those
with at least K + Q examples, then K support and Q query examples per class without replacement.
Episode labels are the position of the class in the draw (0..N-1), so the head never learns a
fixed class order. A pool with fewer than N such classes is an error, never a smaller episode.

This sampler redraws classes and scans every episode and may reuse a scan across the episodes of
one step: use it for non-private training and for evaluation. DP training samples episode groups
(see ``client.privacy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.errors import UserError
from shared.maml import EpisodeBatch


class EpisodeError(UserError, ValueError):
    """The pool cannot provide the requested episode."""


@dataclass(frozen=True)
class EpisodeIndices:
    """Pool indices and episode labels of one episode."""

    support: np.ndarray
    support_y: np.ndarray
    query: np.ndarray
    query_y: np.ndarray


class EpisodeSampler:
    def __init__(self, labels: np.ndarray, n_way: int, k_shot: int, q_query: int, seed: int) -> None:
        self.labels = np.asarray(labels)
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.rng = np.random.default_rng(seed)
        classes, counts = np.unique(self.labels, return_counts=True)
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in classes}
        self.eligible = np.array([c for c, n in zip(classes, counts, strict=True) if n >= k_shot + q_query])
        if len(self.eligible) < n_way:
            have = ", ".join(f"class {c}: {n}" for c, n in zip(classes, counts, strict=True))
            raise EpisodeError(
                f"{n_way}-way {k_shot}-shot episodes with {q_query} queries need {n_way} classes with "
                f"at least {k_shot + q_query} examples each; the pool has {have}. "
                "Lower episode.k-shot / episode.q-query or n-way, or add labelled scans."
            )

    def sample(self) -> EpisodeIndices:
        classes = self.rng.choice(self.eligible, size=self.n_way, replace=False)
        support, query = [], []
        for c in classes:
            picked = self.rng.choice(self.by_class[int(c)], size=self.k_shot + self.q_query, replace=False)
            support.append(picked[: self.k_shot])
            query.append(picked[self.k_shot :])
        episode_labels = np.arange(self.n_way)
        return EpisodeIndices(
            support=np.concatenate(support),
            support_y=np.repeat(episode_labels, self.k_shot),
            query=np.concatenate(query),
            query_y=np.repeat(episode_labels, self.q_query),
        )

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
        return torch.from_numpy(np.stack([getattr(e, key) for e in episodes])).long()

    return EpisodeBatch(gather("support"), labels("support_y"), gather("query"), labels("query_y"))
