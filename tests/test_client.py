"""The hospital client: privacy unit and sensitivity, its own policy, durable ledger, refusals, message contract."""

from __future__ import annotations

import json
import multiprocessing
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

import client.privacy
from client.hospital import Hospital, episode_groups, sampled_group_episodes
from client.ledger import LEDGER_FILE, BudgetExhausted, LedgerError, LedgerTerms, PrivacyLedger
from client.policy import POLICY_FILE, HospitalPolicy, PolicyError, load_policy
from client.privacy import NoiseCalibration, PrivateRelease, calibrate_accountant_noise, spent_epsilon
from client.private_training import new_ledger_delta
from shared.config import FedMetaConfig
from shared.learning.episodes import MAML_TASKS, TaskDesign, stack_episodes
from shared.learning.maml import MetaLearner, OuterGrads
from shared.learning.models import build_model
from shared.wire import (
    CONFIG_KEY,
    EVALUATE_METRICS,
    FLAT_ARRAY,
    PARAMS_KEY,
    REFUSED_BUDGET,
    REFUSED_POLICY,
    REJECTED_MESSAGE,
    TRAIN_METRICS,
    WireSchema,
    layout_key,
    put_arrays,
    take_arrays,
    validate_metrics,
)
from simulations.data.synthetic import write_synthetic_hospital
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
    q = tiny_config().privacy.sample_rate
    third, fourth = (spent_epsilon("rdp", [(1.0, q, n)], 1e-5) for n in (3, 4))
    budget = (third + fourth) / 2  # three releases fit, the fourth does not
    cfg = tiny_config(data={"state_dir": str(tmp_path)}, privacy={"noise_multiplier": 1.0, "target_epsilon": budget})
    hospital = Hospital(hospital_dir, cfg)
    outcomes = [hospital.train(hospital.learner.init_meta_params()) for _ in range(6)]
    assert [isinstance(o, BudgetExhausted) for o in outcomes] == [False] * 3 + [True] * 3
    spent = [o.metrics["epsilon"] for o in outcomes[:3]]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(third) and spent[-1] <= budget
    assert "privacy budget exhausted" in str(outcomes[3])
    assert outcomes[3].epsilon_next == pytest.approx(fourth)


def test_private_reply_is_a_different_gradient_each_time_but_same_shapes(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data={"state_dir": str(tmp_path)})
    hospital = Hospital(hospital_dir, cfg)
    params = hospital.learner.init_meta_params()
    a, b = hospital.train(params), hospital.train(params)
    assert set(a.outer_grad) == set(params)
    assert all(a.outer_grad[n].shape == p.shape and a.outer_grad[n].dtype == torch.float32 for n, p in params.items())
    assert not torch.equal(a.outer_grad["head.weight"], b.outer_grad["head.weight"])
    assert set(a.metrics) == TRAIN_METRICS and a.metrics["dp"] == 1.0


def server_message(params: dict[str, np.ndarray], message_type: str = "train") -> Message:
    content = RecordDict({CONFIG_KEY: ConfigRecord({"server-round": 1})})
    put_arrays(content, PARAMS_KEY, params)
    return Message(content, dst_node_id=7, message_type=message_type)


def client_context(hospital_dir: Path, cfg: FedMetaConfig, state_dir: Path, **node: object) -> Context:
    """A deployed hospital's context: its folder and its own state folder (policy and ledger) in the node config,
    and a policy that samples episode groups as ``tiny_config`` does."""
    sampling = {"policy.episode-groups": 8, "policy.groups-per-step": 4}
    node_config = {"data-path": str(hospital_dir), "state-dir": str(state_dir), **sampling, **node}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=cfg.to_flat())


