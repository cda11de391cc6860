"""GPU-only checks of the MAML core (skipped on machines without CUDA, such as CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.hospital import Hospital
from shared.config import FedMetaConfig, MamlConfig, ModelConfig
from shared.learning.maml import EpisodeBatch, MetaLearner, pick_device
from shared.learning.models import build_model
from simulations.data.synthetic import write_synthetic_hospital
from tests.test_maml import CLASSIC_MAML

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_batch(episodes: int, seed: int) -> EpisodeBatch:
    gen = torch.Generator().manual_seed(seed)
    return EpisodeBatch(
        torch.randn(episodes, 10, 1, 28, 28, generator=gen),
        torch.arange(2).repeat_interleave(5).repeat(episodes, 1),
        torch.randn(episodes, 30, 1, 28, 28, generator=gen),
        torch.arange(2).repeat_interleave(15).repeat(episodes, 1),
    ).to("cuda")


@pytest.fixture(autouse=True)
def full_float32_precision():
    """TF32 convolutions (on by default) round differently in the grouped and per-episode kernels."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("maml", [{}, {"anil": True}, {"meta_sgd": True}, {"order": "first"}])
def test_cuda_graph_replay_matches_eager_batched_and_loop_paths(maml: dict) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=16, n_way=2)).cuda()
    graphed = MetaLearner(model, MamlConfig(inner_steps=3, **{**CLASSIC_MAML, **maml}))
    eager = MetaLearner(model, MamlConfig(inner_steps=3, cuda_graphs=False, **{**CLASSIC_MAML, **maml}))
    params = graphed.init_meta_params()
    for seed in range(3):  # replays with fresh inputs, not just the captured ones
        batch = cuda_batch(4, seed)
        params = {n: p + 0.01 * seed for n, p in params.items()}
        out = graphed.per_episode_outer_grads(params, batch, "batched")
        reference = eager.per_episode_outer_grads(params, batch, "batched")
        loop = eager.per_episode_outer_grads(params, batch, "loop")  # float32: ANIL's backbone grads cancel
        for name in params:
            torch.testing.assert_close(out.grads[name], reference.grads[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.query_losses, loop.query_losses, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.query_losses, reference.query_losses)


@pytest.mark.parametrize("maml", [{}, {"anil": True}, {"meta_sgd": True}])
def test_cuda_loop_and_batched_paths_agree_in_float64(maml: dict) -> None:
    torch.manual_seed(0)
    learner = MetaLearner(
        build_model(ModelConfig(width=16, n_way=2)).cuda().double(),
        MamlConfig(inner_steps=3, **{**CLASSIC_MAML, **maml}),
    )
    params = learner.init_meta_params()
    batch = cuda_batch(4, 0).to("cuda", torch.float64)
    batched = learner.per_episode_outer_grads(params, batch, "batched")
    loop = learner.per_episode_outer_grads(params, batch, "loop")
    for name in params:
        torch.testing.assert_close(batched.grads[name], loop.grads[name], rtol=0, atol=1e-10)


def test_a_hospital_trains_on_the_gpu_as_on_the_cpu_and_the_gpu_runs_in_full_float32(tmp_path: Path) -> None:
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default, which pick_device turns off
    device = pick_device("cuda")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    folder = write_synthetic_hospital(tmp_path, 0, seed=0, n_images=120)
    cfg = FedMetaConfig().replace(
        privacy={"enabled": False},
        data={"state_dir": str(tmp_path / "state")},
        episode={"k_shot": 2, "q_query": 2, "meta_batch": 4, "augment": True},
    )
    gpu = Hospital(folder, cfg, device)
    params = gpu.learner.init_meta_params()
    on_gpu = torch.cat([g.flatten() for g in gpu.train(params, 1).outer_grad.values()])
    cpu_params = {n: p.cpu() for n, p in params.items()}
    on_cpu = torch.cat([g.flatten() for g in Hospital(folder, cfg).train(cpu_params, 1).outer_grad.values()])
    assert float((on_gpu - on_cpu).norm() / on_cpu.norm()) < 1e-2
    private = cfg.replace(privacy={"enabled": True, "noise_multiplier": 1.0})
    released = Hospital(folder, private, device).train(params, 1).outer_grad
    assert all(torch.isfinite(g).all() for g in released.values())
