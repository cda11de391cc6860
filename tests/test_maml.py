"""The MAML core's per-episode outer-loop gradients against independent references."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from shared.config import ConfigError, MamlConfig, ModelConfig
from shared.learning.maml import INNER_LR_PREFIX, EpisodeBatch, MetaLearner, Params
from shared.learning.models import HEAD_PREFIX, build_model
from simulations.bench import maml as bench_maml

N_WAY, K_SHOT, Q_QUERY, EPISODES = 2, 2, 3, 3


# Second order with the meta-learned head: the variant the finite-difference and reference checks are written for.
CLASSIC_MAML = {"order": "second", "head_init": "learned"}


def seeded_learner(n_way: int, width: int, dtype: torch.dtype, **maml: object) -> tuple[MetaLearner, Params]:
    """A tiny seeded learner (second order, the learned head, 2 inner steps at 0.3 unless ``maml`` says otherwise)
    and its meta-parameters."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=width, n_way=n_way)).to(dtype)
    learner = MetaLearner(model, MamlConfig(**{**CLASSIC_MAML, "inner_steps": 2, "inner_lr": 0.3, **maml}))
    params = learner.init_meta_params()
    if learner.cfg.meta_sgd:  # distinct learned rates, so a wrong lr gradient cannot hide
        params = {
            k: v * (1 + 0.5 * torch.rand_like(v)) if k.startswith(INNER_LR_PREFIX) else v for k, v in params.items()
        }
    return learner, params


def tiny_learner(dtype: torch.dtype = torch.float64, **maml: object) -> tuple[MetaLearner, Params, EpisodeBatch]:
    learner, params = seeded_learner(N_WAY, 4, dtype, **maml)
    shape = (EPISODES, N_WAY * K_SHOT, 1, 28, 28)
    batch = EpisodeBatch(
        torch.randn(shape, dtype=dtype),
        torch.arange(N_WAY).repeat_interleave(K_SHOT).repeat(EPISODES, 1),
        torch.randn((EPISODES, N_WAY * Q_QUERY, 1, 28, 28), dtype=dtype),
        torch.arange(N_WAY).repeat_interleave(Q_QUERY).repeat(EPISODES, 1),
    )
    return learner, params, batch


def post_adaptation_query_loss(learner: MetaLearner, params: Params, batch: EpisodeBatch, i: int) -> torch.Tensor:
    """The classic way: clone weights, differentiate the inner loop with ``create_graph=True``."""
    cfg = learner.cfg
    params = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
    fast = {n: params[n] for n in learner.adapted_names}
    frozen = {n: v for n, v in params.items() if n not in fast and not n.startswith(INNER_LR_PREFIX)}
    for _ in range(cfg.inner_steps):
        loss = F.cross_entropy(
            functional_call(learner.model, {**frozen, **fast}, (batch.support_x[i],)), batch.support_y[i]
        )
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        lrs = [params[INNER_LR_PREFIX + n] if cfg.meta_sgd else cfg.inner_lr for n in fast]
        fast = {n: p - lr * g for (n, p), g, lr in zip(fast.items(), grads, lrs, strict=True)}
    return F.cross_entropy(functional_call(learner.model, {**frozen, **fast}, (batch.query_x[i],)), batch.query_y[i])


def adapted_without_graph(learner: MetaLearner, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
    """Plain SGD on the support set, every step detached (first-order / evaluation)."""
    fast = {k: v.detach().requires_grad_() for k, v in params.items()}
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(learner.model, fast, (x,)), y)
        step = torch.autograd.grad(loss, list(fast.values()))
        fast = {k: (v - learner.cfg.inner_lr * g).detach().requires_grad_() for (k, v), g in zip(fast.items(), step)}
    return fast


def flat(grads: Params, i: int) -> torch.Tensor:
    return torch.cat([g[i].flatten() for g in grads.values()])


VARIANTS = {
    "second-order": {},
    "anil": {"anil": True},
    "meta-sgd": {"meta_sgd": True},
    "anil+meta-sgd": {"anil": True, "meta_sgd": True},
    "norm-affine": {"norm_affine": True},
    "norm-affine+meta-sgd": {"norm_affine": True, "meta_sgd": True},
}


def test_norm_affine_adapts_the_head_and_the_group_norm_scale_and_shift_only() -> None:
    learner, params, batch = tiny_learner(norm_affine=True)
    norms = [f"backbone.{block}.1.{name}" for block in range(4) for name in ("weight", "bias")]
    assert sorted(learner.adapted_names) == sorted([*norms, "head.weight", "head.bias"])
    adapted = learner.adapted_params(params, batch.support_x[0], batch.support_y[0], learner.detached_inner_grads)
    assert all(not torch.equal(adapted[n], params[n]) for n in learner.adapted_names)
    # the convolutions a prediction uses are the meta-parameters themselves
    predict = learner.adapt(params, batch.support_x[0], batch.support_y[0], learner.detached_inner_grads)
    reference = functional_call(learner.model, {**params, **adapted}, (batch.query_x[0],))
    torch.testing.assert_close(predict(batch.query_x[0]), reference)


