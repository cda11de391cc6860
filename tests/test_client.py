"""The hospital client: privacy unit and sensitivity, durable ledger, refusals, message contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

import client.privacy
from client.hospital import Hospital, episode_groups, sampled_group_episodes
from client.ledger import BudgetExhausted
from client.privacy import NoiseCalibration, PrivateRelease
from shared.config import FedMetaConfig
from shared.episodes import MAML_TASKS, TaskDesign, stack_episodes
from shared.synthetic import write_synthetic_hospital
from shared.wire import CONFIG_KEY, PARAMS_KEY, REJECTED_MESSAGE, TRAIN_METRICS
from tests.loopback import client_app  # also sets Flower's task identity for Message()


def tiny_config(**sections: dict) -> FedMetaConfig:
    cfg = FedMetaConfig().replace(
        model={"width": 8},
        maml={"inner_steps": 1},
        episode={"k_shot": 2, "q_query": 2, "meta_batch": 2, "eval_episodes": 2, "eval_steps": 1},
        privacy={"episode_groups": 8, "groups_per_step": 4, "noise_multiplier": 1.0},
        server={"rounds": 3},
    )
    return cfg.replace(**sections)


@pytest.fixture(scope="module")
def hospital_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_hospital(tmp_path_factory.mktemp("federation"), 0, seed=0, n_images=120)


def clipped_sum(
    hospital: Hospital, keep: np.ndarray, units: list[str], c: float, step_seed: int, design: TaskDesign
) -> torch.Tensor:
    """Summed clipped group gradients, noise off, of the pool restricted to ``keep``."""
    train = hospital.data.split("train")
    privacy = hospital.cfg.privacy
    labels, images = train.labels[keep], torch.from_numpy(train.images[keep])
    groups = episode_groups([units[i] for i in keep], "ab" * 32, privacy.episode_groups)
    episodes = sampled_group_episodes(groups, labels, privacy, 2, 2, 2, step_seed, design)
    params = hospital.learner.init_meta_params()
    if not episodes:  # no group could form an episode: the sum is empty
        return torch.zeros(sum(p.numel() for p in params.values()))
    outer = hospital.learner.per_episode_outer_grads(params, stack_episodes(images, episodes))
    summed = PrivateRelease(params, NoiseCalibration(1.0, c), expected_episodes=4).clipped_sum(outer)
    return torch.cat([g.flatten() for g in summed.values()])


@pytest.mark.parametrize(
    ("unit", "design"),
    [
        ("record", MAML_TASKS),
        ("patient", MAML_TASKS),
        ("patient", TaskDesign(tasks="one-vs-rest", permute_labels=False, augment=True)),
    ],
)
def test_removing_one_record_or_patient_moves_the_clipped_sum_by_at_most_the_stated_sensitivity(
    hospital_dir: Path, unit: str, design: TaskDesign
) -> None:
    c = 0.05  # small enough that every group gradient is clipped: the bound is tight
    cfg = tiny_config(privacy={"episode_groups": 8, "groups_per_step": 8, "max_grad_norm": c})
    torch.manual_seed(0)
    hospital = Hospital(hospital_dir, cfg)
    train = hospital.data.split("train")
    units = (
        list(train.record_ids) if unit == "record" else [p or r for p, r in zip(train.patient_keys, train.record_ids)]
    )
    everyone = np.arange(len(units))
    full = clipped_sum(hospital, everyone, units, c, step_seed=11, design=design)
    stated = NoiseCalibration(1.0, c).sensitivity
    assert stated == pytest.approx(2 * c)
    changes = []
    for removed in sorted(set(units))[:12]:
        neighbour = clipped_sum(hospital, everyone[[u != removed for u in units]], units, c, 11, design)
        changes.append(float((full - neighbour).norm()))
    assert max(changes) <= stated * (1 + 1e-4)
    assert max(changes) > 0.5 * c  # the removals did change gradients: the check is not vacuous


def test_epsilon_matches_an_independent_accountant_and_survives_a_restart(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data={"state_dir": str(tmp_path)})
    reported = []
    for _ in range(2):
        reported.append(Hospital(hospital_dir, cfg).train(Hospital(hospital_dir, cfg).learner.init_meta_params()))
    restarted = Hospital(hospital_dir, cfg)  # a new process: only the ledger on disk carries over
    reported.append(restarted.train(restarted.learner.init_meta_params()))
    sigma, q = cfg.privacy.noise_multiplier, cfg.privacy.sample_rate
    for steps, result in enumerate(reported, start=1):
        independent = RDPAccountant()
        for _ in range(steps):
            independent.step(noise_multiplier=sigma, sample_rate=q)
        assert result.metrics["epsilon"] == pytest.approx(independent.get_epsilon(cfg.privacy.delta), rel=1e-9)
    assert reported[0].metrics["epsilon"] < reported[1].metrics["epsilon"] < reported[2].metrics["epsilon"]


def test_ledger_is_on_disk_before_the_gradient_is_released(
    hospital_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(data={"state_dir": str(tmp_path)})
    hospital = Hospital(hospital_dir, cfg)
    seen = []
    original = client.privacy.PrivateRelease.release

    def checking_release(self: PrivateRelease, outer: object) -> dict:
        seen.append(hospital.open_ledger().history)
        return original(self, outer)

    monkeypatch.setattr(client.privacy.PrivateRelease, "release", checking_release)
    hospital.train(hospital.learner.init_meta_params())
    hospital.train(hospital.learner.init_meta_params())
    assert [h[0][2] for h in seen] == [1, 2]


def test_hospital_refuses_when_the_next_release_would_pass_its_budget(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data={"state_dir": str(tmp_path)}, privacy={"noise_multiplier": 1.0, "target_epsilon": 1.5})
    hospital = Hospital(hospital_dir, cfg)
    outcomes = [hospital.train(hospital.learner.init_meta_params()) for _ in range(6)]
    refusals = [o for o in outcomes if isinstance(o, BudgetExhausted)]
    assert refusals, "a 1.5 budget at noise 1.0 and q=0.5 lasts only a few steps"
    first = outcomes.index(refusals[0])
    assert all(isinstance(o, BudgetExhausted) for o in outcomes[first:])
    assert all(o.metrics["epsilon"] <= 1.5 for o in outcomes[:first])
    assert "privacy budget exhausted" in str(refusals[0])


def test_private_reply_is_a_different_gradient_each_time_but_same_shapes(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data={"state_dir": str(tmp_path)})
    hospital = Hospital(hospital_dir, cfg)
    params = hospital.learner.init_meta_params()
    a, b = hospital.train(params), hospital.train(params)
    assert set(a.outer_grad) == set(params)
    assert all(a.outer_grad[n].shape == p.shape and a.outer_grad[n].dtype == torch.float32 for n, p in params.items())
    assert not torch.equal(a.outer_grad["head.weight"], b.outer_grad["head.weight"])
    assert set(a.metrics) <= TRAIN_METRICS and a.metrics["dp"] == 1.0


def train_message(params: dict[str, np.ndarray]) -> Message:
    content = RecordDict(
        {
            PARAMS_KEY: ArrayRecord({n: Array(v) for n, v in params.items()}),
            CONFIG_KEY: ConfigRecord({"server-round": 1}),
        }
    )
    return Message(content, dst_node_id=7, message_type="train")


def client_context(hospital_dir: Path, cfg: FedMetaConfig) -> Context:
    return Context(
        run_id=1, node_id=7, node_config={"data-path": str(hospital_dir)}, state=RecordDict(), run_config=cfg.to_flat()
    )


@pytest.mark.parametrize(
    ("corruption", "expected"),
    [
        ("missing", "missing"),
        ("shape", "has shape"),
        ("nan", "non-finite"),
        ("dtype", "expected float32"),
    ],
)
def test_malformed_server_message_gets_a_clear_rejection(
    hospital_dir: Path, tmp_path: Path, corruption: str, expected: str
) -> None:
    cfg = tiny_config(data={"state_dir": str(tmp_path)})
    params = {n: p.numpy() for n, p in Hospital(hospital_dir, cfg).learner.init_meta_params().items()}
    if corruption == "missing":
        params.pop("head.bias")
    elif corruption == "shape":
        params["head.weight"] = params["head.weight"][:, :-1]
    elif corruption == "nan":
        params["head.weight"] = params["head.weight"].copy()
        params["head.weight"][0, 0] = np.nan
    else:
        params["head.bias"] = params["head.bias"].astype(np.float64)
    reply = client_app(train_message(params), client_context(hospital_dir, cfg))
    assert reply.has_error()
    assert reply.error.code == REJECTED_MESSAGE
    assert expected in reply.error.reason and "\n" not in reply.error.reason


def test_train_reply_carries_only_the_gradient_and_fixed_scalars_and_no_phi(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data={"state_dir": str(tmp_path)})
    params = {n: p.numpy() for n, p in Hospital(hospital_dir, cfg).learner.init_meta_params().items()}
    reply = client_app(train_message(params), client_context(hospital_dir, cfg))
    assert not reply.has_error()
    assert set(reply.content.array_records) == {"outer-grad"}
    assert set(reply.content.metric_records) == {"metrics"}
    assert not reply.content.config_records
    arrays = reply.content.array_records["outer-grad"]
    assert {n: tuple(a.shape) for n, a in arrays.items()} == {n: p.shape for n, p in params.items()}
    assert set(reply.content.metric_records["metrics"]) <= TRAIN_METRICS
    phi = set()
    for path in hospital_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        phi |= {str(ds.PatientName), ds.PatientID, ds.InstitutionName, ds.StudyDate, ds.SOPInstanceUID, path.name}
    payload = b"".join(a.data for a in arrays.values()) + repr(dict(reply.content.metric_records["metrics"])).encode()
    payload += "".join(arrays.keys()).encode()
    assert not [s for s in phi if s and s.encode() in payload]