def init_params(cfg: FedMetaConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {n: p.detach().numpy() for n, p in MetaLearner(build_model(cfg.model), cfg.maml).init_meta_params().items()}


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
    reply = client_app(server_message(params), client_context(hospital_dir, cfg, tmp_path))
    assert reply.has_error()
    assert reply.error.code == REJECTED_MESSAGE
    assert expected in reply.error.reason and "\n" not in reply.error.reason


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda c: c[layout_key(PARAMS_KEY)].__setitem__("head.bias", [1, 999]), "values, its layout"),
        (lambda c: c[layout_key(PARAMS_KEY)].__setitem__("head.bias", [2, 5]), "says 2 dimensions but lists 1"),
        (lambda c: c[PARAMS_KEY].__setitem__("extra", Array(np.zeros(3, np.float32))), "only ['flat'] may cross"),
        (lambda c: c.pop(layout_key(PARAMS_KEY)), "lacks 'meta-params' or its layout"),
    ],
)
def test_a_packed_message_that_does_not_add_up_is_rejected_by_name(
    hospital_dir: Path, tmp_path: Path, tamper: Callable[[RecordDict], object], expected: str
) -> None:
    cfg = tiny_config(data={"state_dir": str(tmp_path)})
    params = {n: p.numpy() for n, p in Hospital(hospital_dir, cfg).learner.init_meta_params().items()}
    msg = server_message(params)
    tamper(msg.content)
    reply = client_app(msg, client_context(hospital_dir, cfg, tmp_path))
    assert reply.has_error() and reply.error.code == REJECTED_MESSAGE
    assert expected in reply.error.reason, reply.error.reason


def test_packed_arrays_unpack_to_the_same_names_shapes_and_values() -> None:
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.float32(7.0) * np.ones(()), "c": np.ones(4)}
    arrays = {n: np.asarray(a, dtype=np.float32) for n, a in arrays.items()}
    content = RecordDict()
    put_arrays(content, PARAMS_KEY, arrays)
    assert len(content.array_records[PARAMS_KEY]) == 1  # one Array crosses, whatever the number of tensors
    unpacked = take_arrays(content, PARAMS_KEY, "message")
    assert {n: a.shape for n, a in unpacked.items()} == {n: a.shape for n, a in arrays.items()}
    for name, array in arrays.items():
        np.testing.assert_array_equal(unpacked[name], array)


def test_train_reply_carries_only_the_gradient_and_fixed_scalars_and_no_phi(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data={"state_dir": str(tmp_path)})
    params = {n: p.numpy() for n, p in Hospital(hospital_dir, cfg).learner.init_meta_params().items()}
    reply = client_app(server_message(params), client_context(hospital_dir, cfg, tmp_path))
    assert not reply.has_error()
    assert set(reply.content.array_records) == {"outer-grad"}
    assert set(reply.content.metric_records) == {"metrics"}
    assert set(reply.content.config_records) == {layout_key("outer-grad")}  # names and shapes, nothing else
    arrays = take_arrays(reply.content, "outer-grad", "reply")
    assert {n: tuple(a.shape) for n, a in arrays.items()} == {n: p.shape for n, p in params.items()}
    assert set(reply.content.metric_records["metrics"]) == TRAIN_METRICS
    phi = set()
    for path in hospital_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        phi |= {str(ds.PatientName), ds.PatientID, ds.InstitutionName, ds.StudyDate, ds.SOPInstanceUID, path.name}
    payload = reply.content.array_records["outer-grad"][FLAT_ARRAY].data
    payload += repr(dict(reply.content.metric_records["metrics"])).encode()
    payload += repr(dict(reply.content.config_records[layout_key("outer-grad")])).encode()
    assert not [s for s in phi if s and s.encode() in payload]


# -- the hospital's own policy -------------------------------------------------------------------------------------

LOOSE_RUN = {
    "privacy.delta": 0.5,
    "privacy.target-epsilon": 1e6,
    "privacy.noise-multiplier": 0.0,
    "privacy.accountant": "prv",
    "server.rounds": 1,
}