def test_anil_and_norm_affine_are_one_choice() -> None:
    with pytest.raises(ConfigError, match="both choose what the inner loop adapts"):
        MamlConfig(anil=True, norm_affine=True)


@pytest.mark.parametrize("path", ["loop", "batched"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outer_grad_equals_central_finite_differences_of_query_loss(variant: str, path: str) -> None:
    learner, params, batch = tiny_learner(**VARIANTS[variant])
    grads = learner.per_episode_outer_grads(params, batch, path).grads
    gen = torch.Generator().manual_seed(1)
    eps = 1e-7  # the loss has ReLU and max-pool kinks: keep the step small
    for i in range(EPISODES):
        for _ in range(2):  # random directions: d/dt L(params + t v) = <grad, v>
            direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
            plus = post_adaptation_query_loss(learner, {k: v + eps * direction[k] for k, v in params.items()}, batch, i)
            minus = post_adaptation_query_loss(
                learner, {k: v - eps * direction[k] for k, v in params.items()}, batch, i
            )
            finite_difference = ((plus - minus) / (2 * eps)).item()
            analytic = sum((grads[k][i] * direction[k]).sum() for k in params).item()
            assert analytic == pytest.approx(finite_difference, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("path", ["loop", "batched"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outer_grad_equals_create_graph_autograd_reference(variant: str, path: str) -> None:
    learner, params, batch = tiny_learner(**VARIANTS[variant])
    grads = learner.per_episode_outer_grads(params, batch, path).grads
    for i in range(EPISODES):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = post_adaptation_query_loss(learner, leaves, batch, i)
        reference = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        reference_flat = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).flatten()
                for p, g in zip(leaves.values(), reference, strict=True)
            ]
        )
        torch.testing.assert_close(flat(grads, i), reference_flat, rtol=1e-10, atol=1e-12)


def test_first_order_differs_from_second_order_but_shares_the_query_loss() -> None:
    learner, params, batch = tiny_learner()
    first, _, _ = tiny_learner(order="first")
    second_grads = learner.per_episode_outer_grads(params, batch, "loop")
    first_grads = first.per_episode_outer_grads(params, batch, "loop")
    torch.testing.assert_close(first_grads.query_losses, second_grads.query_losses)
    gap = (flat(first_grads.grads, 0) - flat(second_grads.grads, 0)).norm() / flat(second_grads.grads, 0).norm()
    assert gap > 1e-3


def test_first_order_outer_grad_is_query_grad_at_adapted_params() -> None:
    learner, params, batch = tiny_learner(order="first")
    grads = learner.per_episode_outer_grads(params, batch, "batched").grads
    adapted = adapted_without_graph(learner, params, batch.support_x[0], batch.support_y[0], learner.cfg.inner_steps)
    query_loss = F.cross_entropy(functional_call(learner.model, adapted, (batch.query_x[0],)), batch.query_y[0])
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(query_loss, list(adapted.values()))])
    torch.testing.assert_close(flat(grads, 0), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["loop", "batched"])
