"""Hospitals that never train: the measure of whether the meta-model is worth having.

They live in ``FEDERATION/heldout/hospital-NNN``; in a synthetic federation they are written on
first use from another seed stream than the training hospitals, so their scanners and label sets
are new. Each is evaluated on few-shot tasks (K labelled scans per class from its train split,
queries = its whole test split), and at the end compared with a model trained from scratch on
exactly the same shots. The hospitals (their site secrets included) and the tasks follow the run's seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from client.hospital import Hospital
from shared.config import FedMetaConfig
from shared.errors import UserError
from shared.evaluation import (
    FewShotTask,
    adapt_and_predict,
    classification_metrics,
    train_from_scratch,
)
from shared.federation import federation_dir
from shared.maml import MetaLearner, Params
from shared.models import build_model
from shared.synthetic import hospital_name, write_synthetic_hospital

log = logging.getLogger(__name__)
HELDOUT_SEED_OFFSET = 7919  # held-out sites come from their own seed stream
FINE_TUNE_STEPS = 100


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
                results[folder.name] = self.hospital(folder).evaluate(meta_params, seed=self.cfg.seed)
            except UserError as err:
                log.warning("held-out %s skipped: %s", folder.name, err)
        return results

    def compare_with_scratch(self, meta_params: Params, fine_tune_steps: int = FINE_TUNE_STEPS) -> dict[str, dict]:
        """Per held-out hospital, on the same few-shot tasks: the meta-model after the inner loop
        (``eval-steps``), the meta-init fine-tuned like a fresh model, and a fresh model trained
        ``fine_tune_steps`` Adam steps on the same shots; gains are per-task paired differences."""
        torch.manual_seed(self.cfg.seed + 1)
        scratch_init = MetaLearner(build_model(self.cfg.model), self.cfg.maml).init_meta_params()
        out: dict[str, dict] = {}
        for folder in self.folders:
            try:
                hospital = self.hospital(folder)
                tasks = hospital.few_shot_tasks(self.cfg.seed)
            except UserError as err:
                log.warning("held-out %s skipped: %s", folder.name, err)
                continue
            out[folder.name] = self._compare_on(hospital, tasks, meta_params, scratch_init, fine_tune_steps)
        return out

    def _compare_on(
        self, hospital: Hospital, tasks: list[FewShotTask], meta_params: Params, scratch_init: Params, steps: int
    ) -> dict[str, object]:
        train, test = hospital.data.split("train"), hospital.data.split("test")
        train_images, test_images = torch.from_numpy(train.images), torch.from_numpy(test.images)
        learner = hospital.learner
        meta_model = {n: p for n, p in meta_params.items() if n in scratch_init}
        probs: dict[str, list[np.ndarray]] = {"meta": [], "meta+fine-tune": [], "scratch": []}
        for task in tasks:
            probs["meta"].append(
                adapt_and_predict(learner, meta_params, task, train_images, test_images, self.cfg.episode.eval_steps)
            )
            for name, init in (("meta+fine-tune", meta_model), ("scratch", scratch_init)):
                tuned = train_from_scratch(learner, init, task, train_images, steps)
                probs[name].append(adapt_and_predict(learner, tuned, task, train_images, test_images, steps=0))
        per_task = {
            name: np.array([classification_metrics(t.query_y, p)["balanced-accuracy"] for t, p in zip(tasks, ps)])
            for name, ps in probs.items()
        }
        y = np.concatenate([t.query_y for t in tasks])
        result: dict[str, object] = {name: classification_metrics(y, np.concatenate(ps)) for name, ps in probs.items()}
        for name in ("meta", "meta+fine-tune"):
            result[f"{name} gain"] = paired_gain(per_task[name] - per_task["scratch"])
        result["tasks"] = len(tasks)
        return result


def paired_gain(differences: np.ndarray) -> dict[str, float]:
    """Mean per-task balanced-accuracy difference and the half-width of its normal 95% interval."""
    half = 1.96 * differences.std(ddof=1) / np.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    return {"mean": float(differences.mean()), "ci95": float(half)}
