"""The simulation path end to end: ``fedmeta simulate`` through a real SuperLink, ``flwr run`` and Ray."""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest
import torch
from safetensors.torch import load_file

from client.hospital import Hospital
from server.round_log import read_round_log
from shared.config import FedMetaConfig, MamlConfig
from shared.data.dicom import PreprocessConfig, read_dicom
from shared.data.federation import HELDOUT_FOLDER, hospital_name
from shared.errors import UserError
from shared.flower_processes import flower_bin, free_port, wait_for_port
from shared.learning.evaluation import FewShotProtocol, few_shot_tasks, predict
from shared.learning.maml import MetaLearner
from shared.learning.models import build_model
from shared.run_folder import FEDERATION, HELDOUT_COMPARISON, META_MODEL
from simulations.bench import quality as bench_quality
from simulations.bench import scale as bench_scale
from simulations.data.medmnist import novel_class_plan, stain_shift
from simulations.simulate import simulation_config
from tests.shared_data import shared_data

PROJECT = Path(__file__).resolve().parents[1]
TINY = [
    "model.width=8",
    "maml.inner-steps=1",
    "episode.meta-batch=2",
    "episode.eval-episodes=2",
    "episode.eval-steps=1",
]
ADAPTATIONS = ("k=0", "k=1", "k=5", "k=10", "fine-tune")
# A seeded, non-private run small enough to repeat: every hospital every round, so Flower's random node ids
# cannot change which hospitals a round samples.
SEEDED = ["--hospitals", "2", "--clients-per-round", "2", "--rounds", "3", "--no-dp"]
SEEDED_SETTINGS = ["--set", *TINY, "data.heldout-hospitals=1"]
RUN_MARKER = "FEDMETA_TEST_RUN"  # inherited by every process a run starts, however detached


