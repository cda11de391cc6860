"""Few-shot quality on hospitals that never trained: every method in the same harness, DP on and off.

Settings (``--setting``):

- ``synthetic``: site shift on the synthetic federation (each hospital its own scanners, label set
  and prevalence); held-out hospitals come from another seed stream;
- ``pneumonia`` / ``retina``: that MedMNIST set split over ``--hospitals + --heldout`` hospitals
  with per-site intensity, contrast, noise, blur and resolution shift; the last ``--heldout`` never train;
- ``breast-new-task``: retina and pneumonia hospitals train, breast hospitals are held out: a
  diagnostic task no training hospital has;
- ``novel-classes``: label-set shift from one MedMNIST-format ``--npz``. ``--novel-classes N`` classes
  (drawn from the seed) are held out; each training hospital has its own ``--classes-per-hospital A-B``
  of the others, each held-out hospital its own A-B with at least one novel class; every hospital has
  its own prevalence and scanner shift, and for RGB files its own stain shift (the 1-channel model sees
  it through the reader's BT.601 luma). ``blood-novel-classes`` is this with ``bloodmnist.npz``, 3-4
  classes per hospital and 2 novel of the 8 blood-cell types. A held-out task is model.n-way of the
  hospital's classes (2 of 3-4 by default), so about half to two thirds of its tasks contain a class
  no training hospital ever saw and the rest pair known classes under the hospital's new shift and
  label set. ``label-sets.json`` in the federation folder lists every hospital's classes.

Every run is ``fedmeta simulate --engine in-process`` (the real ServerApp and ClientApp, minus the
network). Then, on the same few-shot tasks of each held-out hospital (K labelled train scans per
class, all its test scans as queries), each trained model is scored with the one few-shot protocol
(:class:`~shared.learning.evaluation.FewShotProtocol`) after k = 0, 1, 5, 10 inner-loop steps and after
its fine-tune, next to local-only training (the protocol's scratch model on the same shots), and as
deployed (``deployed``): what ``fedmeta adapt`` does at a new hospital, the candidate its cross-validation on the
shots picks (the fine-tune, or scratch when it wins clearly; :mod:`shared.learning.adaptation`), fitted on all shots.
Beside it, from the same cross-validation: ``cv-argmax``, the candidate with the best out-of-fold score, and
``oracle-upper-bound``, the candidate with the best balanced accuracy on the test scans, which no hospital can pick
(an upper bound on balanced accuracy, not a method).
``deployed_choices`` counts the kinds the deployed rule and ``cv-argmax`` picked and how often the deployed choice
scored below the best candidate on the test scans, and by how much. Other choice rules over the same
cross-validation are scored beside it (:data:`ALTERNATIVE_RULES`), to be compared with ``--score-on training``
(written to ``quality-training.json``): the same tasks drawn from the training hospitals, with their own test splits
(never trained on) as queries, where a rule may be chosen. There the shots come from train splits the meta-model
saw in training, which favours the meta-model's candidates over scratch: compare rules there, not the meta-model
with scratch.
Differences are paired per task against the reference (class-balanced FedAvg + fine-tune when it ran),
with a normal 95% interval, and per hospital: how many held-out hospitals improve on average. The run
folders are kept under ``--work-dir``: a rerun reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from server.heldout import HeldoutHospitals
from server.round_log import mean_metrics, read_round_log
from shared.atomic import atomic_write_json
from shared.config import FedMetaConfig, parse_assignments
from shared.data.federation import federation_dir, hospital_name
from shared.errors import UserError
from shared.learning.adaptation import (
    Candidate,
    CandidateKind,
    Challenge,
    Validation,
    challenge,
    choose_adaptation,
    fit,
)
from shared.learning.episodes import EpisodeError
from shared.learning.evaluation import (
    FewShotProtocol,
    FewShotTask,
    classification_metrics,
    few_shot_tasks,
    paired_gain,
    predict,
)
from shared.learning.maml import MetaLearner, Params
from shared.learning.models import build_model
from shared.run_folder import DEPLOYED, META_MODEL
from simulations.data.medmnist import import_medmnist, import_novel_classes
from simulations.data.synthetic import write_synthetic_federation
from simulations.simulate import METHODS, run_simulation, simulation_config

SETTINGS = ("synthetic", "pneumonia", "retina", "breast-new-task", "novel-classes", "blood-novel-classes")
NOVEL_CLASS_SETTINGS = {"novel-classes": None, "blood-novel-classes": "bloodmnist.npz"}  # setting -> preset file
IMAGES_PER_HOSPITAL = 400
ADAPT_STEPS = (0, 1, 5, 10)
LOCAL_ONLY = "local-only"
REFERENCE = "fedavg/fine-tune"
VARIANT_NAMES = {"meta+fine-tune": "fine-tune"}
CV_ARGMAX = "cv-argmax"
ORACLE = "oracle-upper-bound"
METRICS = ("balanced-accuracy", "auc", "accuracy")
SCORED_ON = {"heldout": "held-out hospitals", "training": "training hospitals' own test splits"}
DEFAULT_METHODS = (
    "fedavg,fedmeta-first-order-zero-head,fedmeta,fedmeta-first-order,anil,meta-sgd,pretrain-then-meta,centralised"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setting", choices=SETTINGS, default="synthetic")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/medmnist"), help="MedMNIST .npz folder")
    parser.add_argument(
        "--npz",
        type=Path,
        default=None,
        help="novel-classes: a MedMNIST-format .npz (blood-novel-classes: DATA_ROOT/bloodmnist.npz)",
    )
    parser.add_argument(
        "--classes-per-hospital",
        type=class_range,
        default=(3, 4),
        metavar="A-B",
        help="novel-classes: each hospital's own A to B classes",
    )
    parser.add_argument(
        "--novel-classes", type=int, default=2, metavar="N", help="novel-classes: classes only held-out hospitals have"
    )
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument(
        "--privacy", default="none,8", help="comma-separated privacy levels: none (DP off) or a target epsilon"
    )
    parser.add_argument("--hospitals", type=int, default=24, help="training hospitals")
    parser.add_argument("--heldout", type=int, default=6, help="hospitals that never train")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--clients-per-round", type=int, default=6)
    parser.add_argument("--shots", default="5,10", help="comma-separated K (labelled scans per class)")
    parser.add_argument("--eval-tasks", type=int, default=10, help="few-shot tasks per held-out hospital and K")
    parser.add_argument(
        "--score-on",
        choices=("heldout", "training"),
        default="heldout",
        help="score on the held-out hospitals, or on the training hospitals' own test splits (never trained on: "
        "the data to choose settings and rules on)",
    )
    parser.add_argument(
        "--deployed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score each model as fedmeta adapt deploys it (cross-validated choice), beside the plain best "
        "out-of-fold score and the best candidate on the test scans (every candidate fitted; the slowest variants)",
    )
    parser.add_argument(
        "--deployed-methods", default=None, help="comma-separated: score only these methods as deployed (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: runs/bench-quality-SETTING")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run settings for every run")


def class_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write A-B (for example 3-4) or one number") from None


@dataclass(frozen=True)
class TrainedModel:
    name: str  # method, with @epsN when private
    method: str
    cfg: FedMetaConfig
    params: Params


def privacy_levels(text: str) -> list[float | None]:
    levels: list[float | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            levels.append(None if item == "none" else float(item))
        except ValueError:
            raise UserError(f"--privacy {text!r}: write none or an epsilon, e.g. none,8,3,1") from None
    return levels


def prepare_federation(args: argparse.Namespace, work_dir: Path) -> Path | None:
    """The federation folder of a MedMNIST setting, written once; ``None`` for synthetic hospitals."""
    if args.setting == "synthetic":
        return None
    federation = work_dir / "federation"
    done = federation / ".complete"
    recipe = federation_recipe(args)
    if done.exists():
        if (written := json.loads(done.read_text() or "{}")) != recipe:
            changed = sorted(k for k in recipe.keys() | written.keys() if recipe.get(k) != written.get(k))
            raise UserError(
                f"{work_dir} holds a federation written with other settings ({', '.join(changed)}), and runs "
                "trained on it; pass a new --work-dir"
            )
        return federation
    shutil.rmtree(federation, ignore_errors=True)
    staging = work_dir / "federation-staging"
    shutil.rmtree(staging, ignore_errors=True)
    if args.setting in NOVEL_CLASS_SETTINGS:
        preset = NOVEL_CLASS_SETTINGS[args.setting]
        if args.npz is None and preset is None:
            raise UserError(f"--setting {args.setting} needs --npz FILE, a MedMNIST-format .npz")
        import_novel_classes(
            npz_file(args.npz or args.data_root / preset),
            staging,
            args.hospitals,
            args.heldout,
            args.classes_per_hospital,
            args.novel_classes,
            args.seed,
            IMAGES_PER_HOSPITAL,
        )
    elif args.setting == "breast-new-task":
        training = [npz_file(args.data_root / f"{name}mnist.npz") for name in ("retina", "pneumonia")]
        import_medmnist(training, staging, args.hospitals, "iid", args.seed, max_per_hospital=IMAGES_PER_HOSPITAL)
        breast = npz_file(args.data_root / "breastmnist.npz")
        import_medmnist([breast], staging / "heldout", args.heldout, "iid", args.seed + 1)
    else:
        total = args.hospitals + args.heldout
        npz = npz_file(args.data_root / f"{args.setting}mnist.npz")
        import_medmnist([npz], staging / "all", total, "site-shift", args.seed, max_per_hospital=IMAGES_PER_HOSPITAL)
        for h in range(total):
            name = hospital_name(h) if h < args.hospitals else f"heldout/{hospital_name(h - args.hospitals)}"
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / "all" / hospital_name(h)).rename(staging / name)
        (staging / "all").rmdir()
    staging.rename(federation)
    atomic_write_json(done, recipe)
    return federation


def federation_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments a MedMNIST setting's federation is written from: a work dir holds one federation."""
    keys = ("setting", "hospitals", "heldout", "seed", "data_root", "npz", "classes_per_hospital", "novel_classes")
    return {key: str(value) for key in keys if (value := getattr(args, key, None)) is not None}


