"""``model.init`` and ``fedmeta pretrain``: a run starts from local weights, torchvision's or fedmeta's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from server.app import initial_state
from shared.cli import main
from shared.config import FedMetaConfig
from shared.errors import UserError
from shared.learning.models import BACKBONE_PREFIX, HEAD_PREFIX
from shared.learning.pretrained import architecture_metadata, load_initial_weights, with_checked_init
from tests.shared_data import shared_data

TINY = {"width": 8}


def run_config(**model: object) -> FedMetaConfig:
    return FedMetaConfig().replace(model={**TINY, **model})


def random_start(cfg: FedMetaConfig) -> dict[str, torch.Tensor]:
    return initial_state(cfg.replace(model={"init": ""})).meta_params


def backbone_file(path: Path, cfg: FedMetaConfig, scale: float = 3.0) -> dict[str, torch.Tensor]:
    """A backbone-only file in fedmeta's names (what ``fedmeta pretrain`` writes), values unlike a random start."""
    backbone = {n: scale * torch.ones_like(p) for n, p in random_start(cfg).items() if n.startswith(BACKBONE_PREFIX)}
    save_file(backbone, path, metadata=architecture_metadata(cfg.model))
    return backbone


def test_a_backbone_file_sets_the_backbone_and_the_head_keeps_its_seeded_random_start(tmp_path: Path) -> None:
    cfg = run_config()
    backbone = backbone_file(tmp_path / "backbone.safetensors", cfg)
    started = initial_state(cfg.replace(model={"init": str(tmp_path / "backbone.safetensors")})).meta_params
    random = random_start(cfg)
    assert started.keys() == random.keys()
    for name, tensor in started.items():
        torch.testing.assert_close(tensor, backbone[name] if name in backbone else random[name])
    assert any(name.startswith(HEAD_PREFIX) for name in random)


def test_torchvision_resnet18_weights_load_with_batchnorm_statistics_and_classifier_skipped(tmp_path: Path) -> None:
    torch.manual_seed(1)
    imagenet_like = {k: v.contiguous() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    save_file(imagenet_like, tmp_path / "resnet18.safetensors")  # torchvision's names, no fedmeta metadata
    cfg = run_config(arch="resnet18", width=32, init=str(tmp_path / "resnet18.safetensors"))
    started = initial_state(cfg).meta_params
    # a gray scan is the same image in all three channels: the RGB stem's filters summed give its response
    torch.testing.assert_close(started[BACKBONE_PREFIX + "conv1.weight"], imagenet_like["conv1.weight"].sum(1, True))
    for name in ("layer2.0.conv1.weight", "layer4.1.bn2.bias"):
        torch.testing.assert_close(started[BACKBONE_PREFIX + name], imagenet_like[name])


def mismatched_shape(path: Path, cfg: FedMetaConfig) -> None:
    backbone = backbone_file(path, cfg)
    name = next(iter(backbone))
    save_file({**backbone, name: torch.ones(2, 2)}, path)


def unknown_tensor(path: Path, cfg: FedMetaConfig) -> None:
    save_file({**backbone_file(path, cfg), "decoder.weight": torch.ones(2)}, path)


def nan_tensor(path: Path, cfg: FedMetaConfig) -> None:
    backbone = backbone_file(path, cfg)
    name = next(iter(backbone))
    save_file({**backbone, name: torch.full_like(backbone[name], float("nan"))}, path)


def other_width(path: Path, cfg: FedMetaConfig) -> None:
    backbone_file(path, cfg.replace(model={"width": 16}))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path, cfg: None, r"model\.init=.*: no such file; give the absolute path"),
        (lambda path, cfg: path.write_text("weights"), r"model\.init=.* is not a readable safetensors file"),
        (mismatched_shape, r"model\.init=.*has shape \(2, 2\), the model's is .*use weights saved for these"),
        (unknown_tensor, r"model\.init=.*'decoder\.weight' matches no parameter of model\.arch=conv4"),
        (nan_tensor, r"model\.init=.*has NaN or infinite values"),
        (other_width, r"model\.init=.* was saved for model\.width=16, the run has 8; set it so"),
    ],
    ids=["missing", "not-safetensors", "shape", "unknown-tensor", "nan", "other-width"],
)
def test_a_weights_file_that_does_not_fit_is_refused_in_one_line_naming_model_init(
    tmp_path: Path, make, message: str
) -> None:
    cfg = run_config(init=str(tmp_path / "weights.safetensors"))
    make(tmp_path / "weights.safetensors", cfg)
    with pytest.raises(UserError, match=message) as refused:
        with_checked_init(cfg)
    assert "\n" not in str(refused.value)


def test_a_relative_model_init_is_made_absolute_before_the_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = run_config()
    backbone_file(tmp_path / "backbone.safetensors", cfg)
    monkeypatch.chdir(tmp_path)
    checked = with_checked_init(cfg.replace(model={"init": "backbone.safetensors"}))
    assert checked.model.init == str(tmp_path / "backbone.safetensors")
    assert with_checked_init(cfg) is cfg


def tiny_public_npz(path: Path) -> Path:
    """The first scans of the real BreastMNIST file, in its own format."""
    with np.load(shared_data("medmnist", "breastmnist.npz")) as arrays:
        np.savez(path, **{key: arrays[key][:48] if "train" in key else arrays[key][:16] for key in arrays.files})
    return path


def test_fedmeta_pretrain_writes_a_backbone_a_run_starts_from_and_the_same_seed_the_same_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    public = tiny_public_npz(tmp_path / "breastmnist.npz")
    for name in ("a", "b"):
        argv = ["pretrain", "--npz", str(public), "--out", str(tmp_path / f"{name}.safetensors"), "--epochs", "2",
                "--batch-size", "16", "--set", "model.width=8"]  # fmt: skip
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2, validation accuracy" in out and "--set model.init=" in out
    backbone, again = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert backbone.keys() == again.keys() and all(torch.equal(backbone[n], again[n]) for n in backbone)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata()["fedmeta.pretrained-on"] == "breast"
    assert backbone and all(name.startswith(BACKBONE_PREFIX) for name in backbone)
    cfg = run_config(init=str(tmp_path / "a.safetensors"))
    started = initial_state(with_checked_init(cfg)).meta_params
    for name, tensor in backbone.items():
        torch.testing.assert_close(started[name], tensor)


def test_pretrain_refuses_a_setting_that_is_not_the_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pretrain", "--npz", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o"), "--set", "maml.order=first"]
    assert main(argv) == 2
    assert "--set: pretrain takes only model.* settings" in capsys.readouterr().err


def test_load_initial_weights_refuses_a_file_with_nothing_for_the_model(tmp_path: Path) -> None:
    cfg = run_config(init=str(tmp_path / "empty.safetensors"))
    save_file({"fc.weight": torch.ones(2, 2)}, tmp_path / "empty.safetensors")
    with pytest.raises(UserError, match=r"holds no parameter of model\.arch=conv4"):
        load_initial_weights(cfg.model, random_start(cfg))
