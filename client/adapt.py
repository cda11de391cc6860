"""``fedmeta adapt``: a new hospital's own model from the meta-model and K labelled scans per class.

The K shots per class (drawn from the hospital's train split with the seed) are the whole labelled budget.
How to adapt is chosen on them alone (:mod:`shared.learning.adaptation`: the fine-tune of the meta-model, or scratch
when leave-one-shot-per-class-out cross-validation says clearly that it is better; the procedure the server's
held-out comparison and ``bench quality`` score as ``deployed``).

The chosen candidate is trained on all the shots and evaluated once on the hospital's test split, next to
the scratch candidate (the same recipe from a fresh initialisation), with bootstrap intervals for both and for
their paired difference, on the same test scans. The card, like the model, is a function of the
meta-model, the hospital's scans, K and the seed alone: the same seed gives the same card. The model's
head is sized to the hospital's classes: with another number of classes than the meta-model's n-way it
starts at zero (uniform predictions); the backbone is meta-learned. A meta-model trained with
``maml.head-init`` zero or prototypes starts every candidate but scratch from that head, whatever the number of
classes: the inner loop and the fine-tune start where meta-training's inner loop did.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.adapted_model import (
    CARD_FILE,
    FORMAT,
    FORMAT_VERSION,
    AdaptedModel,
    check_model_folder,
    save_adapted_model,
)
from shared.data.dicom import PreprocessConfig
from shared.data.hospital_folder import HospitalData, load_hospital, preprocess_for
from shared.errors import UserError
from shared.learning.adaptation import CHOICE_RULE, choose_adaptation, fit
from shared.learning.evaluation import BOOTSTRAP_RESAMPLES, FewShotProtocol, few_shot_tasks, paired_bootstrap
from shared.learning.maml import INNER_LR_PREFIX, MetaLearner, Params, intra_op_threads
from shared.learning.models import HEAD_PREFIX, build_model
from shared.run_folder import MetaModel, load_meta_model

HEAD_PER_TASK = {
    "zero": "zeros at the start of every adaptation (maml.head-init=zero, as in meta-training)",
    "prototypes": "the shots' class prototypes at the start of every adaptation (maml.head-init=prototypes, "
    "as in meta-training)",
}


def meta_init_for(meta: MetaModel, classes: int) -> tuple[Params, str]:
    """The meta-parameters with the head sized to ``classes``, and what was done to the head."""
    n_way = meta.cfg.model.n_way
    per_task_head = HEAD_PER_TASK.get(meta.cfg.maml.head_init)
    if classes == n_way:
        return dict(meta.params), per_task_head or (
            "meta-learned (the hospital has as many classes as the meta-model's n-way)"
        )
    params = dict(meta.params)
    for name in (HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"):
        params[name] = torch.zeros(classes, *params[name].shape[1:])
        if (lr := params.get(INNER_LR_PREFIX + name)) is not None:  # Meta-SGD: each class row gets the mean rate
            params[INNER_LR_PREFIX + name] = lr.mean(0, keepdim=True).expand(classes, *lr.shape[1:]).clone()
    return params, per_task_head or (
        f"re-initialised to zeros: the hospital has {classes} classes and the meta-model is {n_way}-way; "
        "the backbone is the meta-model's"
    )


@dataclass(frozen=True, eq=False)
class AdaptResult:
    model: AdaptedModel
    card: dict[str, Any]


def adapt_hospital(
    meta: MetaModel, data: HospitalData, shots: int, seed: int, preprocess: PreprocessConfig
) -> AdaptResult:
    if shots < 2:
        raise UserError(f"--shots {shots}: choosing how to adapt holds out one shot per class, so use 2 or more")
    if len(data.label_names) < 2:
        raise UserError(f"the hospital has one label ({data.label_names[0]}); label scans of at least two classes")
    train, test = data.split("train"), data.split("test")
    for c, name in enumerate(data.label_names):
        have = int((train.labels == c).sum())
        if have < shots:
            raise UserError(
                f"class '{name}' has {have} labelled train-split scans, fewer than --shots {shots}; "
                "lower --shots or label more of its scans"
            )
        if not (test.labels == c).any():
            raise UserError(
                f"class '{name}' has no test-split scans to evaluate on; mark some of its rows split=test in labels.csv"
            )
    classes = len(data.label_names)
    task = few_shot_tasks(train.labels, test.labels, classes, shots, tasks=1, seed=seed)[0]
    model_cfg = dataclasses.replace(meta.cfg.model, n_way=classes)
    learner = MetaLearner(build_model(model_cfg), meta.cfg.maml)
    meta_init, head = meta_init_for(meta, classes)
    sx, sy = torch.from_numpy(train.images[task.support]), torch.from_numpy(task.support_y)
    fresh_init = FewShotProtocol.fresh_init(model_cfg, seed)
    adaptation = choose_adaptation(learner, meta.cfg, meta_init, fresh_init, sx, sy, shots)
    options, validation, rule = adaptation.options, adaptation.validation, adaptation.challenge
    chosen = rule.chosen
    (baseline,) = (c for c in options if c.kind == "scratch")
    with intra_op_threads(1):
        modalities = tuple(sorted(data.report.images_by_modality))
        model = AdaptedModel(fit(learner, chosen, sx, sy), data.label_names, model_cfg, preprocess, modalities)
        scratch = model if baseline is chosen else dataclasses.replace(model, params=fit(learner, baseline, sx, sy))

    test_images = test.images[task.query]
    adapted_metrics, scratch_metrics, difference = paired_bootstrap(
        task.query_y, model.probabilities(test_images), scratch.probabilities(test_images), seed=seed
    )
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": {"meta_model": str(meta.weights), "sha256": meta.sha256, "run_config": meta.cfg.to_flat()},
        "hospital": {
            "classes": list(data.label_names),
            "train_scans": len(train),
            "test_scans": len(test),
            "test_scans_by_label": {name: int((test.labels == c).sum()) for c, name in enumerate(data.label_names)},
            "skipped_files": len(data.report.skipped),
        },
        "shots_per_class": shots,
        "seed": seed,
        "head": head,
        "validation": {
            "method": f"leave-one-shot-per-class-out over the {shots * classes} shots ({shots} folds)",
            "score": "out-of-fold balanced accuracy, ties broken by lower log-loss",
            "rule": CHOICE_RULE,
            "candidates": {c.name: {"recipe": c.recipe(), **validation.scores[c.name]} for c in options},
            "default_candidate": rule.default.name,
            "challenger": rule.challenger.name,
            "challenger_minus_default": rule.margin,
            "chosen": chosen.name,
        },
        "heldout": {
            "scans": len(task.query),
            **class_metrics_note(data.label_names),
            "adapted": adapted_metrics,
            "scratch": scratch_metrics,
            "scratch_candidate": baseline.name,
            "adapted_minus_scratch": difference,
            "intervals": f"95% percentile, {BOOTSTRAP_RESAMPLES} bootstrap resamples of the held-out scans "
            f"stratified by class, paired for the difference, seed {seed}",
        },
        **model.header(),
    }
    return AdaptResult(model, card)


def class_metrics_note(label_names: tuple[str, ...]) -> dict[str, str]:
    """What the card's class metrics are about: for two classes the positive class (the second label),
    for more the one-vs-rest macro averages of :func:`classification_metrics`."""
    if len(label_names) == 2:
        return {"positive_class": label_names[1]}
    return {
        "macro_metrics": "auc, macro-sensitivity (= balanced accuracy), macro-specificity: one-vs-rest per class, "
        "averaged over the classes with equal weight"
    }


def summary(card: dict[str, Any]) -> str:
    """The card as a short table: candidates and their validation scores, then held-out metrics with intervals."""
    validation, heldout = card["validation"], card["heldout"]
    lines = [
        f"{len(card['hospital']['classes'])} classes, {card['shots_per_class']} shots per class; head {card['head']}",
        "",
        f"validation ({validation['method']})",
        f"  {'candidate':<20} {'bal-acc':>8} {'log-loss':>9}",
    ]
    for name, scores in validation["candidates"].items():
        mark = "  <- chosen" if name == validation["chosen"] else ""
        lines.append(f"  {name:<20} {scores['balanced-accuracy']:>8.3f} {scores['log-loss']:>9.3f}{mark}")
    margin = validation["challenger_minus_default"]
    lines.append(
        f"  {validation['challenger']} - {validation['default_candidate']}: {margin['mean']:+.3f} per fold "
        f"(standard error {margin['standard_error']:.3f}); rule: {validation['rule']}"
    )

    def cell(estimate: dict[str, Any], sign: str = "") -> str:
        low, high = estimate["ci95"]
        return f"{estimate['value']:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"

    lines += [
        "",
        f"held-out test split: {heldout['scans']} scans (95% bootstrap intervals)",
        f"  sensitivity and specificity of '{heldout['positive_class']}' (the positive class)"
        if "positive_class" in heldout
        else f"  {heldout['macro_metrics']}",
        f"  {'metric':<18} {'adapted':>22} {heldout['scratch_candidate']:>22} {'adapted - scratch':>22}",
    ]
    for metric in heldout["adapted"]:
        adapted, scratch = cell(heldout["adapted"][metric]), cell(heldout["scratch"][metric])
        difference = cell(heldout["adapted_minus_scratch"][metric], "+")
        lines.append(f"  {metric:<18} {adapted:>22} {scratch:>22} {difference:>22}")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help="adapt the meta-model to a new hospital from K labelled scans per class",
        description="Adapt the meta-model to a new hospital: choose how by cross-validation over K labelled scans "
        "per class, train on them, evaluate once on the hospital's test split, write the model and its card.",
    )
    parser.add_argument(
        "--model", type=Path, required=True, metavar="RUN_DIR_OR_MODEL", help="run folder or its meta-model.safetensors"
    )
    parser.add_argument(
        "--hospital", type=Path, required=True, metavar="HOSPITAL_DIR", help="the new hospital's folder"
    )
    parser.add_argument("--shots", type=int, required=True, metavar="K", help="labelled scans per class to use")
    parser.add_argument("--out", type=Path, required=True, metavar="MODEL_OUT", help="folder to write the model in")
    parser.add_argument("--seed", type=int, default=0, help="draws the shots, the fresh init and the bootstrap")
    parser.add_argument("--json", action="store_true", help="print the model card as one JSON object")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    check_model_folder(args.out)
    meta = load_meta_model(args.model)
    preprocess = preprocess_for(meta.cfg)
    data = load_hospital(args.hospital, preprocess, progress=not args.json)
    if not args.json:
        print("choosing how to adapt by cross-validation over the shots ...", file=sys.stderr, flush=True)
    result = adapt_hospital(meta, data, args.shots, args.seed, preprocess)
    weights = save_adapted_model(args.out, result.model, result.card)
    if args.json:
        print(json.dumps(result.card, indent=1))
    else:
        print(summary(result.card))
        print(f"\nwrote {weights} and {weights.parent / CARD_FILE}")
    return 0