def npz_file(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path} not found; pass --data-root (or --npz), the folder (or file) of the MedMNIST .npz")
    return path


def method_names(text: str) -> list[str]:
    """The methods of a comma-separated ``--methods``."""
    names = [m.strip() for m in text.split(",")]
    if unknown := [m for m in names if m not in METHODS]:
        raise UserError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return names


def deployed_method_names(args: argparse.Namespace) -> set[str]:
    """The methods to score as deployed, checked before anything trains."""
    trained = method_names(args.methods)
    if args.deployed_methods is None:
        return set(trained)
    deployed = {m.strip() for m in args.deployed_methods.split(",")}
    if unknown := deployed - set(trained):
        raise UserError(f"--deployed-methods {', '.join(sorted(unknown))}: not trained here; name methods of --methods")
    return deployed


def train_models(args: argparse.Namespace, work_dir: Path, federation: Path | None) -> tuple[list[TrainedModel], dict]:
    models, runs = [], {}
    for method in method_names(args.methods):
        for epsilon in privacy_levels(args.privacy):
            if method == "centralised" and epsilon is not None:
                continue  # the non-private upper bound has no private version
            name = method if epsilon is None else f"{method}@eps{epsilon:g}"
            out = work_dir / "runs" / name
            settings = [
                "data.heldout-hospitals=0",
                "server.fraction-evaluate=0",
                f"server.eval-every={args.rounds}",
                *([f"privacy.target-epsilon={epsilon}"] if epsilon is not None else []),
                *(
                    [f"data.federation-dir={work_dir / 'federation'}", "data.synthetic=true"]
                    if federation is None
                    else []
                ),
                *args.set,
            ]
            sim_args = argparse.Namespace(
                hospitals=args.hospitals,
                rounds=args.rounds,
                clients_per_round=min(args.clients_per_round, args.hospitals),
                data=federation,
                method=method,
                no_dp=epsilon is None,
                out=out,
                seed=args.seed,
                set=settings,
            )
            cfg = simulation_config(sim_args)
            started = time.perf_counter()
            result = run_simulation(cfg, args.hospitals, quiet=True, engine="in-process")
            # with --set server.fraction-evaluate > 0: the training hospitals' few-shot metrics on their own test
            # splits after the last round, the data to choose settings on (never the held-out hospitals')
            validation = read_round_log(out)[-1].hospitals
            runs[name] = {
                "seconds": round(time.perf_counter() - started, 1),  # 0 when an earlier run is reused
                "rounds": result["rounds_completed"],
                "epsilon_max": result["epsilon_max"],
                "peak_rss_mb": result["peak_rss_mb"],
                **({"training_hospitals": mean_metrics(validation)} if validation else {}),
            }
            models.append(TrainedModel(name, method, cfg, load_file(out / META_MODEL)))
    return models, runs