@pytest.mark.parametrize("variant", [*VARIANTS, "first-order"])
def test_zero_head_outer_grad_equals_the_classic_inner_loop_from_a_zeroed_head(variant: str, path: str) -> None:
    # the inner loop's first step differentiates the zero head alone (the backbone's gradient is zero there); the
    # classic loops differentiate everything at every step
    maml = VARIANTS.get(variant, {"order": "first"})
    learner, params, batch = tiny_learner(head_init="zero", **maml)
    grads = learner.per_episode_outer_grads(params, batch, path).grads
    zeroed = {k: torch.zeros_like(v) if k.startswith(HEAD_PREFIX) else v for k, v in params.items()}
    for i in range(EPISODES):
        if variant == "first-order":
            fast = adapted_without_graph(learner, zeroed, batch.support_x[i], batch.support_y[i], 2)
            query_loss = F.cross_entropy(functional_call(learner.model, fast, (batch.query_x[i],)), batch.query_y[i])
            reference = dict(zip(fast, torch.autograd.grad(query_loss, list(fast.values())), strict=True))
        else:
            leaves = {k: v.detach().requires_grad_() for k, v in zeroed.items()}
            loss = post_adaptation_query_loss(learner, leaves, batch, i)
            reference = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
        for name, expected in reference.items():
            if name.startswith(HEAD_PREFIX):  # the zero head is the task's, not a meta-parameter
                assert not grads[name][i].any()
            else:
                torch.testing.assert_close(grads[name][i], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", [*VARIANTS, "first-order"])
def test_loop_and_batched_paths_agree_in_float64(variant: str) -> None:
    learner, params, batch = tiny_learner(**VARIANTS.get(variant, {"order": "first"}))
    loop = learner.per_episode_outer_grads(params, batch, "loop")
    batched = learner.per_episode_outer_grads(params, batch, "batched")
    for name in params:
        torch.testing.assert_close(loop.grads[name], batched.grads[name], rtol=0, atol=1e-10)
    torch.testing.assert_close(loop.query_losses, batched.query_losses, rtol=0, atol=1e-10)


def test_loop_and_batched_paths_agree_in_float32_to_1e_4_of_the_gradient_norm() -> None:
    learner, params, batch = tiny_learner(torch.float32)
    loop = learner.per_episode_outer_grads(params, batch, "loop")
    batched = learner.per_episode_outer_grads(params, batch, "batched")
    for i in range(EPISODES):
        gap = (flat(loop.grads, i) - flat(batched.grads, i)).norm() / flat(batched.grads, i).norm()
        assert gap < 1e-4


def test_auto_path_picks_the_loop_on_cpu() -> None:
    from shared.learning.maml import resolve_path

    assert resolve_path("auto", torch.device("cpu")) == "loop"
    assert resolve_path("auto", torch.device("cuda")) == "batched"
    assert resolve_path("batched", torch.device("cpu")) == "batched"


def test_few_shot_prediction_matches_manual_adaptation() -> None:
    learner, params, batch = tiny_learner()
    probs = learner.predict_query(params, batch, steps=3)
    assert probs.shape == (EPISODES, N_WAY * Q_QUERY, N_WAY)
    torch.testing.assert_close(probs.sum(-1), torch.ones(EPISODES, N_WAY * Q_QUERY, dtype=torch.float64))
    fast = adapted_without_graph(learner, params, batch.support_x[1], batch.support_y[1], steps=3)
    expected = functional_call(learner.model, fast, (batch.query_x[1],)).softmax(-1)
    torch.testing.assert_close(probs[1], expected.detach())


def test_few_shot_prediction_with_a_zero_head_matches_manual_adaptation_from_a_zeroed_head() -> None:
    learner, params, batch = tiny_learner(head_init="zero")
    zeroed = {k: torch.zeros_like(v) if k.startswith(HEAD_PREFIX) else v for k, v in params.items()}
    for steps in (1, 2):  # the first step moves the head alone, the second everything
        probs = learner.predict_query(params, batch, steps=steps)
        fast = adapted_without_graph(learner, zeroed, batch.support_x[1], batch.support_y[1], steps)
        expected = functional_call(learner.model, fast, (batch.query_x[1],)).softmax(-1)
        torch.testing.assert_close(probs[1], expected.detach())


def test_meta_training_on_learnable_episodes_beats_chance() -> None:
    """A few hundred meta-steps on a task family with a real signal reach well above 50%."""
    torch.manual_seed(0)
    learner = MetaLearner(
        build_model(ModelConfig(width=8, n_way=2)), MamlConfig(**{**CLASSIC_MAML, "inner_steps": 2, "inner_lr": 0.1})
    )
    params = learner.init_meta_params()
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-2)

    def episodes(n: int) -> EpisodeBatch:
        # class 1 has a bright square at a per-episode random place; class 0 is noise
        def images(count: int, labels: torch.Tensor) -> torch.Tensor:
            x = 0.3 * torch.randn(n, count, 1, 28, 28)
            r, c = torch.randint(0, 20, (2,))
            x[..., r : r + 8, c : c + 8] += labels.view(1, count, 1, 1, 1).float() * 1.5
            return x

        sy = torch.tensor([0, 0, 1, 1])
        qy = torch.tensor([0] * 5 + [1] * 5)
        return EpisodeBatch(images(4, sy), sy.repeat(n, 1), images(10, qy), qy.repeat(n, 1))

    for _ in range(40):
        outer = learner.per_episode_outer_grads(params, episodes(4), "loop").mean()
        for name, p in params.items():
            p.grad = outer[name]
        optimizer.step()
    test = episodes(20)
    accuracy = (learner.predict_query(params, test).argmax(-1) == test.query_y).float().mean().item()
    assert accuracy > 0.8


def test_bench_maml_times_the_default_order_with_dp_against_the_classic_reference() -> None:
    parser = argparse.ArgumentParser()
    bench_maml.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu"])
    vars(args).update(meta_batch=2, n_way=2, k_shot=1, q_query=1, width=4, steps=1)
    result = bench_maml.run(args)
    assert result["config"]["order"] == MamlConfig().order
    assert result["chosen_path"] == "loop"
    assert all(v > 0 for d in result["tasks_per_s"].values() for v in d.values())
    assert result["speedup_vs_reference"] == pytest.approx(
        result["tasks_per_s"]["loop"]["dp_on"] / result["reference_tasks_per_s"], rel=0.01
    )
