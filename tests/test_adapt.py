"""fedmeta adapt and predict: a new hospital's own model from the meta-model, its file format, its predictions."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from client.adapt import adapt_hospital, class_metrics_note, meta_init_for, summary
from client.adapted_model import CARD_FILE, WEIGHTS_FILE, AdaptedModel, load_adapted_model, save_adapted_model
from client.predict import header_terms, refusal
from shared.cli import main
from shared.config import FedMetaConfig, ModelConfig
from shared.data.dicom import PreprocessConfig
from shared.data.hospital_folder import load_hospital, preprocess_for, record_id
from shared.data.site_keys import SECRET_NAME, STATE_FOLDER
from shared.errors import UserError
from shared.learning.adaptation import Candidate, Validation, challenge, fit
from shared.learning.evaluation import few_shot_tasks, predict
from shared.learning.maml import INNER_LR_PREFIX, MetaLearner, intra_op_threads
from shared.learning.models import build_model
from shared.run_folder import load_meta_model
from simulations.bench.adapt import meta_train, write_run_dir
from simulations.data.synthetic import HELDOUT_SEED_OFFSET, write_synthetic_hospital
from tests.shared_data import shared_data

# Small and honest: 150 steps of 8 episodes of the default method (first order, zero head) at this size; second
# order's query loss stayed flat for about the first 100 of them.
META_CFG = FedMetaConfig().replace(model={"width": 16}, episode={"meta_batch": 8, "q_query": 5})
META_STEPS, META_LR = 150, 3e-3
TRAINING_HOSPITALS = 6
SHOTS = 5


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def fixed_split(folder: Path) -> Path:
    """Give the hospital a fixed site secret: its default train/test split is keyed by it, so it is the same
    split on every run (a new folder otherwise gets a random secret, and a random split)."""
    secret = folder / STATE_FOLDER / SECRET_NAME
    secret.parent.mkdir(exist_ok=True)
    secret.write_text(hashlib.sha256(folder.name.encode()).hexdigest())
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapt")


@pytest.fixture(scope="module")
def meta_run(work: Path) -> Path:
    """A meta-model trained without Flower on synthetic hospitals 0-5, saved as a run folder."""
    preprocess = preprocess_for(META_CFG)
    folders = [fixed_split(write_synthetic_hospital(work / "train", i, seed=0)) for i in range(TRAINING_HOSPITALS)]
    hospitals = [load_hospital(folder, preprocess) for folder in folders]
    params = meta_train(hospitals, META_CFG, META_STEPS, META_LR, seed=0)
    return write_run_dir(work / "run", params, META_CFG, note="tests/test_adapt.py")


@pytest.fixture(scope="module")
def new_hospital(work: Path) -> Path:
    """The first held-out hospital of the synthetic federation: its own seed stream, scanner and label set."""
    return fixed_split(write_synthetic_hospital(work / "heldout", 0, seed=HELDOUT_SEED_OFFSET, n_images=240))


@pytest.fixture(scope="module")
def adapted(meta_run: Path, new_hospital: Path, work: Path) -> tuple[Path, dict]:
    out = work / "adapted"
    code, stdout, stderr = run_cli(
        "adapt", "--model", meta_run, "--hospital", new_hospital, "--shots", SHOTS, "--out", out, "--json"
    )
    assert code == 0, stderr
    card = json.loads(stdout)
    assert card == json.loads((out / CARD_FILE).read_text())
    return out, card


def tiny_model(tmp_path: Path, label_names: tuple[str, ...] = ("benign", "malignant")) -> Path:
    torch.manual_seed(0)
    model_cfg = ModelConfig(width=8, n_way=len(label_names))
    params = {n: p.detach() for n, p in build_model(model_cfg).named_parameters()}
    model = AdaptedModel(params, label_names, model_cfg, PreprocessConfig(image_size=28, channels=1))
    save_adapted_model(tmp_path / "model", model, card={"note": "untrained"})
    return tmp_path / "model"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_adapt_card_reports_an_honest_paired_comparison_on_a_hospital_that_never_took_part_in_training(
    adapted: tuple[Path, dict], meta_run: Path
) -> None:
    _, card = adapted
    heldout, validation = card["heldout"], card["validation"]
    adapted_model, scratch, difference = heldout["adapted"], heldout["scratch"], heldout["adapted_minus_scratch"]
    # both models are measured on every test-split scan of the hospital, the same scans
    assert heldout["scans"] == card["hospital"]["test_scans"] == sum(card["hospital"]["test_scans_by_label"].values())
    # three classes: the one-vs-rest macro forms of AUC, sensitivity and specificity, and no positive class
    reported = {"accuracy", "balanced-accuracy", "auc", "macro-sensitivity", "macro-specificity"}
    assert set(adapted_model) == set(scratch) == set(difference) == reported
    assert "positive_class" not in heldout and "one-vs-rest" in heldout["macro_metrics"]
    assert heldout["macro_metrics"] in summary(card) and "macro-specificity" in summary(card)
    for metric in adapted_model:
        assert difference[metric]["value"] == pytest.approx(adapted_model[metric]["value"] - scratch[metric]["value"])
        for estimate in (adapted_model[metric], scratch[metric], difference[metric]):
            assert estimate["ci95"][0] <= estimate["value"] <= estimate["ci95"][1]
    if validation["chosen"] == heldout["scratch_candidate"]:
        assert all(estimate["value"] == 0 for estimate in difference.values())

    # the default is the protocol's fine-tune, its challenger the scratch candidate, deployed only when it beats the
    # fine-tune by more than a standard error
    candidates = validation["candidates"]

    default, challenger, margin = (
        validation[key] for key in ("default_candidate", "challenger", "challenger_minus_default")
    )
    assert (default, challenger) == ("fine-tune-lr0.001", "scratch-lr0.01")
    inner_loops = {f"inner-loop-{k}" for k in (META_CFG.maml.inner_steps, META_CFG.episode.eval_steps)}
    assert set(candidates) == {*inner_loops, "fine-tune-lr0.001", "scratch-lr0.01"}  # each start at its own rate
    assert heldout["scratch_candidate"] == "scratch-lr0.01"
    assert validation["chosen"] == (challenger if margin["mean"] > margin["standard_error"] else default)
    # the per-fold margin averages to the difference of the out-of-fold balanced accuracies (one shot per class a fold)
    assert margin["mean"] == pytest.approx(
        candidates[challenger]["balanced-accuracy"] - candidates[default]["balanced-accuracy"]
    )
    assert {name.split("-")[0] for name in candidates} == {"inner", "fine", "scratch"}
    assert all(0 <= scores["balanced-accuracy"] <= 1 and scores["log-loss"] > 0 for scores in candidates.values())

    # Better than guessing on this seeded run. A point estimate, not a significance claim: with 5 shots per class
    # and a 150-step meta-model its 95% interval reaches below chance. Whether adapting beats scratch is what the
    # card reports (adapted_minus_scratch), not something this test asserts.
    assert adapted_model["balanced-accuracy"]["value"] > 1 / len(card["label_names"])

    # the card says where the model came from and how it was chosen
    assert card["source"]["sha256"] == load_meta_model(meta_run).sha256
    assert FedMetaConfig.from_flat(card["source"]["run_config"]) == META_CFG
    assert card["shots_per_class"] == SHOTS and card["seed"] == 0
    # the new hospital has its own 3 labels; the meta-model is 2-way
    assert card["label_names"] == ["nodule", "normal", "ring"]
    assert card["head"].startswith("zeros at the start")


def test_adapt_deploys_the_fine_tune_unless_scratch_beats_it_by_more_than_a_standard_error() -> None:
    fine, inner, longer, scratch = (
        Candidate("fine-tune-lr0.001", "fine-tune", {}, 100, 1e-3),
        Candidate("inner-loop-5", "inner-loop", {}, 5),
        Candidate("inner-loop-10", "inner-loop", {}, 10),
        Candidate("scratch-lr0.01", "scratch", {}, 100, 1e-2),
    )
    options = [fine, inner, longer, scratch]

    def validation(challenger_folds: list[float], challenger: Candidate) -> Validation:
        folds = {c.name: [0.5, 0.5, 0.5, 0.5, 0.5] for c in options} | {
            fine.name: [0.5, 1.0, 0.5, 1.0, 0.5],
            challenger.name: challenger_folds,
        }
        return Validation(
            scores={n: {"balanced-accuracy": float(np.mean(f)), "log-loss": 0.5} for n, f in folds.items()},
            fold_accuracy={n: np.array(f) for n, f in folds.items()},
        )

    # a better out-of-fold score (0.8 vs 0.7) from two folds won and one lost: the fine-tune stays
    noisy = challenge(options, validation([1.0, 1.0, 1.0, 0.5, 0.5], scratch))
    assert (noisy.default, noisy.challenger, noisy.chosen) == (fine, scratch, fine)
    # better on every fold where they differ, by more than the standard error of the difference: scratch
    clear = challenge(options, validation([1.0, 1.0, 1.0, 1.0, 1.0], scratch))
    assert clear.margin["mean"] > clear.margin["standard_error"] and clear.chosen is scratch
    # by between one and two standard errors (0.2 against 0.12): scratch, but not for a two-standard-error rule
    between = validation([1.0, 1.0, 1.0, 1.0, 0.5], scratch)
    assert challenge(options, between).chosen is scratch
    assert challenge(options, between, standard_errors=2).chosen is fine
    # the meta-model's own inner loops do not challenge its fine-tune, however they score (they did, and it cost)
    for inner_loop in (inner, longer):
        assert challenge(options, validation([1.0, 1.0, 1.0, 1.0, 1.0], inner_loop)).chosen is fine
        # a rule that lets them, scored beside the deployed one by bench quality, takes one that wins clearly
        wider = challenge(options, validation([1.0, 1.0, 1.0, 1.0, 1.0], inner_loop), frozenset({"inner-loop"}))
        assert wider.chosen is inner_loop


def test_adapt_with_the_same_seed_writes_the_same_card_and_weights(
    adapted: tuple[Path, dict], meta_run: Path, new_hospital: Path, work: Path
) -> None:
    out, card = adapted
    again = work / "adapted-again"
    with intra_op_threads(1):  # and on another thread count: one cross-validation worker instead of several
        code, stdout, stderr = run_cli(
            "adapt", "--model", meta_run, "--hospital", new_hospital, "--shots", SHOTS, "--out", again, "--json"
        )
    assert code == 0, stderr
    assert json.loads(stdout) == card
    # the same weights and header (not the same bytes: safetensors writes its metadata in a random key order)
    first, second = load_adapted_model(out), load_adapted_model(again)
    assert second.header() == first.header() and second.params.keys() == first.params.keys()
    for name, p in second.params.items():
        torch.testing.assert_close(p, first.params[name], rtol=0, atol=0)


def test_adapt_chooses_and_trains_without_looking_at_the_test_split(
    adapted: tuple[Path, dict], meta_run: Path, new_hospital: Path
) -> None:
    out, card = adapted
    meta = load_meta_model(meta_run)
    preprocess = preprocess_for(meta.cfg)
    data = load_hospital(new_hospital, preprocess)
    test = data.splits == "test"
    scrambled = dataclasses.replace(
        data,
        images=np.where(
            test[:, None, None, None], np.random.default_rng(1).random(data.images.shape, dtype=np.float32), data.images
        ),
        labels=np.where(test, np.random.default_rng(2).permutation(data.labels), data.labels),
    )
    again = adapt_hospital(meta, scrambled, SHOTS, seed=0, preprocess=preprocess)
    assert again.card["validation"]["candidates"] == card["validation"]["candidates"]
    saved = load_adapted_model(out)
    for name, p in again.model.params.items():
        torch.testing.assert_close(p, saved.params[name], rtol=0, atol=0)


def test_predict_gives_the_evaluation_paths_predictions_for_the_same_scans(
    adapted: tuple[Path, dict], new_hospital: Path, tmp_path: Path
) -> None:
    out, card = adapted
    code, stdout, stderr = run_cli("predict", "--model", out, new_hospital, "--csv", tmp_path / "p.csv")
    assert code == 0, stderr
    rows = read_csv(tmp_path / "p.csv")
    assert stdout.strip().endswith(f"CSV in {tmp_path / 'p.csv'}") and stdout.count("\n") == 1  # the CSV: file only
    assert "skipped" in stderr and "labels.csv" in stderr  # the manifest is listed, not a crash

    model = load_adapted_model(out)
    data = load_hospital(new_hospital, model.preprocess)
    train, test = data.split("train"), data.split("test")
    task = few_shot_tasks(train.labels, test.labels, len(data.label_names), SHOTS, tasks=1, seed=0)[0]
    evaluated = predict(model.learner, model.params, torch.from_numpy(test.images[task.query]))
    by_record = {record_id(row["sop_instance_uid"], int(row["frame"])): row for row in rows}
    assert len(by_record) == len(rows) == len(data)
    predicted = [by_record[test.record_ids[i]] for i in task.query]
    columns = [f"p:{name}" for name in model.label_names]
    np.testing.assert_allclose([[float(r[c]) for c in columns] for r in predicted], evaluated, atol=1e-6)
    assert [r["predicted_label"] for r in predicted] == [model.label_names[i] for i in evaluated.argmax(-1)]
    # and they are the scans the card's held-out accuracy was measured on
    correct = np.mean([r["predicted_label"] == data.label_names[test.labels[i]] for r, i in zip(predicted, task.query)])
    assert correct == pytest.approx(card["heldout"]["adapted"]["accuracy"]["value"])


def test_predict_on_wild_dicoms_predicts_every_decodable_image_and_lists_the_broken_ones(tmp_path: Path) -> None:
    ok, broken = shared_data("dicom-wild", "ok"), shared_data("dicom-wild", "broken")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image\n")
    (junk / "truncated.dcm").write_bytes((ok / "pylibjpeg-data__CT_small.dcm").read_bytes()[:2000])
    model = tiny_model(tmp_path)

    code, _, stderr = run_cli("predict", "--model", model, ok, broken, junk, "--csv", tmp_path / "p.csv")
    assert code == 0
    assert "Traceback" not in stderr
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["sop_instance_uid", "frame", "source", "predicted_label", "p:benign", "p:malignant"]
    keys = {(row["sop_instance_uid"], int(row["frame"])) for row in rows}
    assert len(keys) == len(rows)  # one row per instance and frame

    skipped = {
        line.split(": ", 1)[0].removeprefix("skipped "): line
        for line in stderr.splitlines()
        if line.startswith("skipped ")
    }
    adapted = load_adapted_model(model)
    for path in sorted(ok.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        uid = str(ds.get("SOPInstanceUID") or "")
        terms = header_terms(path)
        if terms and refusal(*terms, adapted):  # RT dose, segmentations, slides: not images of a patient's scan
            assert str(path) in skipped and (uid, 0) not in keys, path.name
        elif uid:
            frames = int(ds.get("NumberOfFrames") or 1)
            predicted = (uid, frames // 2) in keys  # the reader's default frame: the middle one
            assert predicted or "(a copy)" in skipped[str(path)], path.name
        else:
            assert any(key.startswith("content:") for key, _ in keys)
    for path in sorted(broken.glob("*.dcm")):
        assert "could not be decoded" in skipped[str(path)]
    assert "not a DICOM file" in skipped[str(junk / "notes.txt")]
    assert str(junk / "truncated.dcm") in skipped
    text = (tmp_path / "p.csv").read_text()
    assert "dicom-wild" not in text and str(tmp_path) not in text  # paths relative to the folders given, no more


def test_predict_refuses_a_model_of_another_format_version(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    weights = model / WEIGHTS_FILE
    with safe_open(weights, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    weights.write_bytes(save(tensors, metadata={**metadata, "format_version": "2"}))

    with pytest.raises(UserError, match="format version 2 and this fedmeta reads version 1; upgrade fedmeta"):
        load_adapted_model(model)
    code, _, stderr = run_cli("predict", "--model", model, shared_data("dicom-wild", "ok"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1


def test_predict_refuses_a_model_whose_preprocessing_the_reader_no_longer_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(tmp_path)
    monkeypatch.setattr("shared.data.dicom.READER_VERSION", 2)  # the DICOM reader changed since the model was made
    with pytest.raises(UserError, match=r"preprocessed with fingerprint .*re-run fedmeta adapt"):
        load_adapted_model(model)
    code, _, stderr = run_cli("predict", "--model", model, shared_data("dicom-wild", "ok"))
    assert code == 2 and "fingerprint" in stderr and len(stderr.strip().splitlines()) == 1


def test_predict_refuses_a_file_that_is_not_an_adapted_model(meta_run: Path) -> None:
    with pytest.raises(UserError, match="is not a fedmeta adapted model"):
        load_adapted_model(meta_run / "meta-model.safetensors")


def test_a_two_class_card_names_the_positive_class_its_sensitivity_and_specificity_are_about() -> None:
    # classification_metrics' sensitivity is the recall of episode label 1, the hospital's second label name
    assert class_metrics_note(("benign", "malignant")) == {"positive_class": "malignant"}


def test_inner_loop_candidate_is_the_meta_training_inner_loop() -> None:
    cfg = FedMetaConfig().replace(model={"width": 8}, maml={"meta_sgd": True})
    torch.manual_seed(0)
    learner = MetaLearner(build_model(cfg.model), cfg.maml)
    meta = learner.init_meta_params()
    images, labels = torch.rand(12, 1, 28, 28), np.repeat([0, 1], 6)
    task = few_shot_tasks(labels, labels, n_way=2, k_shot=3, tasks=1, seed=0)[0]
    candidate = Candidate("inner-loop-4", "inner-loop", meta, steps=4)
    shots = images[task.support], torch.from_numpy(task.support_y)
    probs = predict(learner, fit(learner, candidate, *shots), images[task.query])
    with torch.enable_grad():
        trained_loop = learner.adapt(meta, *shots, learner.detached_inner_grads, steps=4)
    with torch.no_grad():
        np.testing.assert_allclose(probs, trained_loop(images[task.query]).softmax(-1).numpy(), atol=1e-6)


def test_a_learned_head_is_kept_for_as_many_classes_and_reset_for_another_number(meta_run: Path) -> None:
    trained = load_meta_model(meta_run)
    meta = dataclasses.replace(trained, cfg=trained.cfg.replace(maml={"head_init": "learned"}))
    same, note = meta_init_for(meta, classes=2)
    torch.testing.assert_close(same["head.weight"], meta.params["head.weight"])
    assert note.startswith("meta-learned")
    meta_sgd = dataclasses.replace(
        meta,
        cfg=meta.cfg.replace(maml={"meta_sgd": True}),
        params={**meta.params, **{INNER_LR_PREFIX + n: torch.rand_like(p) for n, p in meta.params.items()}},
    )
    four, note = meta_init_for(meta_sgd, classes=4)
    assert four["head.weight"].shape[0] == 4 and not four["head.weight"].any()
    assert four[INNER_LR_PREFIX + "head.bias"].shape == (4,)
    torch.testing.assert_close(
        four[INNER_LR_PREFIX + "head.bias"], meta_sgd.params[INNER_LR_PREFIX + "head.bias"].mean().expand(4)
    )
    torch.testing.assert_close(four["backbone.0.0.weight"], meta.params["backbone.0.0.weight"])
    assert note.startswith("re-initialised")


def test_adapt_refuses_impossible_shot_counts_with_one_line(meta_run: Path, new_hospital: Path, work: Path) -> None:
    for shots, message in (("1", "use 2 or more"), ("1000", "lower --shots or label more")):
        code, _, stderr = run_cli(
            "adapt", "--model", meta_run, "--hospital", new_hospital, "--shots", shots, "--out", work / "x", "--json"
        )
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_adapt_refuses_a_run_folder_without_its_config(tmp_path: Path, meta_run: Path, new_hospital: Path) -> None:
    (tmp_path / "meta-model.safetensors").write_bytes((meta_run / "meta-model.safetensors").read_bytes())
    code, _, stderr = run_cli(
        "adapt", "--model", tmp_path, "--hospital", new_hospital, "--shots", SHOTS, "--out", tmp_path / "o", "--json"
    )
    assert code == 2 and "model-card.json does not exist" in stderr