def test_pyproject_run_config_defaults_are_the_typed_config_defaults() -> None:
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    def flatten(table: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in table.items():
            if isinstance(value, dict):
                out.update(flatten(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    assert flatten(config) == FedMetaConfig().to_flat()


def simulate_command(out: Path, *options: str) -> list[str]:
    """``fedmeta simulate --json`` with 3 hospitals, 2 rounds, 2 per round unless ``options`` say otherwise."""
    command = [sys.executable, "-m", "shared.cli", "simulate", "--hospitals", "3", "--rounds", "2"]
    return [*command, "--clients-per-round", "2", "--out", str(out), "--json", *options]


def simulate_json(out: Path, *options: str, marker: str = "") -> dict:
    """``fedmeta simulate --json`` as a user runs it (see :func:`simulate_command`); every process it starts
    carries ``marker`` in its environment."""
    env = {**os.environ, RUN_MARKER: marker}
    done = subprocess.run(
        simulate_command(out, *options), capture_output=True, text=True, timeout=600, cwd=PROJECT, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_simulate_runs_virtual_hospitals_through_flower_and_leaves_no_process_behind(tmp_path: Path) -> None:
    out, token = tmp_path / "run", secrets.token_hex(8)
    result = simulate_json(out, "--set", *TINY, "data.heldout-hospitals=1", marker=token)
    assert result["rounds_completed"] == 2
    assert result["hospitals"] == 3
    assert result["clients_per_round"] == 2
    assert len(result["round_seconds"]) == 2
    assert 0 < result["epsilon_max"] <= 8.0
    assert result["peak_rss_mb"] > 100
    assert set(result["few_shot"]) == {"deployed", "meta", "meta+fine-tune", "scratch"}
    assert "balanced-accuracy" in result["few_shot"]["meta"]
    records = read_round_log(out)
    assert [r.participants for r in records] == [2, 2]
    assert records[0].bytes_up == records[0].bytes_down  # a gradient per meta-parameter, nothing more
    assert (out / META_MODEL).exists()
    assert not marked_processes(token)  # this run's own, whatever else runs on the machine


@pytest.mark.slow
def test_simulate_runs_its_virtual_hospitals_on_a_ray_cluster_someone_else_started(tmp_path: Path) -> None:
    port, token = free_port(), secrets.token_hex(8)
    ray_dir = Path(tempfile.mkdtemp(prefix="fmray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    log_path = tmp_path / "ray.log"
    command = [flower_bin("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
               "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={ray_dir}"]  # fmt: skip
    with open(log_path, "wb") as log:
        cluster = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, RUN_MARKER: token})  # fmt: skip
    try:
        wait_for_port(port, cluster, log_path, timeout_s=300, what="ray start --head")
        out = tmp_path / "run"
        result = simulate_json(out, "--ray-address", f"127.0.0.1:{port}", "--set", *TINY, "data.heldout-hospitals=0")
        assert result["rounds_completed"] == 2 and (out / META_MODEL).exists()
        drivers = list((ray_dir / "session_latest" / "logs").glob("python-core-driver-*"))
        assert drivers, "the simulation did not connect to the cluster"
        assert cluster.poll() is None  # and left it running for its owner
    finally:
        os.killpg(cluster.pid, signal.SIGTERM)
        cluster.wait(timeout=120)
        for process in marked_processes(token):  # what ray start started, by PID, if SIGTERM left any
            process.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)


def simulate_args(method: str, **changes: object) -> argparse.Namespace:
    values = {
        "hospitals": 20,
        "rounds": 10,
        "clients_per_round": 5,
        "data": None,
        "method": method,
        "no_dp": False,
        "out": Path("runs/x"),
        "seed": 0,
        "set": [],
    }
    return argparse.Namespace(**{**values, **changes})


def test_baseline_methods_are_presets_of_the_same_app_and_set_still_wins() -> None:
    fedavg = simulation_config(simulate_args("fedavg"))
    assert fedavg.maml.inner_steps == 0 and not fedavg.episode.permute_labels and fedavg.privacy.enabled
    pretrain = simulation_config(simulate_args("pretrain-then-meta"))
    assert pretrain.server.pretrain_rounds == 5 and pretrain.maml.inner_steps == FedMetaConfig().maml.inner_steps
    central = simulation_config(simulate_args("centralised"))
    assert not central.privacy.enabled and central.server.fraction_train == 1.0
    assert central.episode.meta_batch == 4  # 16 episodes x 5 of 20 hospitals: the federated runs' meta-batch
    assert simulation_config(simulate_args("centralised", set=["episode.meta-batch=8"])).episode.meta_batch == 2
    tuned = simulation_config(simulate_args("fedavg", set=["maml.inner-steps=2"]))
    assert tuned.maml.inner_steps == 2


def test_in_process_engine_runs_the_same_apps_and_prints_clean_json(tmp_path: Path) -> None:
    # json.loads in simulate_json fails if the server's own summary reaches stdout (it goes to the run's log)
    result = simulate_json(tmp_path / "run", "--engine", "in-process", "--method", "pretrain-then-meta", "--set", *TINY)
    assert result["rounds_completed"] == 2 and 0 < result["epsilon_max"] <= 8.0
    assert "balanced-accuracy" in result["few_shot"]["meta+fine-tune"]


def test_quality_bench_scores_every_method_on_the_same_tasks_against_fedavg_fine_tune(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_quality.add_arguments(parser)
    args = parser.parse_args(
        [
            "--methods",
            "fedavg,fedmeta-first-order",
            "--privacy",
            "none",
            "--hospitals",
            "3",
            "--heldout",
            "1",
            "--rounds",
            "2",
            "--clients-per-round",
            "2",
            "--shots",
            "5",
            "--eval-tasks",
            "3",
            "--work-dir",
            str(tmp_path),
            "--set",
            *[s for s in TINY if not s.startswith("maml.")],  # fedavg keeps its own inner-steps=0
            "server.fraction-evaluate=1.0",
        ]
    )
    result = bench_quality.run(args)
    variants = result["shots"]["5"]
    methods = ("fedavg", "fedmeta-first-order")
    deployed = ("deployed", *bench_quality.ALTERNATIVE_RULES, "cv-argmax", "oracle-upper-bound")
    expected = {"local-only"} | {f"{m}/{v}" for m in methods for v in (*ADAPTATIONS, *deployed)}
    assert set(variants) == expected
    # the deployed variant is fedmeta adapt's choice on each task's shots, and no rule beats the best candidate
    picks = result["deployed_choices"]["5"]
    for method, record in picks.items():
        assert sum(record["picked"].values()) == sum(record["cv_argmax_picked"].values()) == record["tasks"] == 3
        assert set(record["picked"]) | set(record["cv_argmax_picked"]) <= {"inner-loop", "fine-tune", "scratch"}
        # the gap is the oracle's mean balanced accuracy over the deployed one's, on the same tasks
        oracle, chosen = (variants[f"{method}/{v}"]["balanced-accuracy"] for v in ("oracle-upper-bound", "deployed"))
        assert record["mean_gap_to_best_candidate"] == pytest.approx(oracle - chosen)
        assert (record["worse_than_best_candidate"] > 0) == (oracle > chosen)
        # the deployed pick is the fine-tune or, when scratch beats it clearly, scratch: never an inner loop
        assert set(record["picked"]) <= {"fine-tune", "scratch"}
    assert set(picks) == set(methods)
    assert {v["tasks"] for v in variants.values()} == {3}
    reference = variants["fedavg/fine-tune"]["balanced-accuracy vs fedavg/fine-tune"]
    assert reference["mean"] == 0.0 and reference["hospitals"] == 1
    assert 0.0 <= variants["fedmeta-first-order/k=10"]["balanced-accuracy"] <= 1.0
    assert set(result["runs"]) == {"fedavg", "fedmeta-first-order"}
    table = (tmp_path / "quality.md").read_text()
    assert "| fedavg/fine-tune |" in table
    # settings are chosen on the training hospitals' own test splits, reported beside the held-out table
    assert all(0.0 <= run["training_hospitals"]["balanced-accuracy"] <= 1.0 for run in result["runs"].values())
    assert "training hospitals' own test splits" in table
    # --score-on training: the same scoring on the training hospitals' folders (their test splits as queries)
    on_training = bench_quality.heldout_hospitals(
        argparse.Namespace(**{**vars(args), "score_on": "training"}), tmp_path, None
    )
    assert [f.name for f in on_training.folders] == ["hospital-000", "hospital-001", "hospital-002"]
    assert all((f / "labels.csv").is_file() for f in on_training.folders)


def test_new_task_setting_holds_out_a_dataset_no_training_hospital_has(tmp_path: Path) -> None:
    root = shared_data("medmnist")
    args = argparse.Namespace(setting="breast-new-task", data_root=root, hospitals=2, heldout=1, seed=0)
    federation = bench_quality.prepare_federation(args, tmp_path)
    training = {label for h in ("hospital-000", "hospital-001") for label in labels_of(federation / h)}
    heldout = labels_of(federation / "heldout" / "hospital-000")
    assert {label.split(":")[0] for label in training} == {"retina", "pneumonia"}
    assert {label.split(":")[0] for label in heldout} == {"breast"}
    assert bench_quality.prepare_federation(args, tmp_path) == federation  # written once, then reused
    with pytest.raises(UserError, match="hospitals"):  # never silently reused under other settings
        bench_quality.prepare_federation(argparse.Namespace(**{**vars(args), "hospitals": 3}), tmp_path)


def test_novel_classes_setting_holds_out_classes_no_training_hospital_has(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_quality.add_arguments(parser)
    root = shared_data("medmnist")
    argv = ["--setting", "blood-novel-classes", "--data-root", str(root), "--hospitals", "4", "--heldout", "3"]
    federation = bench_quality.prepare_federation(parser.parse_args(argv), tmp_path)
    label_sets = json.loads((federation / "label-sets.json").read_text())
    novel = set(label_sets["novel"])
    training = [labels_of(federation / hospital_name(h)) for h in range(4)]
    heldout = [labels_of(federation / HELDOUT_FOLDER / hospital_name(h)) for h in range(3)]
    assert len(novel) == 2 and novel <= {f"blood:{c}" for c in range(8)}
    assert all(3 <= len(labels) <= 4 and not labels & novel for labels in training)
    assert all(3 <= len(labels) <= 4 and labels & novel for labels in heldout)
    assert novel <= set().union(*heldout)  # each novel class is some held-out hospital's
    assert [sorted(labels) for labels in training] == list(label_sets["training"].values())

    # RGB Secondary Capture, read as the documented BT.601 luma of the stained, rescanned pixels
    path = next((federation / HELDOUT_FOLDER / hospital_name(0)).rglob("*.dcm"))
    ds = pydicom.dcmread(path)
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel) == ("RGB", 3)
    luma = ds.pixel_array / 255 @ np.array([0.299, 0.587, 0.114])
    gray = read_dicom(path, PreprocessConfig(image_size=ds.Rows, channels=1)).pixels[0, 0]
    np.testing.assert_allclose(gray, luma, atol=1e-5)

    plans = [novel_class_plan(range(8), 24, 6, (3, 4), 2, seed) for seed in (0, 0, 1)]
    assert plans[0] == plans[1] != plans[2]
    assert stain_shift(5, seed=0) == stain_shift(5, seed=0) != stain_shift(6, seed=0)
    with pytest.raises(UserError, match="classes-per-hospital 3-7"):
        novel_class_plan(range(8), 4, 1, (3, 7), 2, seed=0)


def labels_of(hospital: Path) -> set[str]:
    with open(hospital / "labels.csv", newline="") as f:
        return {row["label"] for row in csv.DictReader(f)}


def test_scale_federation_links_written_hospitals_and_each_keeps_its_own_ledger(tmp_path: Path) -> None:
    base = tmp_path / "base"
    for name in ("hospital-000", "hospital-001"):
        (base / name).mkdir(parents=True)
    federation = bench_scale.linked_federation(5, base, 2, tmp_path)
    assert sorted(p.name for p in federation.iterdir()) == [f"hospital-{i:03d}" for i in range(5)]
    assert (federation / "hospital-003").resolve() == (base / "hospital-001").resolve()
    cfg = FedMetaConfig().replace(data={"state_dir": str(tmp_path / "state")})
    assert Hospital(federation / "hospital-003", cfg).state_dir != Hospital(federation / "hospital-001", cfg).state_dir


@pytest.mark.parametrize("maml", [{}, {"anil": True}, {"meta_sgd": True}])
def test_one_inner_loop_run_scores_every_step_count_as_separate_adaptations_would(maml: dict) -> None:
    torch.manual_seed(0)
    train_x, test_x = torch.rand(40, 1, 28, 28), torch.rand(12, 1, 28, 28)
    task = few_shot_tasks(np.array([0, 1] * 20), np.array([0, 1] * 6), 2, 5, 1, 0)[0]
    learner = MetaLearner(build_model(FedMetaConfig().model), MamlConfig(**maml))
    params = learner.init_meta_params()
    protocol = FewShotProtocol(inner_steps=5)
    variants = protocol.meta_predictions(learner, params, task, train_x, test_x, sweep=bench_quality.ADAPT_STEPS)
    assert set(variants) == {"meta", "meta+fine-tune", *(f"meta/k={k}" for k in bench_quality.ADAPT_STEPS)}
    np.testing.assert_array_equal(variants["meta"], variants["meta/k=5"])
    shots = train_x[task.support], torch.from_numpy(task.support_y)
    for steps in bench_quality.ADAPT_STEPS:
        alone = predict(learner, protocol.inner_loop(learner, params, *shots, steps), test_x[task.query])
        np.testing.assert_allclose(variants[f"meta/k={steps}"], alone, atol=1e-6)


def meta_model(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / META_MODEL)


def assert_same_run_results(run: Path, reference: Path) -> None:
    first, second = meta_model(run), meta_model(reference)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first), "meta-parameters differ"
    assert (run / HELDOUT_COMPARISON).read_text() == (reference / HELDOUT_COMPARISON).read_text()


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted seeded run on the Flower engine, writing its own synthetic hospitals."""
    out = tmp_path_factory.mktemp("seeded") / "run"
    simulate_json(out, *SEEDED, "--seed", "7", *SEEDED_SETTINGS)
    return out


def test_two_seeded_runs_into_fresh_folders_end_with_the_same_meta_model_and_heldout_comparison(
    seeded_run: Path, tmp_path: Path
) -> None:
    again = tmp_path / "run"
    simulate_json(again, *SEEDED, "--seed", "7", *SEEDED_SETTINGS)
    secrets = f"{FEDERATION}/**/site_secret"
    secrets_of = [sorted(p.read_bytes() for p in run.glob(secrets)) for run in (again, seeded_run)]
    assert len(secrets_of[0]) == 3 and secrets_of[0] == secrets_of[1]  # 2 training and 1 held-out hospital
    assert_same_run_results(again, seeded_run)


def test_runs_with_different_seeds_differ(seeded_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "run"
    simulate_json(other, *SEEDED, "--seed", "8", "--set", *TINY, "data.heldout-hospitals=0")
    labels = f"{FEDERATION}/hospital-000/labels.csv"
    assert (other / labels).read_bytes() != (seeded_run / labels).read_bytes()
    first, second = meta_model(other), meta_model(seeded_run)
    assert any(not torch.equal(first[name], second[name]) for name in first)


def marked_processes(token: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(RUN_MARKER) == token and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def wait_for_round(run: Path, round_number: int, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Until the run has recorded ``round_number`` rounds (fails if the run ends or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while len(read_round_log(run)) < round_number:
        assert process.poll() is None, f"the run ended (status {process.returncode}) before round {round_number}"
        assert time.monotonic() < deadline, f"no round {round_number} within {timeout_s:.0f}s"
        time.sleep(0.05)


def test_a_run_stopped_with_sigterm_after_round_2_stops_its_process_tree_and_its_rerun_ends_as_an_uninterrupted_one(
    seeded_run: Path, tmp_path: Path
) -> None:
    out, token = tmp_path / "run", secrets.token_hex(8)
    same_command = [*SEEDED, "--seed", "7", "--data", str(seeded_run / FEDERATION), *SEEDED_SETTINGS]
    run = subprocess.Popen(
        simulate_command(out, *same_command),
        cwd=PROJECT,
        env={**os.environ, RUN_MARKER: token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_round(out, 2, run)
        assert len(marked_processes(token)) > 3  # fedmeta, SuperLink, superexec, simulation, Ray
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, stderr.decode()[-2000:]  # interrupted before the end
    assert not marked_processes(token), "processes of the stopped run are still running"
    simulate_json(out, *same_command)
    assert_same_run_results(out, seeded_run)
