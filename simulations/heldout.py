"""Hospitals that never train: the measure of whether the meta-model is worth having.

They live in ``FEDERATION/heldout/hospital-NNN``; in a synthetic federation they are written on
first use from another seed stream than the training hospitals, so their scanners and label sets
are new. Each is evaluated on few-shot tasks (K labelled scans per class from its train split,
queries = its whole test split), and at the end compared with a model trained from scratch on
exactly the same shots.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from client.hospital import Hospital
from shared.config import FedMetaConfig
from shared.errors import UserError
from shared.evaluation import adapt_and_predict, classification_metrics, few_shot_tasks, train_from_scratch
from shared.federation import federation_dir
from shared.maml import MetaLearner, Params
from shared.models import build_model
from shared.synthetic import hospital_name, write_synthetic_hospital

log = logging.getLogger(__name__)
HELDOUT_SEED_OFFSET = 7919  # held-out sites come from their own seed stream
SCRATCH_STEPS = 100


class HeldoutHospitals:
    def __init__(self, cfg: FedMetaConfig) -> None:
        self.cfg = cfg
        self.root = federation_dir(cfg) / "heldout"
        if cfg.data.synthetic:
            self.folders = [self.root / hospital_name(i) for i in range(cfg.data.heldout_hospitals)]
        else:
            self.folders = sorted(self.root.glob("hospital-*"))[: cfg.data.heldout_hospitals]
        self._hospitals: dict[Path, Hospital] = {}

    def hospital(self, folder: Path) -> Hospital:
        if folder not in self._hospitals:
            if not folder.exists() and self.cfg.data.synthetic:
                write_synthetic_hospital(
                    self.root, int(folder.name.split("-")[1]), seed=self.cfg.seed + HELDOUT_SEED_OFFSET
                )
            self._hospitals[folder] = Hospital(folder, self.cfg)
        return self._hospitals[folder]

    def __call__(self, meta_params: Params) -> dict[str, dict[str, float]]:
        """Few-shot metrics of the meta-model on each held-out hospital."""
        results = {}
        for folder in self.folders:
            try:
                results[folder.name] = self.hospital(folder).evaluate(meta_params)
            except UserError as err:
                log.warning("held-out %s skipped: %s", folder.name, err)
        return results

    def compare_with_scratch(self, meta_params: Params, scratch_steps: int = SCRATCH_STEPS) -> dict[str, dict]:
        """Meta-model after ``eval-steps`` inner steps vs a fresh model trained ``scratch_steps`` Adam
        steps on the same shots, per held-out hospital, with the per-task paired difference."""
        torch.manual_seed(self.cfg.seed + 1)
        scratch_init = MetaLearner(build_model(self.cfg.model), self.cfg.maml).init_meta_params()
        out: dict[str, dict] = {}
        for folder in self.folders:
            try:
                hospital = self.hospital(folder)
                train, test = hospital.data.split("train"), hospital.data.split("test")
                tasks = few_shot_tasks(
                    train.labels,
                    test.labels,
                    self.cfg.model.n_way,
                    self.cfg.episode.k_shot,
                    self.cfg.episode.eval_episodes,
                    seed=0,
                )
            except UserError as err:
                log.warning("held-out %s skipped: %s", folder.name, err)
                continue
            train_images, test_images = torch.from_numpy(train.images), torch.from_numpy(test.images)
            learner = hospital.learner
            per_method: dict[str, list[dict[str, float]]] = {"meta": [], "scratch": []}
            probs: dict[str, list[np.ndarray]] = {"meta": [], "scratch": []}
            truth = []
            for task in tasks:
                meta = adapt_and_predict(
                    learner, meta_params, task, train_images, test_images, self.cfg.episode.eval_steps
                )
                scratch_params = train_from_scratch(learner, scratch_init, task, train_images, scratch_steps)
                scratch = adapt_and_predict(learner, scratch_params, task, train_images, test_images, steps=0)
                for name, p in (("meta", meta), ("scratch", scratch)):
                    per_method[name].append(classification_metrics(task.query_y, p))
                    probs[name].append(p)
                truth.append(task.query_y)
            y = np.concatenate(truth)
            paired = np.array(
                [
                    m["balanced-accuracy"] - s["balanced-accuracy"]
                    for m, s in zip(per_method["meta"], per_method["scratch"])
                ]
            )
            out[folder.name] = {
                "meta": classification_metrics(y, np.concatenate(probs["meta"])),
                "scratch": classification_metrics(y, np.concatenate(probs["scratch"])),
                "balanced-accuracy-gain": float(paired.mean()),
                "gain-ci95": float(1.96 * paired.std(ddof=1) / np.sqrt(len(paired)))
                if len(paired) > 1
                else float("nan"),
                "tasks": len(tasks),
            }
        return out
