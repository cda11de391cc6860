"""Few-shot quality on hospitals that never trained: every method in the same harness, DP on and off.

Settings (``--setting``):

- ``synthetic``: site shift on the synthetic federation (each hospital its own scanners, label set
  and prevalence); held-out hospitals come from another seed stream;
- ``pneumonia`` / ``retina``: that MedMNIST set split over ``--hospitals + --heldout`` hospitals
  with per-site intensity, contrast, noise, blur and resolution shift; the last ``--heldout`` never train;
- ``breast-new-task``: retina and pneumonia hospitals train, breast hospitals are held out: a
  diagnostic task no training hospital has.

Every run is ``fedmeta simulate --engine in-process`` (the real ServerApp and ClientApp, minus the
network). Then, on the same few-shot tasks of each held-out hospital (K labelled train scans per
class, all its test scans as queries), each trained model is scored after k = 0, 1, 5, 10 inner-loop
steps and after a longer fine-tune (Adam on every parameter), next to local-only training (a fresh
model on the same shots). Differences are paired per task against the reference (class-balanced
FedAvg + fine-tune when it ran), with a normal 95% interval, and per hospital: how many held-out
hospitals improve on average. The run folders are kept under ``--work-dir``: a rerun reuses finished runs.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from server.heldout import HeldoutHospitals
from shared.atomic import atomic_write_json
from shared.config import FedMetaConfig, parse_assignments
from shared.data.federation import hospital_name
from shared.errors import UserError
from shared.learning.episodes import EpisodeError
from shared.learning.evaluation import (
    FewShotTask,
    adapt_and_predict,
    classification_metrics,
    few_shot_tasks,
    train_from_scratch,
)
from shared.learning.maml import MetaLearner, Params
from shared.learning.models import build_model
from simulations.data.medmnist import import_medmnist
from simulations.data.synthetic import write_synthetic_federation
from simulations.simulate import METHODS, run_simulation, simulation_config

SETTINGS = ("synthetic", "pneumonia", "retina", "breast-new-task")
ADAPT_STEPS = (0, 1, 5, 10)
LOCAL_ONLY = "local-only"
REFERENCE = "fedavg/fine-tune"
METRICS = ("balanced-accuracy", "auc", "accuracy")
DEFAULT_METHODS = "fedavg,fedmeta,fedmeta-first-order,anil,meta-sgd,pretrain-then-meta,centralised"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setting", choices=SETTINGS, default="synthetic")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/medmnist"), help="MedMNIST .npz folder")
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
    parser.add_argument("--fine-tune-steps", type=int, default=100, help="Adam steps for fine-tune and local-only")
    parser.add_argument("--fine-tune-lr", type=float, default=1e-3, help="Adam learning rate from a trained model")
    parser.add_argument("--local-lr", type=float, default=1e-2, help="Adam learning rate from scratch (local-only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: runs/bench-quality-SETTING")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run settings for every run")


@dataclass(frozen=True)
class TrainedModel:
    name: str  # method, with @epsN when private
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
    if done.exists():
        return federation
    shutil.rmtree(federation, ignore_errors=True)
    npz = {name: args.data_root / f"{name}mnist.npz" for name in ("pneumonia", "retina", "breast")}
    missing = [str(p) for p in npz.values() if not p.exists()]
    if missing:
        raise UserError(f"{missing[0]} not found; pass --data-root, the folder with the MedMNIST .npz files")
    staging = work_dir / "federation-staging"
    shutil.rmtree(staging, ignore_errors=True)
    if args.setting == "breast-new-task":
        import_medmnist(
            [npz["retina"], npz["pneumonia"]], staging, args.hospitals, "iid", args.seed, max_per_hospital=400
        )
        import_medmnist([npz["breast"]], staging / "heldout", args.heldout, "iid", args.seed + 1)
    else:
        total = args.hospitals + args.heldout
        import_medmnist([npz[args.setting]], staging / "all", total, "site-shift", args.seed, max_per_hospital=400)
        for h in range(total):
            name = hospital_name(h) if h < args.hospitals else f"heldout/{hospital_name(h - args.hospitals)}"
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / "all" / hospital_name(h)).rename(staging / name)
        (staging / "all").rmdir()
    staging.rename(federation)
    done.touch()
    return federation


def train_models(args: argparse.Namespace, work_dir: Path, federation: Path | None) -> tuple[list[TrainedModel], dict]:
    models, runs = [], {}
    for method in [m.strip() for m in args.methods.split(",")]:
        if method not in METHODS:
            raise UserError(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
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
            runs[name] = {
                "seconds": round(time.perf_counter() - started, 1),  # 0 when an earlier run is reused
                "rounds": result["rounds_completed"],
                "epsilon_max": result["epsilon_max"],
                "peak_rss_mb": result["peak_rss_mb"],
            }
            models.append(TrainedModel(name, cfg, load_file(out / "meta-model.safetensors")))
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
    return HeldoutHospitals(cfg)


def task_scores(task: FewShotTask, probs: np.ndarray) -> dict[str, float]:
    metrics = classification_metrics(task.query_y, probs)
    return {k: metrics[k] for k in METRICS if k in metrics}


def evaluate(
    models: list[TrainedModel], heldout: HeldoutHospitals, shots: list[int], args: argparse.Namespace
) -> dict[int, dict[str, list[tuple[str, dict[str, float]]]]]:
    """Per K, per variant: (hospital, scores) of every few-shot task, the same tasks for every variant."""
    scores: dict[int, dict[str, list[tuple[str, dict[str, float]]]]] = {k: {} for k in shots}
    cfg = heldout.cfg
    torch.manual_seed(args.seed + 1)
    local_learner = MetaLearner(build_model(cfg.model), cfg.maml)
    fresh_init = local_learner.init_meta_params()
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

                def record(
                    variant: str, probs: np.ndarray, task: FewShotTask = task, k: int = k, hospital: str = folder.name
                ) -> None:
                    scores[k].setdefault(variant, []).append((hospital, task_scores(task, probs)))

                local = train_from_scratch(
                    local_learner, fresh_init, task, train_x, args.fine_tune_steps, lr=args.local_lr
                )
                record(LOCAL_ONLY, adapt_and_predict(local_learner, local, task, train_x, test_x, steps=0))
                for model in models:
                    learner = learners[model.name]
                    for steps, probs in inner_loop_predictions(learner, model.params, task, train_x, test_x).items():
                        record(f"{model.name}/k={steps}", probs)
                    weights = {n: p for n, p in model.params.items() if n in fresh_init}
                    tuned = train_from_scratch(
                        learner, weights, task, train_x, args.fine_tune_steps, lr=args.fine_tune_lr
                    )
                    record(f"{model.name}/fine-tune", adapt_and_predict(learner, tuned, task, train_x, test_x, steps=0))
    return scores


def inner_loop_predictions(
    learner: MetaLearner, params: Params, task: FewShotTask, train_x: torch.Tensor, test_x: torch.Tensor
) -> dict[int, np.ndarray]:
    """Query probabilities after each of ``ADAPT_STEPS`` inner-loop steps, from one run of the loop."""
    support_x, support_y = train_x[task.support], torch.from_numpy(task.support_y)
    current, done, out = dict(params), 0, {}
    for steps in ADAPT_STEPS:
        if steps > done:
            with torch.enable_grad():
                adapted = learner.adapted_params(
                    current, support_x, support_y, learner.detached_inner_grads, steps - done
                )
            current, done = {**current, **adapted}, steps
        with torch.no_grad():
            out[steps] = learner.logits(current, test_x[task.query]).softmax(-1).numpy()
    return out


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
            diffs = np.array([d for _, d in pairs])
            by_hospital: dict[str, list[float]] = {}
            for h, d in pairs:
                by_hospital.setdefault(h, []).append(d)
            hospital_means = [float(np.mean(v)) for v in by_hospital.values()]
            summary[f"{metric} vs {reference}"] = {
                "mean": float(diffs.mean()),
                "ci95": float(1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan"),
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
            f"**{k}-shot** ({result['setting']}; paired differences against {reference}, mean ± 95% CI over tasks; "
            "hospitals = held-out hospitals whose mean difference is > 0)",
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
    return "\n".join(lines)


def _delta(d: dict[str, float] | None) -> str:
    return f"{d['mean']:+.3f} ± {d['ci95']:.3f}" if d else "-"


def run(args: argparse.Namespace) -> dict[str, Any]:
    work_dir = (args.work_dir or Path(f"runs/bench-quality-{args.setting}")).expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    shots = [int(k) for k in args.shots.split(",")]
    federation = prepare_federation(args, work_dir)
    models, runs = train_models(args, work_dir, federation)
    started = time.perf_counter()
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only adds contention (6x slower under load)
    scores = evaluate(models, heldout_hospitals(args, work_dir, federation), shots, args)
    result = {
        "setting": args.setting,
        "hospitals": args.hospitals,
        "heldout": args.heldout,
        "rounds": args.rounds,
        "clients_per_round": args.clients_per_round,
        "runs": runs,
        "evaluation_seconds": round(time.perf_counter() - started, 1),
        "shots": {str(k): summarise(v) for k, v in scores.items() if v},
    }
    atomic_write_json(work_dir / "quality.json", result)
    (work_dir / "quality.md").write_text(table(result))
    return result