def heldout_hospitals(args: argparse.Namespace, work_dir: Path, federation: Path | None) -> HeldoutHospitals:
    flat = {
        **FedMetaConfig().to_flat(),
        "seed": args.seed,
        "data.federation-dir": str(federation or work_dir / "federation"),
        "data.synthetic": federation is None,
        "data.heldout-hospitals": args.heldout,
        **parse_assignments(args.set, "--set"),
    }
    cfg = FedMetaConfig.from_flat(flat)
    if federation is None:  # the synthetic held-out hospitals, from their own seed stream
        write_synthetic_federation(cfg, args.hospitals)
    if args.score_on == "training":
        return HeldoutHospitals(cfg, [federation_dir(cfg) / hospital_name(i) for i in range(args.hospitals)])
    return HeldoutHospitals(cfg)


def task_scores(task: FewShotTask, probs: np.ndarray) -> dict[str, float]:
    metrics = classification_metrics(task.query_y, probs)
    return {k: metrics[k] for k in METRICS if k in metrics}


@dataclass
class DeployedChoices:
    """What the deployed procedure picked over one model's tasks, and its shortfall against the best candidate."""

    picked: Counter[str] = field(default_factory=Counter)
    argmax_picked: Counter[str] = field(default_factory=Counter)
    gaps: list[float] = field(default_factory=list)  # best candidate's test balanced accuracy - the deployed one's

    def summary(self) -> dict[str, Any]:
        return {
            "picked": dict(self.picked),
            "cv_argmax_picked": dict(self.argmax_picked),
            "tasks": len(self.gaps),
            "worse_than_best_candidate": int(sum(g > 0 for g in self.gaps)),
            "mean_gap_to_best_candidate": float(np.mean(self.gaps)),
        }


