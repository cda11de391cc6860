"""Hospitals that never train, evaluated at the server: the measure of whether the meta-model is worth having.

They are folders the server can read, ``FEDERATION/heldout/hospital-NNN`` (in a simulation, written before the
run starts from another seed stream than the training hospitals, so their scanners and label sets are new).
Each is evaluated with the one few-shot protocol (:func:`shared.learning.evaluation.few_shot_metrics`: K labelled
scans per class from its train split, queries = its whole test split), and at the end compared with a model
trained from scratch on exactly the same shots. The tasks follow the run's seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from shared.config import FedMetaConfig
from shared.data.federation import HELDOUT_FOLDER, federation_dir, hospital_name
from shared.data.hospital_folder import HospitalData, load_hospital, preprocess_for
from shared.errors import UserError
from shared.learning.evaluation import (
    FewShotTask,
    adapt_and_predict,
    classification_metrics,
    few_shot_metrics,
    hospital_tasks,
    train_from_scratch,
)
from shared.learning.maml import MetaLearner, Params
from shared.learning.models import build_model

log = logging.getLogger(__name__)
FINE_TUNE_STEPS = 100


class HeldoutHospitals:
    def __init__(self, cfg: FedMetaConfig) -> None:
        self.cfg = cfg
        self.root = federation_dir(cfg) / HELDOUT_FOLDER
        self.folders = [self.root / hospital_name(i) for i in range(cfg.data.heldout_hospitals)]
        self.learner = MetaLearner(build_model(cfg.model), cfg.maml)
        self._data: dict[Path, HospitalData] = {}

    def data(self, folder: Path) -> HospitalData:
        if folder not in self._data:
            if not folder.is_dir():
                raise UserError(f"held-out hospital folder {folder} does not exist; write it before the run starts")
            self._data[folder] = load_hospital(folder, preprocess_for(self.cfg))
        return self._data[folder]

    def __call__(self, meta_params: Params) -> dict[str, dict[str, float]]:
        """Few-shot metrics of the meta-model on each held-out hospital."""
        results = {}
        for folder in self.folders:
            try:
                results[folder.name] = few_shot_metrics(
                    self.learner, meta_params, self.data(folder), self.cfg, seed=self.cfg.seed
                )
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
                data = self.data(folder)
                tasks = hospital_tasks(data, self.cfg, self.cfg.seed)
            except UserError as err:
                log.warning("held-out %s skipped: %s", folder.name, err)
                continue
            out[folder.name] = self._compare_on(data, tasks, meta_params, scratch_init, fine_tune_steps)
        return out

    def _compare_on(
        self, data: HospitalData, tasks: list[FewShotTask], meta_params: Params, scratch_init: Params, steps: int
    ) -> dict[str, object]:
        train, test = data.split("train"), data.split("test")
        train_images, test_images = torch.from_numpy(train.images), torch.from_numpy(test.images)
        learner = self.learner
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
