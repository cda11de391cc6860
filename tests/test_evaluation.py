"""classification_metrics on small hand-computed examples; the one few-shot protocol wherever it is used."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from server.heldout import HeldoutHospitals
from shared.config import FedMetaConfig
from shared.learning.adaptation import choose_adaptation
from shared.learning.evaluation import FewShotProtocol, classification_metrics, hospital_tasks
from shared.learning.maml import MetaLearner, Params
from shared.learning.models import build_model
from shared.run_folder import DEPLOYED
from simulations.data.synthetic import write_synthetic_federation

# six scans of three classes; predicted (argmax) = [0, 1, 1, 2, 2, 2]
Y = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.2, 0.6, 0.2],
        [0.1, 0.3, 0.6],
        [0.1, 0.2, 0.7],
        [0.3, 0.3, 0.4],
    ]
)


def test_three_classes_get_macro_one_vs_rest_auc_sensitivity_and_specificity() -> None:
    metrics = classification_metrics(Y, PROBS)
    # recall per class 1/2, 1/2, 1; not-c scans not predicted c: 4/4, 3/4, 3/4
    # one-vs-rest AUC per class (ties count one half): 8/8, 6.5/8, 7/8
    assert metrics == pytest.approx(
        {
            "accuracy": 4 / 6,
            "balanced-accuracy": 2 / 3,
            "queries": 6,
            "auc": (1 + 6.5 / 8 + 7 / 8) / 3,
            "macro-sensitivity": 2 / 3,
            "macro-specificity": (1 + 0.75 + 0.75) / 3,
        }
    )


def test_a_class_absent_from_the_queries_is_left_out_of_the_macro_averages() -> None:
    present = Y != 1
    metrics = classification_metrics(Y[present], PROBS[present])
    # classes 0 and 2 only: recall 1/2 and 1; each ranks above the other class's scans and is never predicted there
    assert metrics == pytest.approx(
        {
            "accuracy": 3 / 4,
            "balanced-accuracy": 3 / 4,
            "queries": 4,
            "auc": 1.0,
            "macro-sensitivity": 3 / 4,
            "macro-specificity": 1.0,
        }
    )


def test_one_class_present_has_no_auc_sensitivity_or_specificity() -> None:
    assert set(classification_metrics(Y[:2], PROBS[:2])) == {"accuracy", "balanced-accuracy", "queries"}
    assert set(classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))) == {
        "accuracy",
        "balanced-accuracy",
        "queries",
    }


def test_two_classes_keep_auc_sensitivity_and_specificity_of_the_positive_class_1() -> None:
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.7, 0.3])
    metrics = classification_metrics(y, np.stack([1 - p1, p1], axis=1))
    # predicted [0, 1, 0, 1, 0]; AUC: 0.7 beats all three negatives, 0.3 beats one
    assert metrics == pytest.approx(
        {
            "accuracy": 3 / 5,
            "balanced-accuracy": (2 / 3 + 1 / 2) / 2,
            "queries": 5,
            "auc": 4 / 6,
            "sensitivity": 1 / 2,
            "specificity": 2 / 3,
        }
    )


def one_heldout_hospital(tmp_path: Path, tasks: int, k_shot: int) -> tuple[HeldoutHospitals, Params, dict]:
    """A synthetic held-out hospital, a tiny model at initialisation, and the server's comparison there."""
    cfg = FedMetaConfig().replace(
        model={"width": 8},
        episode={"eval_episodes": tasks, "eval_steps": 2, "k_shot": k_shot},
        data={"federation_dir": str(tmp_path), "heldout_hospitals": 1},
    )
    write_synthetic_federation(cfg, hospitals=0)
    heldout = HeldoutHospitals(cfg)
    meta_params = heldout.learner.init_meta_params()
    return heldout, meta_params, heldout.compare_with_scratch(meta_params)["hospital-000"]


def test_the_heldout_comparison_scores_the_meta_model_as_the_round_evaluation_does(tmp_path: Path) -> None:
    heldout, meta_params, comparison = one_heldout_hospital(tmp_path, tasks=3, k_shot=1)
    assert comparison["meta"] == pytest.approx(heldout(meta_params)["hospital-000"])  # one protocol
    assert comparison["tasks"] == 3 and {"meta gain", "meta+fine-tune gain"} <= set(comparison)
    assert DEPLOYED not in comparison  # one shot per class: nothing to cross-validate fedmeta adapt's choice on


def test_the_heldout_comparison_leads_with_what_fedmeta_adapt_deploys_on_the_same_shots(tmp_path: Path) -> None:
    heldout, meta_params, comparison = one_heldout_hospital(tmp_path, tasks=2, k_shot=2)
    assert {DEPLOYED, f"{DEPLOYED} gain"} <= set(comparison)

    cfg = heldout.cfg
    data = heldout.data(heldout.folders[0])
    train_images = torch.from_numpy(data.split("train").images)
    fresh = FewShotProtocol.fresh_init(cfg.model, cfg.seed)
    chosen = Counter(
        choose_adaptation(
            heldout.learner, cfg, meta_params, fresh, train_images[t.support], torch.from_numpy(t.support_y), 2
        ).chosen.name
        for t in hospital_tasks(data, cfg)
    )
    assert comparison[f"{DEPLOYED} picks"] == dict(chosen)


def test_a_fresh_initialisation_follows_its_seed_and_leaves_the_global_generator_alone() -> None:
    model = FedMetaConfig().model
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, again = FewShotProtocol.fresh_init(model, 7), FewShotProtocol.fresh_init(model, 7)
    other = FewShotProtocol.fresh_init(model, 8)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_the_protocols_adam_is_torchs_per_tensor_adam_on_every_parameter() -> None:
    cfg = FedMetaConfig().replace(model={"width": 4})
    learner = MetaLearner(build_model(cfg.model), cfg.maml)
    init = FewShotProtocol.fresh_init(cfg.model, 0)
    generator = torch.Generator().manual_seed(0)
    sx, sy = torch.randn(6, 1, 28, 28, generator=generator), torch.tensor([0, 0, 0, 1, 1, 1])
    params = {n: v.clone().requires_grad_() for n, v in init.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-2, foreach=False)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(functional_call(learner.model, params, (sx,)), sy).backward()
        optimizer.step()
    trained = FewShotProtocol.adam(learner, init, sx, sy, 5, 1e-2)
    for name, p in params.items():
        torch.testing.assert_close(trained[name], p.detach(), rtol=1e-6, atol=1e-7)