def deployed_predictions(
    learner: MetaLearner,
    model: TrainedModel,
    task: FewShotTask,
    train_x: torch.Tensor,
    test_x: torch.Tensor,
    shots: int,
    fresh: Params,
    record: DeployedChoices,
) -> dict[str, np.ndarray]:
    """Query probabilities of ``fedmeta adapt``'s model for the task (its candidates and cross-validated choice), of
    the best out-of-fold score's candidate and of the best candidate on the test scans; ``record`` gets the kinds
    picked and the deployed choice's gap to the best."""
    sx, sy = train_x[task.support], torch.from_numpy(task.support_y)
    adaptation = choose_adaptation(learner, model.cfg, model.params, fresh, sx, sy, shots)
    options, chosen, argmax = adaptation.options, adaptation.chosen, adaptation.validation.best(adaptation.options)
    probs = {c.name: predict(learner, fit(learner, c, sx, sy), test_x[task.query]) for c in options}
    test_score = {name: task_scores(task, p)["balanced-accuracy"] for name, p in probs.items()}
    best = max(options, key=lambda c: test_score[c.name])
    record.picked[chosen.kind] += 1
    record.argmax_picked[argmax.kind] += 1
    record.gaps.append(test_score[best.name] - test_score[chosen.name])
    alternatives = {name: rule(options, adaptation.validation) for name, rule in ALTERNATIVE_RULES.items()}
    return {
        DEPLOYED: probs[chosen.name],
        **{name: probs[c.name] for name, c in alternatives.items()},
        CV_ARGMAX: probs[argmax.name],
        ORACLE: probs[best.name],
    }


def prefer_meta_over_scratch(options: list[Candidate], validation: Validation) -> Candidate:
    """The rule deployed before (2026-12-06): the meta-model's best candidate (inner loop or fine-tune) unless the best
    scratch candidate's per-fold balanced accuracy is higher by more than one standard error."""
    meta = validation.best(c for c in options if c.kind != "scratch")
    scratch = validation.best(c for c in options if c.kind == "scratch")
    return Challenge(meta, scratch, validation.margin(scratch, meta)).chosen


