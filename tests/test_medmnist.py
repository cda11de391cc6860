"""MedMNIST .npz -> hospital folders: pixels and labels round-trip, tasks, partitions and site shift."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from shared.cli import main
from shared.data.dicom import PreprocessConfig, read_dicom
from shared.data.hospital_folder import load_hospital
from shared.errors import UserError
from simulations.data.medmnist import import_medmnist, load_task, partition_indices
from tests.shared_data import shared_data


def npz(name: str) -> Path:
    return shared_data("medmnist", f"{name}mnist.npz")


def manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def original(task_npz: Path, source: str) -> tuple[np.ndarray, int]:
    split, index = source.split("/")
    with np.load(task_npz) as arrays:
        return arrays[f"{split}_images"][int(index)], int(arrays[f"{split}_labels"].reshape(-1)[int(index)])


def test_iid_import_round_trips_pixels_labels_and_splits(tmp_path: Path) -> None:
    breast = npz("breast")
    folders = import_medmnist([breast], tmp_path, hospitals=2, partition="iid", seed=0, max_per_hospital=40)
    config = PreprocessConfig(image_size=28)
    for folder in folders:
        rows = manifest(folder)
        assert len(rows) == 40
        for row in rows:
            source = row["file"].removeprefix("breast/").removesuffix(".dcm")
            pixels, label = original(breast, source)
            np.testing.assert_allclose(read_dicom(folder / row["file"], config).pixels[0, 0], pixels / 255, atol=1e-6)
            assert row["label"] == f"breast:{label}"
            assert row["split"] == ("test" if source.startswith("test") else "train")
        data = load_hospital(folder, config)
        assert len(data) == 40 and set(data.label_names) <= {"breast:0", "breast:1"}
        assert sorted(data.label_names[i] for i in data.labels) == sorted(row["label"] for row in rows)
    first, second = ({row["file"] for row in manifest(folder)} for folder in folders)
    assert not first & second  # a partition: no image in two hospitals


def test_rgb_retina_round_trips_in_colour(tmp_path: Path) -> None:
    retina = npz("retina")
    (folder,) = import_medmnist([retina], tmp_path, hospitals=1, max_per_hospital=10)
    ds = pydicom.dcmread(next(folder.rglob("*.dcm")))
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and ds.PhotometricInterpretation == "RGB"
    for row in manifest(folder):
        pixels, _ = original(retina, row["file"].removeprefix("retina/").removesuffix(".dcm"))
        decoded = read_dicom(folder / row["file"], PreprocessConfig(image_size=28, channels=3)).pixels[0]
        np.testing.assert_allclose(decoded.transpose(1, 2, 0), pixels / 255, atol=1e-6)


def test_several_npz_give_each_hospital_one_task(tmp_path: Path) -> None:
    folders = import_medmnist(
        [npz("pneumonia"), npz("breast")], tmp_path, hospitals=4, partition="dirichlet", max_per_hospital=30
    )
    tasks = [{row["label"].split(":")[0] for row in manifest(folder)} for folder in folders]
    assert tasks == [{"pneumonia"}, {"breast"}, {"pneumonia"}, {"breast"}]
    data = load_hospital(folders[1], PreprocessConfig())
    assert all(name.startswith("breast:") for name in data.label_names)
    chosen = import_medmnist(
        [npz("pneumonia"), npz("breast")], tmp_path / "chosen", hospitals=3, max_per_hospital=5,
        task_per_hospital=["breast", "breast", "pneumonia"],
    )  # fmt: skip
    assert [manifest(folder)[0]["label"].split(":")[0] for folder in chosen] == ["breast", "breast", "pneumonia"]
    with pytest.raises(UserError, match="needs 3 names"):
        import_medmnist([npz("breast")], tmp_path / "bad", hospitals=3, task_per_hospital=["lung"])


def test_dirichlet_partition_covers_every_image_once_with_skewed_classes() -> None:
    labels = load_task(npz("pneumonia")).labels
    rng = np.random.default_rng(0)
    parts = partition_indices(labels, 5, "dirichlet", 0.1, rng)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    positive_share = [labels[part].mean() for part in parts if len(part)]
    iid_share = [labels[part].mean() for part in partition_indices(labels, 5, "iid", 0.1, rng)]
    assert np.std(positive_share) > 5 * np.std(iid_share)


def test_site_shift_changes_intensity_noise_and_resolution(tmp_path: Path) -> None:
    pneumonia = npz("pneumonia")
    folders = import_medmnist([pneumonia], tmp_path, hospitals=4, partition="site-shift", seed=1, max_per_hospital=20)
    sizes = {pydicom.dcmread(next(folder.rglob("*.dcm"))).Rows for folder in folders}
    assert len(sizes) >= 2
    errors = []
    for folder in folders:
        row = manifest(folder)[0]
        pixels, _ = original(pneumonia, row["file"].removeprefix("pneumonia/").removesuffix(".dcm"))
        decoded = read_dicom(folder / row["file"], PreprocessConfig(image_size=28)).pixels[0, 0]
        errors.append(float(np.abs(decoded - pixels / 255).mean()))
    assert min(errors) > 0.01 and len({round(error, 3) for error in errors}) == 4


def test_import_refuses_to_overwrite_and_reports_bad_files(tmp_path: Path) -> None:
    import_medmnist([npz("breast")], tmp_path, hospitals=1, max_per_hospital=3)
    with pytest.raises(UserError, match="already exists"):
        import_medmnist([npz("breast")], tmp_path, hospitals=1, max_per_hospital=3)
    not_npz = tmp_path / "fake.npz"
    not_npz.write_text("nope")
    with pytest.raises(UserError, match=r"is not a MedMNIST \.npz"):
        load_task(not_npz)


def test_import_medmnist_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["import-medmnist", "--npz", str(npz("breast")), "--out", str(tmp_path), "--hospitals", "2",
            "--partition", "site-shift", "--max-per-hospital", "6", "--seed", "2"]  # fmt: skip
    assert main(argv) == 0
    assert "hospital-001: 6 images" in capsys.readouterr().out


def test_episodes_from_an_imported_federation_meta_train_to_better_than_chance(tmp_path: Path) -> None:
    import torch

    from shared.config import MamlConfig, ModelConfig
    from shared.learning.episodes import EpisodeSampler
    from shared.learning.maml import MetaLearner
    from shared.learning.models import build_model

    folders = import_medmnist([npz("pneumonia")], tmp_path, hospitals=2, partition="site-shift", max_per_hospital=300)
    pools = []
    for folder in folders:
        data = load_hospital(folder, PreprocessConfig(image_size=28, channels=1))
        pools.append((EpisodeSampler(data.labels, 2, 5, 10, seed=len(pools)), torch.from_numpy(data.images)))
    torch.manual_seed(0)
    maml = MamlConfig(inner_steps=5, inner_lr=0.3, order="first")  # measured: 0.78 after 20 meta-steps, 0.88 after 60
    learner = MetaLearner(build_model(ModelConfig(width=16, n_way=2)), maml)
    params = learner.init_meta_params()
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-2)
    for step in range(30):
        sampler, images = pools[step % 2]
        outer = learner.per_episode_outer_grads(params, sampler.sample_batch(images, 4)).mean()
        for name, p in params.items():
            p.grad = outer[name]
        optimizer.step()
    sampler, images = pools[1]
    test = sampler.sample_batch(images, 20)
    accuracy = (learner.predict_query(params, test).argmax(-1) == test.query_y).float().mean().item()
    assert accuracy > 0.65  # 2-way: chance is 0.5
