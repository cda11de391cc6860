"""Few-shot evaluation: label K scans per class, adapt, predict the hospital's held-out scans.

An evaluation task draws N classes, K labelled support scans per class from the hospital's train
split, and queries *all* its test-split scans of those classes (the hospital's own prevalence).
Classes keep their order (episode label = rank of the class), so for a binary hospital the
positive class is its second label name and sensitivity/specificity mean what they say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.config import FedMetaConfig
from shared.data.hospital_folder import HospitalData
from shared.learning.episodes import EpisodeError
from shared.learning.maml import MetaLearner, Params


@dataclass(frozen=True)
class FewShotTask:
    classes: np.ndarray  # pool labels, ascending; episode label i <-> classes[i]
    support: np.ndarray  # indices into the train pool
    support_y: np.ndarray
    query: np.ndarray  # indices into the test pool
    query_y: np.ndarray


def few_shot_tasks(
    train_labels: np.ndarray, test_labels: np.ndarray, n_way: int, k_shot: int, tasks: int, seed: int
) -> list[FewShotTask]:
    rng = np.random.default_rng(seed)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    eligible = [c for c in np.unique(train_labels) if (train_labels == c).sum() >= k_shot and (test_labels == c).any()]
    if len(eligible) < n_way:
        raise EpisodeError(
            f"few-shot evaluation needs {n_way} classes with {k_shot} labelled train scans and at least one test "
            f"scan each; this hospital has {len(eligible)}. Label more scans or lower episode.k-shot"
        )
    out = []
    for _ in range(tasks):
        classes = np.sort(rng.choice(eligible, size=n_way, replace=False))
        support = np.concatenate(
            [rng.choice(np.flatnonzero(train_labels == c), size=k_shot, replace=False) for c in classes]
        )
        query = np.flatnonzero(np.isin(test_labels, classes))
        rank = {int(c): i for i, c in enumerate(classes)}
        out.append(
            FewShotTask(
                classes=classes,
                support=support,
                support_y=np.repeat(np.arange(n_way), k_shot),
                query=query,
                query_y=np.array([rank[int(c)] for c in test_labels[query]]),
            )
        )
    return out


def hospital_tasks(data: HospitalData, cfg: FedMetaConfig, seed: int) -> list[FewShotTask]:
    """A hospital's evaluation tasks under a run's settings: episode.eval-episodes tasks of model.n-way classes,
    episode.k-shot labelled train scans per class, the test split as queries."""
    episode = cfg.episode
    return few_shot_tasks(
        data.split("train").labels,
        data.split("test").labels,
        cfg.model.n_way,
        episode.k_shot,
        episode.eval_episodes,
        seed,
    )


def few_shot_metrics(
    learner: MetaLearner,
    meta_params: Params,
    data: HospitalData,
    cfg: FedMetaConfig,
    steps: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The meta-model's few-shot metrics at a hospital: the inner loop (episode.eval-steps unless ``steps``) on each
    of its tasks' shots, predictions on the test split, metrics over all tasks' queries together."""
    steps = cfg.episode.eval_steps if steps is None else steps
    device = next(iter(meta_params.values())).device
    train_images = torch.from_numpy(data.split("train").images).to(device)
    test_images = torch.from_numpy(data.split("test").images).to(device)
    probs, truth = [], []
    for task in hospital_tasks(data, cfg, seed):
        probs.append(adapt_and_predict(learner, meta_params, task, train_images, test_images, steps))
        truth.append(task.query_y)
    return classification_metrics(np.concatenate(truth), np.concatenate(probs))


def adapt_and_predict(
    learner: MetaLearner,
    params: Params,
    task: FewShotTask,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    steps: int,
) -> np.ndarray:
    """Query class probabilities ``[Q, N]`` after ``steps`` inner-loop steps on the task's support set."""
    sx, sy = train_images[task.support], torch.from_numpy(task.support_y).to(train_images.device)
    with torch.enable_grad():
        adapted = learner.adapt(params, sx, sy, learner.detached_inner_grads, steps)
    with torch.no_grad():
        return adapted(test_images[task.query]).softmax(-1).cpu().numpy()


