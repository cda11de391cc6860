"""Few-shot evaluation: label K scans per class, adapt, predict the hospital's held-out scans.

An evaluation task draws N classes, K labelled support scans per class from the hospital's train
split, and queries *all* its test-split scans of those classes (the hospital's own prevalence).
Classes keep their order (episode label = rank of the class), so for a binary hospital the
positive class is its second label name and sensitivity/specificity mean what they say.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.config import FedMetaConfig, ModelConfig
from shared.data.hospital_folder import HospitalData
from shared.learning.episodes import EpisodeError
from shared.learning.maml import MetaLearner, Params
from shared.learning.models import build_model


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


def hospital_tasks(data: HospitalData, cfg: FedMetaConfig) -> list[FewShotTask]:
    """A hospital's evaluation tasks under a run's settings: episode.eval-episodes tasks of model.n-way classes,
    episode.k-shot labelled train scans per class, the test split as queries, drawn from the run's seed."""
    episode = cfg.episode
    return few_shot_tasks(
        data.split("train").labels,
        data.split("test").labels,
        cfg.model.n_way,
        episode.k_shot,
        episode.eval_episodes,
        cfg.seed,
    )


@dataclass(frozen=True)
class FewShotProtocol:
    """How fedmeta answers "does the meta-model help this hospital?", wherever it is asked: the server's held-out
    evaluation and comparison, ``fedmeta adapt`` and ``bench quality``. On the same shots:

    * ``meta``: the meta-model after its inner loop, ``inner_steps`` SGD steps at the meta-learned or configured
      inner rates (``episode.eval-steps``);
    * ``meta+fine-tune``: the meta-model (with the head a task starts from, ``maml.head-init``),
      ``fine_tune_steps`` full-batch Adam steps on every parameter at ``fine_tune_lr``;
    * ``scratch``: a fresh model (:meth:`fresh_init`) trained the same way at ``scratch_lr``, what the hospital
      has without fedmeta.

    ``fedmeta adapt`` chooses between these recipes by cross-validation on the shots
    (:mod:`shared.learning.adaptation`; scored as ``deployed`` wherever these are). Intervals: over several tasks,
    the mean per-task difference with a normal 95% interval (:func:`paired_gain`); within one task, a
    class-stratified paired bootstrap over its test scans (:func:`paired_bootstrap`).
    """

    inner_steps: int
    fine_tune_steps: int = 100
    fine_tune_lr: float = 1e-3
    scratch_lr: float = 1e-2

    @classmethod
    def for_run(cls, cfg: FedMetaConfig) -> FewShotProtocol:
        return cls(inner_steps=cfg.episode.eval_steps)

    @staticmethod
    def fresh_init(model: ModelConfig, seed: int) -> Params:
        """A fresh initialisation of ``model``, drawn from ``seed`` without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return {n: p.detach().clone() for n, p in build_model(model).named_parameters()}

    @staticmethod
    def inner_loop(learner: MetaLearner, params: Params, sx: torch.Tensor, sy: torch.Tensor, steps: int) -> Params:
        """``params`` after ``steps`` inner-loop steps on the shots (parameters the loop leaves alone kept)."""
        return FewShotProtocol.inner_loop_states(learner, params, sx, sy, (steps,))[steps]

    @staticmethod
    def inner_loop_states(
        learner: MetaLearner, params: Params, sx: torch.Tensor, sy: torch.Tensor, steps: Collection[int]
    ) -> dict[int, Params]:
        """:meth:`inner_loop` for each step count in ``steps``, from one run of the loop. 0 steps is the task's
        start: ``params`` with the head of ``maml.head-init``."""
        states = learner.inner_loop(params, sx, sy, learner.detached_inner_grads)
        out: dict[int, Params] = {}
        with torch.enable_grad():
            for done, adapted in enumerate(itertools.islice(states, max(steps) + 1)):
                if done in steps:
                    out[done] = {n: adapted.get(n, p).detach() for n, p in params.items()}
        return out

    @staticmethod
    def fine_tune(
        learner: MetaLearner, params: Params, sx: torch.Tensor, sy: torch.Tensor, steps: int, lr: float
    ) -> Params:
        """:meth:`adam` from the meta-model as a task starts (the head of ``maml.head-init``), so a model meta-trained
        with a zero or prototype head is fine-tuned from the head it was meta-trained with."""
        return FewShotProtocol.adam(learner, FewShotProtocol.inner_loop(learner, params, sx, sy, 0), sx, sy, steps, lr)

    @staticmethod
    def adam(learner: MetaLearner, init: Params, sx: torch.Tensor, sy: torch.Tensor, steps: int, lr: float) -> Params:
        """Full-batch Adam on every model parameter, starting from ``init`` (inner rates of Meta-SGD dropped)."""
        names = [name for name, _ in learner.model.named_parameters()]
        params = {n: init[n].detach().clone().requires_grad_() for n in names}
        # one multi-tensor update for all parameters: the per-tensor loop's numbers, about 10% faster on a CPU
        optimizer = torch.optim.Adam(list(params.values()), lr=lr, foreach=True)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                F.cross_entropy(learner.logits(params, sx), sy).backward()
                optimizer.step()
        return {n: p.detach() for n, p in params.items()}

    def meta_predictions(
        self,
        learner: MetaLearner,
        params: Params,
        task: FewShotTask,
        train_images: torch.Tensor,
        test_images: torch.Tensor,
        sweep: tuple[int, ...] = (),
    ) -> dict[str, np.ndarray]:
        """Query probabilities ``[Q, N]`` of the meta-model's variants on one task: ``meta``, ``meta+fine-tune`` and,
        for each step count in ``sweep``, ``meta/k=<steps>`` (all inner-loop counts from one run of the loop)."""
        sx, sy = _shots(task, train_images)
        queries = test_images[task.query]
        out: dict[str, np.ndarray] = {}
        states = self.inner_loop_states(learner, params, sx, sy, {self.inner_steps, *sweep})
        for steps, adapted in states.items():
            probs = predict(learner, adapted, queries)
            if steps in sweep:
                out[f"meta/k={steps}"] = probs
            if steps == self.inner_steps:
                out["meta"] = probs
        tuned = self.fine_tune(learner, params, sx, sy, self.fine_tune_steps, self.fine_tune_lr)
        out["meta+fine-tune"] = predict(learner, tuned, queries)
        return out

    def scratch_predictions(
        self,
        learner: MetaLearner,
        fresh: Params,
        task: FewShotTask,
        train_images: torch.Tensor,
        test_images: torch.Tensor,
    ) -> np.ndarray:
        sx, sy = _shots(task, train_images)
        return predict(
            learner, self.adam(learner, fresh, sx, sy, self.fine_tune_steps, self.scratch_lr), test_images[task.query]
        )


def _shots(task: FewShotTask, train_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return train_images[task.support], torch.from_numpy(task.support_y).to(train_images.device)


def predict(learner: MetaLearner, params: Params, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return learner.logits(params, images).softmax(-1).cpu().numpy()


def few_shot_metrics(
    learner: MetaLearner, meta_params: Params, data: HospitalData, cfg: FedMetaConfig
) -> dict[str, float]:
    """The meta-model's few-shot metrics at a hospital (the protocol's ``meta`` on each of its tasks), over all
    tasks' queries together."""
    protocol = FewShotProtocol.for_run(cfg)
    device = next(iter(meta_params.values())).device
    train_images = torch.from_numpy(data.split("train").images).to(device)
    test_images = torch.from_numpy(data.split("test").images).to(device)
    probs, truth = [], []
    for task in hospital_tasks(data, cfg):
        sx, sy = _shots(task, train_images)
        adapted = protocol.inner_loop(learner, meta_params, sx, sy, protocol.inner_steps)
        probs.append(predict(learner, adapted, test_images[task.query]))
        truth.append(task.query_y)
    return classification_metrics(np.concatenate(truth), np.concatenate(probs))


def paired_gain(differences: np.ndarray) -> dict[str, float]:
    """Mean of paired per-task differences and the half-width of its normal 95% interval."""
    half = 1.96 * differences.std(ddof=1) / np.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    return {"mean": float(differences.mean()), "ci95": float(half)}


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
