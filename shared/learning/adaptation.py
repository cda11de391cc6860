"""How a new hospital adapts the meta-model: candidate recipes, chosen by cross-validation on its K shots per class.

The K shots per class are the whole labelled budget. How to adapt is chosen on them alone, by
leave-one-shot-per-class-out cross-validation (fold j holds out the j-th shot of every class), among:

* ``inner-loop-<k>``: the meta-training inner loop, k steps (``maml.inner-steps`` and ``episode.eval-steps``, and 0
  with ``maml.head-init=prototypes``: the shots' nearest class mean);
* ``fine-tune-lr<lr>``: Adam on every parameter from the meta-model (with the head its inner loop starts from), at the
  protocol's fine-tune rate;
* ``scratch-lr<lr>``: the same recipe from a fresh initialisation at the protocol's scratch rate, what the hospital
  has without fedmeta;

the recipes, step counts and rates of :class:`~shared.learning.evaluation.FewShotProtocol`. The rule deploys the
fine-tune of the meta-model, and scratch only when it wins by more than a standard error (:data:`CHOICE_RULE`): the
fallback for a hospital the meta-model does not suit. The inner loops are scored on the shots for the record.
This is what ``fedmeta adapt`` deploys at a new hospital and what the server's held-out
comparison and ``bench quality`` score as ``deployed``: one procedure, wherever it is asked.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from shared.config import FedMetaConfig
from shared.learning.evaluation import FewShotProtocol, classification_metrics
from shared.learning.maml import MetaLearner, Params, intra_op_threads

CandidateKind = Literal["inner-loop", "fine-tune", "scratch"]


@dataclass(frozen=True, eq=False)
class Candidate:
    name: str
    kind: CandidateKind
    init: Params
    steps: int
    lr: float | None = None  # Adam's; None for the inner loop (SGD at the meta-learned or configured rates)

    def recipe(self) -> str:
        if self.kind == "inner-loop":
            return f"meta-training inner loop from the meta-model, {self.steps} SGD steps"
        start = "the meta-model" if self.kind == "fine-tune" else "a fresh initialisation"
        return f"Adam from {start}, {self.steps} full-batch steps, lr {self.lr:g}"


def candidates(cfg: FedMetaConfig, meta_init: Params, fresh_init: Params) -> list[Candidate]:
    protocol = FewShotProtocol.for_run(cfg)
    steps = protocol.fine_tune_steps
    inner_steps = {cfg.maml.inner_steps, protocol.inner_steps} - {0}
    if cfg.maml.head_init == "prototypes":  # 0 steps is a classifier of its own when the head is made from the shots
        inner_steps.add(0)
    inner = [Candidate(f"inner-loop-{k}", "inner-loop", meta_init, k) for k in sorted(inner_steps)]
    # Adam at each start's own rate only: both rates for both starts chose no better on the training hospitals' own
    # test splits and cost twice the fits (BENCHMARKS.md)
    fine, scratch = protocol.fine_tune_lr, protocol.scratch_lr
    return [
        *inner,
        Candidate(f"fine-tune-lr{fine:g}", "fine-tune", meta_init, steps, fine),
        Candidate(f"scratch-lr{scratch:g}", "scratch", fresh_init, steps, scratch),
    ]


def fit(learner: MetaLearner, candidate: Candidate, sx: torch.Tensor, sy: torch.Tensor) -> Params:
    """The model's parameters after training ``candidate`` on the shots ``sx``, ``sy``."""
    if candidate.kind == "inner-loop":
        adapted = FewShotProtocol.inner_loop(learner, candidate.init, sx, sy, candidate.steps)
        return {name: adapted[name] for name, _ in learner.model.named_parameters()}
    assert candidate.lr is not None
    train = FewShotProtocol.fine_tune if candidate.kind == "fine-tune" else FewShotProtocol.adam
    return train(learner, candidate.init, sx, sy, candidate.steps, candidate.lr)


@dataclass(frozen=True)
class Validation:
    """Each candidate's out-of-fold scores on the shots, and its balanced accuracy on each fold."""

    scores: dict[str, dict[str, float]]  # candidate -> out-of-fold balanced-accuracy and log-loss
    fold_accuracy: dict[str, np.ndarray]  # candidate -> per fold; a fold holds one shot per class

    def best(self, options: Iterable[Candidate]) -> Candidate:
        """The best out-of-fold balanced accuracy, ties broken by lower log-loss."""
        return max(options, key=lambda c: (self.scores[c.name]["balanced-accuracy"], -self.scores[c.name]["log-loss"]))

    def margin(self, better: Candidate, than: Candidate) -> dict[str, float]:
        """Mean per-fold balanced-accuracy difference ``better`` - ``than`` and its standard error."""
        diff = self.fold_accuracy[better.name] - self.fold_accuracy[than.name]
        return {"mean": float(diff.mean()), "standard_error": float(diff.std(ddof=1) / np.sqrt(len(diff)))}