def train_from_scratch(
    learner: MetaLearner, init: Params, task: FewShotTask, train_images: torch.Tensor, steps: int, lr: float = 1e-2
) -> Params:
    """The baseline a hospital has without fedmeta: a fresh model trained on the same shots with Adam."""
    sy = torch.from_numpy(task.support_y).to(train_images.device)
    return fine_tune(learner, init, train_images[task.support], sy, steps, lr)


def fine_tune(learner: MetaLearner, init: Params, sx: torch.Tensor, sy: torch.Tensor, steps: int, lr: float) -> Params:
    """Full-batch Adam on every parameter in ``init``, starting from ``init``."""
    params = {n: p.detach().clone().requires_grad_() for n, p in init.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(learner.logits(params, sx), sy).backward()
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy (mean recall over the classes in ``y_true``), and, when at least two
    classes are present:

    * two classes: ``auc`` (ROC of the class-1 probability), ``sensitivity`` (recall of class 1, the positive
      class) and ``specificity`` (recall of class 0);
    * more than two classes, each class in turn against all the others (one-vs-rest), averaged with equal
      weight over the classes present (absent classes are left out): ``auc`` (of the class's probability;
      for two classes this is the binary AUC), ``macro-sensitivity`` (mean of recall of c; equal to balanced
      accuracy, named so the card reads as a clinician expects) and ``macro-specificity`` (mean over c of the
      fraction of scans not of class c that are not predicted c).
    """
    y_true = np.asarray(y_true)
    predicted = probs.argmax(-1)
    classes = np.unique(y_true)
    recalls = [float((predicted[y_true == c] == c).mean()) for c in classes]
    metrics = {
        "accuracy": float((predicted == y_true).mean()),
        "balanced-accuracy": float(np.mean(recalls)),
        "queries": float(len(y_true)),
    }
    if len(classes) < 2:
        return metrics
    if probs.shape[-1] == 2:
        metrics["auc"] = auc(y_true, probs[:, 1])
        metrics["sensitivity"] = float((predicted[y_true == 1] == 1).mean())
        metrics["specificity"] = float((predicted[y_true == 0] == 0).mean())
    else:
        metrics["auc"] = float(np.mean([auc((y_true == c).astype(int), probs[:, c]) for c in classes]))
        metrics["macro-sensitivity"] = metrics["balanced-accuracy"]
        metrics["macro-specificity"] = float(np.mean([(predicted[y_true != c] != c).mean() for c in classes]))
    return metrics


def auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count one half)."""
    positive, negative = score[y_true == 1], score[y_true == 0]
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


BOOTSTRAP_RESAMPLES = 1000
Interval = dict[str, Any]  # {"value": point estimate, "ci95": [low, high]}


def paired_bootstrap(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[dict[str, Interval], dict[str, Interval], dict[str, Interval]]:
    """:func:`classification_metrics` of two models on the same scans and of their difference (a - b), each
    with a 95% percentile interval over the same bootstrap resamples of the scans.

    Resampling is stratified by true class (class counts stay fixed), so every resample has every class and
    balanced accuracy, AUC, sensitivity and specificity are defined in all of them.
    """
    y_true = np.asarray(y_true)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    point_a, point_b = classification_metrics(y_true, probs_a), classification_metrics(y_true, probs_b)
    names = [name for name in point_a if name != "queries"]
    samples = np.empty((resamples, 2, len(names)))
    for r in range(resamples):
        index = np.concatenate([rng.choice(members, size=len(members)) for members in by_class])
        for m, probs in enumerate((probs_a, probs_b)):
            metrics = classification_metrics(y_true[index], probs[index])
            samples[r, m] = [metrics[name] for name in names]

    def intervals(point: dict[str, float], draws: np.ndarray) -> dict[str, Interval]:
        low, high = np.percentile(draws, [2.5, 97.5], axis=0)
        return {
            name: {"value": point[name], "ci95": [float(lo), float(hi)]}
            for name, lo, hi in zip(names, low, high, strict=True)
        }

    difference = {name: point_a[name] - point_b[name] for name in names}
    return (
        intervals(point_a, samples[:, 0]),
        intervals(point_b, samples[:, 1]),
        intervals(difference, samples[:, 0] - samples[:, 1]),
    )