def test_a_run_cannot_turn_off_a_hospitals_dp(hospital_dir: Path, tmp_path: Path) -> None:
    flat = {**tiny_config().to_flat(), **LOOSE_RUN, "privacy.enabled": False, "data.state-dir": str(tmp_path / "x")}
    cfg = FedMetaConfig.from_flat(flat)
    reply = client_app(server_message(init_params(cfg)), client_context(hospital_dir, cfg, tmp_path / "own"))
    assert reply.has_error() and reply.error.code == REFUSED_POLICY
    assert "privacy.enabled=false" in reply.error.reason and "\n" not in reply.error.reason
    assert not (tmp_path / "x").exists() and not (tmp_path / "own" / LEDGER_FILE).exists()


def test_a_loose_run_config_trains_with_the_hospitals_own_policy_and_ledger(hospital_dir: Path, tmp_path: Path) -> None:
    flat = {**tiny_config().to_flat(), **LOOSE_RUN, "data.state-dir": str(tmp_path / "x")}
    cfg = FedMetaConfig.from_flat(flat)
    own = tmp_path / "own"
    reply = client_app(server_message(init_params(cfg)), client_context(hospital_dir, cfg, own))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert not (tmp_path / "x").exists()
    policy = HospitalPolicy()
    assert load_policy(own / POLICY_FILE) == policy  # written with the defaults on first use
    ledger = json.loads((own / LEDGER_FILE).read_text())
    assert ledger["accountant"] == "rdp" and ledger["delta"] <= policy.delta
    assert ledger["epsilon_budget"] == policy.epsilon_budget
    # the noise is calibrated for the hospital's planned releases, not the run's one round
    q = cfg.privacy.sample_rate
    assert ledger["noise_multiplier"] == pytest.approx(
        calibrate_accountant_noise(policy.epsilon_budget, ledger["delta"], q, policy.planned_releases)
    )
    metrics = dict(reply.content.metric_records["metrics"])
    assert metrics["dp"] == 1.0 and metrics["delta"] <= 1e-5 and metrics["epsilon"] < 1.0


