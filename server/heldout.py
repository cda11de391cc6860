"""Hospitals that never train, evaluated at the server: the measure of whether the meta-model is worth having.

They are folders the server can read, ``FEDERATION/heldout/hospital-NNN`` (in a simulation, written before the
run starts from another seed stream than the training hospitals, so their scanners and label sets are new).
Each is evaluated with the one few-shot protocol (:class:`shared.learning.evaluation.FewShotProtocol`: K labelled
scans per class from its train split, queries = its whole test split) during the run, and at the end compared
with a model trained from scratch on exactly the same shots, led by what ``fedmeta adapt`` would deploy there
(:mod:`shared.learning.adaptation`: its candidates cross-validated on the task's shots alone). The tasks follow the
run's seed.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from shared.config import FedMetaConfig
from shared.data.federation import HELDOUT_FOLDER, federation_dir, hospital_name
from shared.data.hospital_folder import HospitalData, load_hospital, preprocess_for
from shared.errors import UserError
from shared.learning.adaptation import choose_adaptation
from shared.learning.evaluation import (
    FewShotProtocol,
    FewShotTask,
    classification_metrics,
    few_shot_metrics,
    hospital_tasks,
    paired_gain,
)
from shared.learning.maml import MetaLearner, Params
from shared.learning.models import build_model
from shared.run_folder import DEPLOYED

log = logging.getLogger(__name__)

# the protocol's variant that is a candidate's recipe on the same shots (same start, steps and rate)
SAME_RECIPE = {"fine-tune": "meta+fine-tune", "scratch": "scratch"}


class HeldoutHospitals:
    def __init__(self, cfg: FedMetaConfig, folders: list[Path] | None = None) -> None:
        """``folders``: other hospitals to evaluate the same way (``bench quality --score-on training``)."""
        self.cfg = cfg
        root = federation_dir(cfg) / HELDOUT_FOLDER
        self.folders = folders or [root / hospital_name(i) for i in range(cfg.data.heldout_hospitals)]
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
                results[folder.name] = few_shot_metrics(self.learner, meta_params, self.data(folder), self.cfg)
            except UserError as err:
                log.warning("held-out %s skipped: %s", folder.name, err)
        return results

    def compare_with_scratch(self, meta_params: Params) -> dict[str, dict]:
        """Per held-out hospital, on the same few-shot tasks: ``deployed`` (``fedmeta adapt``'s choice, with the
        candidates it picked and how often), the variants of :class:`~shared.learning.evaluation.FewShotProtocol`
        (``meta``, ``meta+fine-tune``, ``scratch``), and each meta variant's per-task paired gain over scratch.
        With one shot per class there is nothing to cross-validate on, and ``deployed`` is left out."""
        protocol = FewShotProtocol.for_run(self.cfg)
        fresh = protocol.fresh_init(self.cfg.model, self.cfg.seed)
        out: dict[str, dict] = {}
        for i, folder in enumerate(self.folders, 1):
            print(f"fedmeta: held-out {folder.name} ({i}/{len(self.folders)}): meta-model vs scratch", flush=True)
            try:
                data = self.data(folder)
                tasks = hospital_tasks(data, self.cfg)
            except UserError as err:
                log.warning("held-out %s skipped: %s", folder.name, err)
                continue
            out[folder.name] = self._compare_on(protocol, data, tasks, meta_params, fresh)
        return out

    def _compare_on(
        self,
        protocol: FewShotProtocol,
        data: HospitalData,
        tasks: list[FewShotTask],
        meta_params: Params,
        fresh: Params,
    ) -> dict[str, object]:
        train_images = torch.from_numpy(data.split("train").images)
        test_images = torch.from_numpy(data.split("test").images)
        learner, shots, probs, picks = self.learner, self.cfg.episode.k_shot, {}, Counter[str]()
        for task in tasks:
            variants = protocol.meta_predictions(learner, meta_params, task, train_images, test_images)
            variants["scratch"] = protocol.scratch_predictions(learner, fresh, task, train_images, test_images)
            if shots >= 2:
                sx, sy = train_images[task.support], torch.from_numpy(task.support_y)
                chosen = choose_adaptation(learner, self.cfg, meta_params, fresh, sx, sy, shots).chosen
                picks[chosen.name] += 1
                variants[DEPLOYED] = variants[SAME_RECIPE[chosen.kind]]  # the rule deploys one of these, fitted above
            for name, p in variants.items():
                probs.setdefault(name, []).append(p)
        per_task = {
            name: np.array([classification_metrics(t.query_y, p)["balanced-accuracy"] for t, p in zip(tasks, ps)])
            for name, ps in probs.items()
        }
        y = np.concatenate([t.query_y for t in tasks])
        result: dict[str, object] = {name: classification_metrics(y, np.concatenate(ps)) for name, ps in probs.items()}
        for name in (DEPLOYED, "meta", "meta+fine-tune"):
            if name in per_task:
                result[f"{name} gain"] = paired_gain(per_task[name] - per_task["scratch"])
        if picks:
            result[f"{DEPLOYED} picks"] = dict(picks.most_common())
        result["tasks"] = len(tasks)
        return result