# other rules over the same cross-validation, scored beside the deployed one (no extra fits)
ANY_CHALLENGER: frozenset[CandidateKind] = frozenset({"inner-loop", "scratch"})
ALTERNATIVE_RULES: dict[str, Callable[[list[Candidate], Validation], Candidate]] = {
    "rule-meta-unless-scratch-wins": prefer_meta_over_scratch,  # deployed 2026-12-06
    "rule-fine-tune-unless-any-wins": lambda options, validation: challenge(options, validation, ANY_CHALLENGER).chosen,
    "rule-fine-tune-unless-any-wins-by-2se": lambda options, validation: (
        challenge(options, validation, ANY_CHALLENGER, standard_errors=2).chosen
    ),
}


def evaluate(
    models: list[TrainedModel],
    heldout: HeldoutHospitals,
    shots: list[int],
    args: argparse.Namespace,
    deployed_methods: set[str],
) -> tuple[dict[int, dict[str, list[tuple[str, dict[str, float]]]]], dict[int, dict[str, DeployedChoices]]]:
    """Per K, per variant: (hospital, scores) of every few-shot task, the same tasks for every variant; and per K and
    model of ``deployed_methods``, what the deployed procedure picked."""
    scores: dict[int, dict[str, list[tuple[str, dict[str, float]]]]] = {k: {} for k in shots}
    choices: dict[int, dict[str, DeployedChoices]] = {}
    cfg = heldout.cfg
    protocol = FewShotProtocol.for_run(cfg)
    local_learner = MetaLearner(build_model(cfg.model), cfg.maml)
    fresh = protocol.fresh_init(cfg.model, args.seed)
    learners = {m.name: MetaLearner(build_model(m.cfg.model), m.cfg.maml) for m in models}
    for folder in heldout.folders:
        try:
            data = heldout.data(folder)
            train, test = data.split("train"), data.split("test")
        except UserError as err:
            print(f"held-out {folder.name} skipped: {err}", flush=True)
            continue
        train_x, test_x = torch.from_numpy(train.images), torch.from_numpy(test.images)
        for k in shots:
            try:
                tasks = few_shot_tasks(train.labels, test.labels, cfg.model.n_way, k, args.eval_tasks, args.seed)
            except EpisodeError as err:
                print(f"held-out {folder.name}, {k}-shot skipped: {err}", flush=True)
                continue
            for task in tasks:
                variants = {LOCAL_ONLY: protocol.scratch_predictions(local_learner, fresh, task, train_x, test_x)}
                for model in models:
                    predictions = protocol.meta_predictions(
                        learners[model.name], model.params, task, train_x, test_x, sweep=ADAPT_STEPS
                    )
                    variants |= {
                        f"{model.name}/{VARIANT_NAMES.get(name, name.removeprefix('meta/'))}": probs
                        for name, probs in predictions.items()
                        if name != "meta"  # the headline inner loop is in the sweep
                    }
                    if model.method in deployed_methods:
                        record = choices.setdefault(k, {}).setdefault(model.name, DeployedChoices())
                        deployed = deployed_predictions(
                            learners[model.name], model, task, train_x, test_x, k, fresh, record
                        )
                        variants |= {f"{model.name}/{name}": probs for name, probs in deployed.items()}
                for variant, probs in variants.items():
                    scores[k].setdefault(variant, []).append((folder.name, task_scores(task, probs)))
    return scores, choices