def test_an_exhausted_hospital_refuses_whatever_the_run_config_says(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config()
    q = cfg.privacy.sample_rate
    budget = (spent_epsilon("rdp", [(1.0, q, 2)], 1e-5) + spent_epsilon("rdp", [(1.0, q, 3)], 1e-5)) / 2
    node = {"policy.noise-multiplier": 1.0, "policy.epsilon-budget": budget}
    codes = []
    for _ in range(3):
        codes.append(client_app(server_message(init_params(cfg)), client_context(hospital_dir, cfg, tmp_path, **node)))
    assert [r.has_error() for r in codes] == [False, False, True] and codes[-1].error.code == REFUSED_BUDGET
    every_key_changed = {
        **LOOSE_RUN,
        "privacy.max-grad-norm": 100.0,
        "privacy.episode-groups": 16,  # the same sample rate: a lower one could fit the rest of the budget
        "privacy.groups-per-step": 8,
        "privacy.unit": "record",
        "privacy.planned-releases": 1,
        "data.state-dir": str(tmp_path / "fresh"),
        "seed": 99,
    }
    loose = FedMetaConfig.from_flat({**cfg.to_flat(), **every_key_changed})
    reply = client_app(server_message(init_params(loose)), client_context(hospital_dir, loose, tmp_path, **node))
    assert reply.has_error() and reply.error.code == REFUSED_BUDGET


def test_a_run_asking_for_more_work_than_the_policy_allows_is_refused_with_the_setting(
    hospital_dir: Path, tmp_path: Path
) -> None:
    for key, value, limit in (
        ("maml.inner-steps", 21, "max-inner-steps"),
        ("server.local-steps", 11, "max-local-steps"),
        ("episode.eval-episodes", 51, "max-eval-episodes"),
        ("privacy.groups-per-step", 8, "at most 0.5"),
    ):
        cfg = FedMetaConfig.from_flat({**tiny_config().to_flat(), key: value})
        reply = client_app(server_message(init_params(cfg)), client_context(hospital_dir, cfg, tmp_path))
        assert reply.has_error() and reply.error.code == REFUSED_POLICY, key
        assert limit in reply.error.reason and "\n" not in reply.error.reason


def test_a_broken_policy_file_is_named_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / POLICY_FILE
    for text, expected in (("dp = maybe\n", "unreadable"), ("epsilon = 3\n", "unknown policy key 'epsilon'")):
        path.write_text(text)
        with pytest.raises(PolicyError, match=expected) as err:
            load_policy(path)
        assert "\n" not in str(err.value)
    path.write_text("epsilon-budget = -1\n")
    with pytest.raises(PolicyError, match="epsilon-budget must be > 0"):
        load_policy(path)


def test_ledger_policy_and_state_folder_are_owner_only(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config()
    state = tmp_path / "state"
    assert not client_app(server_message(init_params(cfg)), client_context(hospital_dir, cfg, state)).has_error()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in (LEDGER_FILE, POLICY_FILE):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name


# -- what a reply can reveal -----------------------------------------------------------------------------------------


def test_a_diverged_episode_still_gives_a_finite_private_reply(
    hospital_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(privacy={"groups_per_step": 8})
    original = MetaLearner.per_episode_outer_grads

    def one_nan_episode(self: MetaLearner, *args: object, **kwargs: object) -> OuterGrads:
        outer = original(self, *args, **kwargs)
        outer.grads["head.weight"][0, 0, 0] = float("nan")
        return outer

    monkeypatch.setattr(MetaLearner, "per_episode_outer_grads", one_nan_episode)
    params = init_params(cfg)
    node = {"policy.groups-per-step": 8}  # every group every step: the diverged episode is in the release
    reply = client_app(server_message(params), client_context(hospital_dir, cfg, tmp_path, **node))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    arrays = take_arrays(reply.content, "outer-grad", "reply")
    WireSchema.of(params).validate(arrays, "reply")  # finite, right names, shapes and dtype
    validate_metrics(dict(reply.content.metric_records["metrics"]), TRAIN_METRICS, "reply", required=TRAIN_METRICS)


def test_private_reply_metrics_do_not_depend_on_the_hospitals_data(tmp_path: Path) -> None:
    small = write_synthetic_hospital(tmp_path / "federation", 1, seed=0, n_images=40)
    large = write_synthetic_hospital(tmp_path / "federation", 2, seed=0, n_images=200)
    cfg = tiny_config(server={"local_steps": 2})
    replies = []
    for folder in (small, large):
        reply = client_app(server_message(init_params(cfg)), client_context(folder, cfg, tmp_path / folder.name))
        replies.append(dict(reply.content.metric_records["metrics"]))
    assert replies[0] == replies[1]  # same keys, same values: public settings and the same ledger arithmetic
    assert replies[0]["episodes"] == cfg.privacy.groups_per_step * 2


def test_evaluation_is_answered_only_as_often_as_the_policy_allows_and_carries_no_counts(
    hospital_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config()
    params = init_params(cfg)
    refused = client_app(server_message(params, "evaluate"), client_context(hospital_dir, cfg, tmp_path / "default"))
    assert refused.has_error() and refused.error.code == REFUSED_POLICY  # the default policy answers none
    node = {"policy.evaluation-requests": 1}
    answered = client_app(server_message(params, "evaluate"), client_context(hospital_dir, cfg, tmp_path, **node))
    assert not answered.has_error()
    assert set(answered.content.metric_records["metrics"]) == EVALUATE_METRICS
    again = client_app(server_message(params, "evaluate"), client_context(hospital_dir, cfg, tmp_path, **node))
    assert again.has_error() and again.error.code == REFUSED_POLICY and "evaluation-requests = 1" in again.error.reason


def test_evaluation_stops_when_the_budget_is_spent(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config()
    budget = spent_epsilon("rdp", [(1.0, cfg.privacy.sample_rate, 1)], 1e-5) * 1.01  # one release fits
    node = {"policy.noise-multiplier": 1.0, "policy.epsilon-budget": budget, "policy.evaluation-requests": 10}
    params = init_params(cfg)
    assert not client_app(server_message(params), client_context(hospital_dir, cfg, tmp_path, **node)).has_error()
    reply = client_app(server_message(params, "evaluate"), client_context(hospital_dir, cfg, tmp_path, **node))
    assert reply.has_error() and reply.error.code == REFUSED_POLICY and "budget is spent" in reply.error.reason


# -- the ledger --------------------------------------------------------------------------------------------------------


def _train_in_another_process(hospital_dir: str, state_dir: str, steps: int) -> None:
    cfg = tiny_config(
        data={"state_dir": state_dir}, privacy={"noise_multiplier": 3.0}, server={"local_steps": steps, "rounds": 100}
    )
    hospital = Hospital(Path(hospital_dir), cfg)
    assert not isinstance(hospital.train(hospital.learner.init_meta_params()), BudgetExhausted)


def test_concurrent_trainings_of_one_hospital_record_every_release(hospital_dir: Path, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    args = (str(hospital_dir), str(tmp_path), 2)
    workers = [context.Process(target=_train_in_another_process, args=args) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [w.exitcode for w in workers] == [0, 0, 0]
    ledger = json.loads((tmp_path / hospital_dir.name / LEDGER_FILE).read_text())
    assert sum(steps for *_, steps in ledger["history"]) == 6


@pytest.mark.parametrize(
    ("entry", "field"),
    [([1.0, 0.25, -50], "steps >= 1"), ([1.0, 1.5, 3], "0 < q <= 1"), ([0.0, 0.25, 3], "noise > 0")],
)
def test_a_ledger_with_an_impossible_history_is_refused(tmp_path: Path, entry: list, field: str) -> None:
    path = tmp_path / LEDGER_FILE
    terms = LedgerTerms("rdp", 1e-5)
    ledger = PrivacyLedger.open(path, terms, 8.0)
    ledger.noise_multiplier = 1.0  # pinned before the first step, as PrivateTraining does
    ledger.record(1.0, 0.25)
    state = json.loads(path.read_text())
    state["history"].append(entry)
    path.write_text(json.dumps(state))
    with pytest.raises(LedgerError, match=field):
        PrivacyLedger.open(path, terms, 8.0)


def test_a_run_cannot_set_the_noise_a_hospitals_ledger_keeps(hospital_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(privacy={"noise_multiplier": 5.0, "episode_groups": 64, "groups_per_step": 4})
    node = {"policy.max-episode-groups": 64}
    reply = client_app(server_message(init_params(cfg)), client_context(hospital_dir, cfg, tmp_path, **node))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    ledger = json.loads((tmp_path / LEDGER_FILE).read_text())
    policy = HospitalPolicy(episode_groups=8, groups_per_step=4)  # what client_context's policy says
    pinned = calibrate_accountant_noise(policy.epsilon_budget, ledger["delta"], policy.sample_rate, 100)
    assert ledger["noise_multiplier"] == pytest.approx(pinned)  # the policy's calibration, not the run's 5.0
    assert ledger["history"] == [[5.0, 4 / 64, 1]]  # the run's larger noise counted for its own release only


def test_policy_numbers_must_be_finite(tmp_path: Path) -> None:
    path = tmp_path / POLICY_FILE
    for line in ("epsilon-budget = nan", "max-grad-norm = inf", "delta = nan"):
        path.write_text(line + "\n")
        with pytest.raises(PolicyError, match="must be finite"):
            load_policy(path)


def test_a_large_hospitals_delta_tells_its_size_to_a_power_of_ten_at_most() -> None:
    assert new_ledger_delta(1e-5, 200) == 1e-5
    assert new_ledger_delta(1e-5, 50_000) == pytest.approx(1e-6)
    assert new_ledger_delta(1e-5, 99_999) == pytest.approx(1e-6)
    assert new_ledger_delta(1e-5, 123_456) == pytest.approx(1e-7)
