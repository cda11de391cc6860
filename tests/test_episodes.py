"""N-way K-shot episode sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.episodes import EpisodeError, EpisodeSampler, fitting_query_count, stack_episodes


def imbalanced_labels() -> np.ndarray:
    return np.array([0] * 200 + [1] * 25 + [2] * 40 + [3] * 7)


def test_episodes_are_deterministic_by_seed() -> None:
    a = EpisodeSampler(imbalanced_labels(), n_way=2, k_shot=5, q_query=15, seed=7)
    b = EpisodeSampler(imbalanced_labels(), n_way=2, k_shot=5, q_query=15, seed=7)
    c = EpisodeSampler(imbalanced_labels(), n_way=2, k_shot=5, q_query=15, seed=8)
    first, second, other = a.sample(), b.sample(), c.sample()
    np.testing.assert_array_equal(first.support, second.support)
    np.testing.assert_array_equal(first.query, second.query)
    assert not np.array_equal(first.query, other.query)


def test_episode_is_class_balanced_disjoint_and_relabelled_despite_imbalance() -> None:
    labels = imbalanced_labels()
    sampler = EpisodeSampler(labels, n_way=3, k_shot=5, q_query=15, seed=0)
    for _ in range(50):
        episode = sampler.sample()
        assert not set(episode.support) & set(episode.query)
        np.testing.assert_array_equal(np.bincount(episode.support_y), [5, 5, 5])
        np.testing.assert_array_equal(np.bincount(episode.query_y), [15, 15, 15])
        # each episode label maps to exactly one pool class, the same in support and query
        for episode_label in range(3):
            pool_classes = set(labels[episode.support[episode.support_y == episode_label]])
            pool_classes |= set(labels[episode.query[episode.query_y == episode_label]])
            assert len(pool_classes) == 1


def test_classes_without_k_plus_q_examples_are_never_drawn() -> None:
    sampler = EpisodeSampler(imbalanced_labels(), n_way=2, k_shot=5, q_query=15, seed=0)
    drawn = {int(c) for _ in range(100) for c in imbalanced_labels()[sampler.sample().support]}
    assert 3 not in drawn  # class 3 has 7 < 20 examples
    assert drawn == {0, 1, 2}


def test_too_few_eligible_classes_is_a_clear_error() -> None:
    with pytest.raises(EpisodeError, match=r"need 2 classes with at least 20 examples.*class 1: 7.*Lower episode"):
        EpisodeSampler(np.array([0] * 30 + [1] * 7), n_way=2, k_shot=5, q_query=15, seed=0)


def test_stack_episodes_gathers_images_in_episode_order() -> None:
    images = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 1, 2, 2)
    labels = np.array([0] * 20 + [1] * 20)
    sampler = EpisodeSampler(labels, n_way=2, k_shot=2, q_query=3, seed=1)
    episodes = [sampler.sample() for _ in range(4)]
    batch = stack_episodes(images, episodes)
    assert batch.support_x.shape == (4, 4, 1, 2, 2)
    assert batch.query_x.shape == (4, 6, 1, 2, 2)
    np.testing.assert_array_equal(batch.support_x[2, :, 0, 0, 0].numpy(), episodes[2].support)
    np.testing.assert_array_equal(batch.query_y[3].numpy(), episodes[3].query_y)


def test_small_classes_fall_back_to_fewer_queries_but_never_below_one() -> None:
    labels = np.array([0] * 9 + [1] * 12 + [2] * 30)
    assert fitting_query_count(labels, n_way=2, k_shot=5, q_query=10) == 7  # second-largest class has 12
    assert fitting_query_count(labels, n_way=3, k_shot=5, q_query=10) == 4
    assert fitting_query_count(labels, n_way=2, k_shot=5, q_query=3) == 3
    EpisodeSampler(labels, n_way=3, k_shot=5, q_query=4, seed=0).sample()  # the fallback is a valid episode
    assert fitting_query_count(np.array([0] * 5 + [1] * 30), n_way=2, k_shot=5, q_query=10) == 10  # nothing fits