def summarise(variant_scores: dict[str, list[tuple[str, dict[str, float]]]]) -> dict[str, dict[str, Any]]:
    reference = REFERENCE if REFERENCE in variant_scores else LOCAL_ONLY
    ref = variant_scores[reference]
    out: dict[str, dict[str, Any]] = {}
    for variant, rows in variant_scores.items():
        summary: dict[str, Any] = {
            m: float(np.mean([s[m] for _, s in rows if m in s])) for m in METRICS if any(m in s for _, s in rows)
        }
        summary["tasks"] = len(rows)
        for metric in ("balanced-accuracy", "auc"):
            pairs = [(h, s[metric] - r[metric]) for (h, s), (_, r) in zip(rows, ref, strict=True) if metric in s]
            if not pairs:
                continue
            gain = paired_gain(np.array([d for _, d in pairs]))
            by_hospital: dict[str, list[float]] = {}
            for h, d in pairs:
                by_hospital.setdefault(h, []).append(d)
            hospital_means = [float(np.mean(v)) for v in by_hospital.values()]
            summary[f"{metric} vs {reference}"] = {
                **gain,
                "hospitals_improved": int(sum(m > 0 for m in hospital_means)),
                "hospitals": len(hospital_means),
            }
        out[variant] = summary
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown tables of a result, one per K."""
    lines = []
    for k, variants in result["shots"].items():
        reference = REFERENCE if REFERENCE in variants else LOCAL_ONLY
        lines += [
            f"**{k}-shot** ({result['setting']}, scored on the {SCORED_ON[result['score_on']]}; paired differences "
            f"against {reference}, mean ± 95% CI over tasks; hospitals = those whose mean difference is > 0)",
            "",
            "| variant | bal. acc. | AUC | acc. | Δ bal. acc. | Δ AUC | hospitals improved (bal. acc.) |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant, s in variants.items():
            bal, auc = s.get(f"balanced-accuracy vs {reference}"), s.get(f"auc vs {reference}")
            scores = f"{s['balanced-accuracy']:.3f} | {s.get('auc', float('nan')):.3f} | {s['accuracy']:.3f}"
            improved = f"{bal['hospitals_improved']}/{bal['hospitals']}" if bal else "-"
            lines.append(f"| {variant} | {scores} | {_delta(bal)} | {_delta(auc)} | {improved} |")
        lines.append("")
        for model, record in result["deployed_choices"].get(k, {}).items():
            kinds, argmax = (
                ", ".join(f"{kind} {n}" for kind, n in sorted(record[key].items()))
                for key in ("picked", "cv_argmax_picked")
            )
            lines.append(
                f"{model}/{DEPLOYED} picked: {kinds} (of {record['tasks']} tasks; {CV_ARGMAX}: {argmax}); below the "
                f"best candidate on the test scans in {record['worse_than_best_candidate']}, by "
                f"{record['mean_gap_to_best_candidate']:.3f} on average  "
            )
        if any(variant.endswith(ORACLE) for variant in variants):
            lines.append(
                f"{ORACLE}: the candidate with the best balanced accuracy on the test scans, an upper bound "
                "no hospital can pick (its AUC and accuracy are not bounds)  "
            )
        lines.append("")
    return "\n".join(lines) + validation_table(result["runs"])


def validation_table(runs: dict[str, dict[str, Any]]) -> str:
    """The training hospitals' own few-shot metrics of each run that recorded them (the protocol's ``meta``)."""
    rows = [(name, run["training_hospitals"]) for name, run in runs.items() if "training_hospitals" in run]
    if not rows:
        return ""
    lines = [
        "",
        "**training hospitals' own test splits** (mean over hospitals, after the last round; choose settings here)",
        "",
        "| run | bal. acc. | AUC | acc. |",
        "|---|---|---|---|",
    ]
    for name, m in rows:
        values = (m.get(k, math.nan) for k in ("balanced-accuracy", "auc", "accuracy"))
        cells = " | ".join(f"{v:.3f}" if math.isfinite(v) else "-" for v in values)
        lines.append(f"| {name} | {cells} |")
    return "\n".join([*lines, ""])


def _delta(d: dict[str, float] | None) -> str:
    return f"{d['mean']:+.3f} ± {d['ci95']:.3f}" if d else "-"


def run(args: argparse.Namespace) -> dict[str, Any]:
    deployed_methods = deployed_method_names(args) if args.deployed else set()
    work_dir = (args.work_dir or Path(f"runs/bench-quality-{args.setting}")).expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    shots = [int(k) for k in args.shots.split(",")]
    federation = prepare_federation(args, work_dir)
    models, runs = train_models(args, work_dir, federation)
    started = time.perf_counter()
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only adds contention (6x slower under load)
    scores, choices = evaluate(models, heldout_hospitals(args, work_dir, federation), shots, args, deployed_methods)
    result = {
        "setting": args.setting,
        "hospitals": args.hospitals,
        "heldout": args.heldout,
        "score_on": args.score_on,
        "rounds": args.rounds,
        "clients_per_round": args.clients_per_round,
        "runs": runs,
        "evaluation_seconds": round(time.perf_counter() - started, 1),
        "shots": {str(k): summarise(v) for k, v in scores.items() if v},
        "deployed_choices": {str(k): {m: c.summary() for m, c in by_model.items()} for k, by_model in choices.items()},
    }
    name = "quality" if args.score_on == "heldout" else "quality-training"
    atomic_write_json(work_dir / f"{name}.json", result)
    (work_dir / f"{name}.md").write_text(table(result))
    return result
