"""N-way K-shot episode sampling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared.config import ConfigError, FedMetaConfig
from shared.learning.episodes import (
    EpisodeError,
    EpisodeSampler,
    TaskDesign,
    fitting_query_count,
    random_scanner,
    stack_episodes,
)


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


def test_one_vs_rest_tasks_put_one_class_against_all_the_others() -> None:
    labels = np.array([0] * 30 + [1] * 30 + [2] * 30 + [3] * 4)
    sampler = EpisodeSampler(labels, n_way=2, k_shot=5, q_query=5, seed=0, design=TaskDesign(tasks="one-vs-rest"))
    positives = set()
    for _ in range(60):
        episode = sampler.sample()
        indices = np.concatenate([episode.support, episode.query])
        episode_y = np.concatenate([episode.support_y, episode.query_y])
        sides = [set(labels[indices[episode_y == side]]) for side in (0, 1)]
        single = [s for s in sides if len(s) == 1]
        assert single and not sides[0] & sides[1]  # one side is one class, never mixed into the other
        positives |= single[0] if len(single) == 1 else set()
    assert positives <= {0, 1, 2}  # class 3 has too few scans to be the positive class
    assert len(positives) >= 2


def test_labels_follow_class_order_without_permutation_and_vary_with_it() -> None:
    labels = np.array([0] * 30 + [1] * 30 + [2] * 30)

    def first_label_class(design: TaskDesign) -> list[tuple[int, int]]:
        sampler = EpisodeSampler(labels, n_way=2, k_shot=2, q_query=2, seed=3, design=design)
        episodes = [sampler.sample() for _ in range(40)]
        return [(labels[e.support[e.support_y == 0][0]], labels[e.support[e.support_y == 1][0]]) for e in episodes]

    fixed = first_label_class(TaskDesign(permute_labels=False))
    assert all(a < b for a, b in fixed)
    permuted = first_label_class(TaskDesign())
    assert any(a > b for a, b in permuted) and any(a < b for a, b in permuted)


def test_augmented_episodes_see_their_own_scanner_the_same_for_support_and_query() -> None:
    labels = np.array([0] * 20 + [1] * 20)
    images = torch.rand(40, 1, 8, 8)
    sampler = EpisodeSampler(labels, n_way=2, k_shot=2, q_query=3, seed=1, design=TaskDesign(augment=True))
    episodes = [sampler.sample() for _ in range(3)]
    assert len({e.scanner for e in episodes}) == 3
    plain = stack_episodes(images, [dataclasses.replace(e, scanner=None) for e in episodes])
    augmented = stack_episodes(images, episodes)
    again = stack_episodes(images, episodes)
    torch.testing.assert_close(augmented.support_x, again.support_x)  # deterministic by scanner seed
    assert augmented.support_x.shape == plain.support_x.shape and augmented.query_x.shape == plain.query_x.shape
    assert float(augmented.support_x.min()) >= 0 and float(augmented.support_x.max()) <= 1
    assert not torch.allclose(augmented.support_x, plain.support_x)
    expected = random_scanner(torch.cat([plain.support_x[1], plain.query_x[1]]), episodes[1].scanner)
    torch.testing.assert_close(torch.cat([augmented.support_x[1], augmented.query_x[1]]), expected)


def test_one_vs_rest_needs_two_way_tasks() -> None:
    with pytest.raises(ConfigError, match=r"one-vs-rest makes 2-way tasks but model\.n-way=3"):
        FedMetaConfig().replace(model={"n_way": 3}, episode={"tasks": "one-vs-rest"})


def test_pretrain_rounds_train_supervised_then_meta_learn() -> None:
    cfg = FedMetaConfig().replace(server={"pretrain_rounds": 2})
    for server_round in (1, 2):
        pretrain = cfg.for_round(server_round)
        assert pretrain.maml.inner_steps == 0 and not pretrain.episode.permute_labels
    assert cfg.for_round(3) == cfg
    assert FedMetaConfig().for_round(1) == FedMetaConfig()