def cross_validate(
    learner: MetaLearner, options: list[Candidate], sx: torch.Tensor, sy: torch.Tensor, shots: int
) -> Validation:
    """Out-of-fold scores of each candidate.

    Shots are class-major, so fold j holds out the shots at index % shots == j. The (candidate, fold) fits
    are tiny full-batch steps: they run on a thread pool with one intra-op thread each, which is also what
    keeps them fast on a CPU shared with other processes.
    """
    fold = np.arange(len(sy)) % shots

    def held_out_probs(job: tuple[Candidate, int]) -> np.ndarray:
        candidate, j = job
        held = torch.from_numpy(fold == j)
        params = fit(learner, candidate, sx[~held], sy[~held])
        with torch.no_grad():
            return learner.logits(params, sx[held]).softmax(-1).numpy()

    jobs = [(candidate, j) for candidate in options for j in range(shots)]
    workers = torch.get_num_threads()
    with intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        results = dict(zip(jobs, pool.map(held_out_probs, jobs), strict=True))
    y = sy.numpy()
    scores, fold_accuracy = {}, {}
    for candidate in options:
        probs = np.zeros((len(y), learner.model.head.out_features))
        for j in range(shots):
            probs[fold == j] = results[candidate, j]
        scores[candidate.name] = {
            "balanced-accuracy": classification_metrics(y, probs)["balanced-accuracy"],
            "log-loss": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()),
        }
        correct = probs.argmax(1) == y
        fold_accuracy[candidate.name] = np.array([correct[fold == j].mean() for j in range(shots)])
    return Validation(scores, fold_accuracy)


CHOICE_RULE = (
    "the fine-tune of the meta-model unless training from scratch has a per-fold balanced accuracy higher on average "
    "by more than one standard error of the paired difference"
)


@dataclass(frozen=True)
class Challenge:
    """:data:`CHOICE_RULE` on one hospital's shots: the default, its best challenger, the challenger's margin."""

    default: Candidate
    challenger: Candidate
    margin: dict[str, float]  # challenger - default, per fold: mean and standard error
    standard_errors: float = 1.0  # how many standard errors the challenger must win by

    @property
    def chosen(self) -> Candidate:
        won = self.margin["mean"] > self.standard_errors * self.margin["standard_error"]
        return self.challenger if won else self.default


def challenge(
    options: list[Candidate],
    validation: Validation,
    challengers: frozenset[CandidateKind] = frozenset({"scratch"}),
    standard_errors: float = 1.0,
) -> Challenge:
    """The candidate a new hospital deploys is ``challenge(...).chosen`` (:data:`CHOICE_RULE`); ``challengers`` and
    ``standard_errors`` give the variants ``bench quality`` scores beside it.

    Out-of-fold scores on a few shots are noisy, and choosing among the meta-model's own candidates on them cost the
    most: on the training hospitals' own test splits (BENCHMARKS.md), letting an inner loop challenge the fine-tune
    too scored 0.5-2.3 points below always fine-tuning, scratch alone as the challenger 0.3-0.9 (the price of the
    fallback on hospitals that did not need it). The server's held-out comparison relies on the default challengers:
    the recipes it deploys are the fine-tune and scratch it scores anyway (``server.heldout.SAME_RECIPE``).
    """
    (default,) = (c for c in options if c.kind == "fine-tune")
    challenger = validation.best(c for c in options if c.kind in challengers)
    return Challenge(default, challenger, validation.margin(challenger, default), standard_errors)


@dataclass(frozen=True)
class Adaptation:
    """The deployed procedure's outcome on one hospital's shots: the candidates, their validation, the choice."""

    options: list[Candidate]
    validation: Validation
    challenge: Challenge

    @property
    def chosen(self) -> Candidate:
        return self.challenge.chosen


def choose_adaptation(
    learner: MetaLearner,
    cfg: FedMetaConfig,
    meta_init: Params,
    fresh_init: Params,
    sx: torch.Tensor,
    sy: torch.Tensor,
    shots: int,
) -> Adaptation:
    """Cross-validate every candidate on the shots ``sx``, ``sy`` (``shots`` per class, class-major) and choose."""
    options = candidates(cfg, meta_init, fresh_init)
    validation = cross_validate(learner, options, sx, sy, shots)
    return Adaptation(options, validation, challenge(options, validation))
