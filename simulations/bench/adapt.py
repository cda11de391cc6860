"""adapt vs from scratch on a hospital held out of meta-training: BreastMNIST, meta-trained on Retina and Pneumonia.

The meta-model is trained here without Flower or DP (:func:`meta_train`: plain MAML over the training
hospitals' train splits), written as a run folder, then ``fedmeta adapt``'s :func:`adapt_hospital` is run
on the target hospital for each shot seed. The numbers are whatever they are: nothing is tuned on the target.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from client.adapt import adapt_hospital
from client.adapted_model import save_adapted_model
from shared.atomic import atomic_write, atomic_write_json
from shared.config import FedMetaConfig
from shared.data.hospital_folder import HospitalData, load_hospital, preprocess_for
from shared.errors import UserError
from shared.learning.episodes import EpisodeError, EpisodeSampler
from shared.learning.maml import EpisodeBatch, MetaLearner, Params
from shared.learning.models import build_model
from shared.run_folder import META_MODEL, MODEL_CARD_JSON, load_meta_model
from simulations.data.medmnist import import_medmnist

log = logging.getLogger(__name__)
MEDMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
TRAIN_TASKS = ("retinamnist.npz", "pneumoniamnist.npz")
TARGET_TASK = "breastmnist.npz"


def meta_train(hospitals: list[HospitalData], cfg: FedMetaConfig, steps: int, lr: float, seed: int) -> Params:
    """Plain MAML (no Flower, no DP) with Adam on the hospitals' train splits: each step averages the outer
    gradients of ``episode.meta-batch`` episodes, each from a hospital drawn uniformly among those that can
    form episodes."""
    episode = cfg.episode
    pools = []
    for i, hospital in enumerate(hospitals):
        train = hospital.split("train")
        try:
            sampler = EpisodeSampler(
                train.labels, cfg.model.n_way, episode.k_shot, episode.q_query, seed=seed * 1000 + i
            )
        except EpisodeError as err:
            log.warning("training hospital %d left out: %s", i, err)
            continue
        pools.append((sampler, torch.from_numpy(train.images)))
    if not pools:
        raise UserError("no training hospital can form an episode; lower episode.k-shot / episode.q-query")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    learner = MetaLearner(build_model(cfg.model), cfg.maml)
    params = {n: p.requires_grad_() for n, p in learner.init_meta_params().items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    for _ in range(steps):
        counts = rng.multinomial(episode.meta_batch, np.full(len(pools), 1 / len(pools)))
        parts = [sampler.sample_batch(images, int(n)) for (sampler, images), n in zip(pools, counts) if n]
        # one call for all episodes, so that they spread over the loop path's threads
        batch = EpisodeBatch(*(torch.cat([getattr(part, f.name) for part in parts]) for f in fields(EpisodeBatch)))
        for name, g in learner.per_episode_outer_grads(params, batch).mean().items():
            params[name].grad = g
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


def write_run_dir(run_dir: Path, params: Params, cfg: FedMetaConfig, note: str) -> Path:
    """A run folder as the server leaves it, as far as ``fedmeta adapt`` reads it: weights and config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    encoded = save({n: p.float().contiguous() for n, p in params.items()})
    atomic_write(run_dir / META_MODEL, lambda f: f.write(encoded))
    atomic_write_json(run_dir / MODEL_CARD_JSON, {"config": cfg.to_flat(), "trained_by": note})
    return run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--medmnist-dir", type=Path, default=MEDMNIST, help="folder with the MedMNIST .npz files")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep the hospitals and models here (default: temporary)"
    )
    parser.add_argument("--train-hospitals", type=int, default=4, help="hospitals made from Retina + Pneumonia")
    parser.add_argument("--max-per-hospital", type=int, default=600)
    parser.add_argument("--meta-steps", type=int, default=300)
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--shot-seeds", type=int, default=5, help="adapt runs, each with its own draw of the shots")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmeta-bench-adapt-"))
    try:
        return _bench(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    npz = {name: args.medmnist_dir / name for name in (*TRAIN_TASKS, TARGET_TASK)}
    if missing := [str(path) for path in npz.values() if not path.exists()]:
        raise UserError(f"{', '.join(missing)} not found; pass --medmnist-dir with the MedMNIST .npz files")
    cfg = FedMetaConfig(seed=args.seed).replace(model={"width": args.width})
    preprocess = preprocess_for(cfg)
    started = time.perf_counter()
    if not (work / "train").exists():
        import_medmnist(
            [npz[name] for name in TRAIN_TASKS],
            work / "train",
            args.train_hospitals,
            partition="site-shift",
            seed=args.seed,
            max_per_hospital=args.max_per_hospital,
        )
    if not (work / "target").exists():
        import_medmnist([npz[TARGET_TASK]], work / "target", 1, seed=args.seed)
    train_folders = sorted((work / "train").glob("hospital-*"))
    hospitals = [load_hospital(folder, preprocess) for folder in train_folders]
    target = load_hospital(work / "target" / "hospital-000", preprocess)
    ingest_s = time.perf_counter() - started

    started = time.perf_counter()
    params = meta_train(hospitals, cfg, args.meta_steps, args.meta_lr, args.seed)
    meta_train_s = time.perf_counter() - started
    note = f"simulations.bench.adapt.meta_train: {args.meta_steps} steps, Adam lr {args.meta_lr}, no Flower, no DP"
    meta = load_meta_model(write_run_dir(work / "run", params, cfg, note))

    runs = []
    for shot_seed in range(args.shot_seeds):
        started = time.perf_counter()
        result = adapt_hospital(meta, target, args.shots, shot_seed, preprocess)
        save_adapted_model(work / f"adapted-seed{shot_seed}", result.model, result.card)
        heldout = result.card["heldout"]
        runs.append(
            {
                "seed": shot_seed,
                "chosen": result.card["validation"]["chosen"],
                "seconds": round(time.perf_counter() - started, 1),
                **{
                    f"{model} {metric}": heldout[model][metric]
                    for model in ("adapted", "scratch", "adapted_minus_scratch")
                    for metric in ("balanced-accuracy", "auc")
                },
            }
        )
    gains = np.array([r["adapted_minus_scratch balanced-accuracy"]["value"] for r in runs])
    return {
        "target": f"{TARGET_TASK}, one hospital, never in meta-training",
        "target images by label": target.report.images_by_label,
        "target test scans": int((target.splits == "test").sum()),
        "train hospitals": {f.name: h.report.images_by_label for f, h in zip(train_folders, hospitals, strict=True)},
        "config": {k: v for k, v in cfg.to_flat().items() if k.split(".")[0] in ("model", "maml", "episode")},
        "meta steps": args.meta_steps,
        "meta lr": args.meta_lr,
        "shots per class": args.shots,
        "runs": runs,
        "mean balanced-accuracy gain": float(gains.mean()),
        "seeds with a positive gain": int((gains > 0).sum()),
        "ingest s": round(ingest_s, 1),
        "meta-train s": round(meta_train_s, 1),
    }
