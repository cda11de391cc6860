"""``maml.head-init``: the head a few-shot task's inner loop starts from (learned, zero, class prototypes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from client.privacy import NoiseCalibration, PrivateRelease
from shared.config import ConfigError, FedMetaConfig, MamlConfig, ModelConfig
from shared.learning.adaptation import candidates, fit
from shared.learning.evaluation import FewShotProtocol, few_shot_tasks, predict
from shared.learning.maml import EpisodeBatch, MetaLearner, Params, prototype_head
from shared.learning.models import BACKBONE_PREFIX, HEAD_PREFIX, build_model
from tests.test_maml import seeded_learner

N_WAY, K_SHOT, Q_QUERY, EPISODES = 3, 2, 3, 3
HEAD = (HEAD_PREFIX + "weight", HEAD_PREFIX + "bias")


def tiny_learner(dtype: torch.dtype = torch.float64, **maml: object) -> tuple[MetaLearner, Params]:
    return seeded_learner(N_WAY, 8, dtype, **maml)


def random_batch(dtype: torch.dtype = torch.float64) -> EpisodeBatch:
    generator = torch.Generator().manual_seed(1)
    return EpisodeBatch(
        torch.randn((EPISODES, N_WAY * K_SHOT, 1, 28, 28), dtype=dtype, generator=generator),
        torch.arange(N_WAY).repeat_interleave(K_SHOT).repeat(EPISODES, 1),
        torch.randn((EPISODES, N_WAY * Q_QUERY, 1, 28, 28), dtype=dtype, generator=generator),
        torch.arange(N_WAY).repeat_interleave(Q_QUERY).repeat(EPISODES, 1),
    )


def separable_batch(dtype: torch.dtype = torch.float64) -> EpisodeBatch:
    """Class c is a bright square in its own corner region plus noise: easy for any reasonable features."""
    generator = torch.Generator().manual_seed(2)
    patterns = torch.zeros(N_WAY, 1, 28, 28, dtype=dtype)
    for c in range(N_WAY):
        patterns[c, :, 9 * c : 9 * c + 9, 9 * c : 9 * c + 9] = 3.0

    def scans(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(N_WAY).repeat_interleave(per_class).repeat(EPISODES, 1)
        return patterns[y] + 0.3 * torch.randn(*y.shape, 1, 28, 28, dtype=dtype, generator=generator), y

    return EpisodeBatch(*scans(K_SHOT), *scans(10))


def reference_outer_grads(learner: MetaLearner, params: Params, batch: EpisodeBatch, i: int) -> Params:
    """Proto-MAML written with torch.func: the head made from the class means of the meta-backbone's support
    features, then second-order SGD steps on the support loss as a function of (backbone, head), and the
    gradient of the query loss with respect to the meta-parameters."""
    sx, sy = batch.support_x[i], batch.support_y[i]

    def loss(fast: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(learner.model, fast, (x,)), y)

    def query_loss(meta: Params) -> torch.Tensor:
        backbone = {k: v for k, v in meta.items() if k.startswith(BACKBONE_PREFIX)}
        inner = {k[len(BACKBONE_PREFIX) :]: v for k, v in backbone.items()}
        features = functional_call(learner.model.backbone, inner, (sx,)).flatten(1)
        means = torch.stack([features[sy == c].mean(0) for c in range(N_WAY)])
        fast = {**backbone, HEAD[0]: 2 * means, HEAD[1]: -means.square().sum(1)}
        for _ in range(learner.cfg.inner_steps):
            step = torch.func.grad(loss)(fast, sx, sy)
            fast = {n: p - learner.cfg.inner_lr * step[n] for n, p in fast.items()}
        return loss(fast, batch.query_x[i], batch.query_y[i])

    return torch.func.grad(query_loss)(params)


def test_prototype_head_is_twice_the_class_means_and_zero_for_a_class_without_shots() -> None:
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-2.0, 0.0]])
    weight, bias = prototype_head(features, torch.tensor([0, 0, 2]), n_way=3)
    torch.testing.assert_close(weight, torch.tensor([[4.0, 6.0], [0.0, 0.0], [-4.0, 0.0]]))
    torch.testing.assert_close(bias, torch.tensor([-13.0, 0.0, -4.0]))


def test_prototype_logits_rank_classes_by_distance_to_their_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    support, queries = torch.randn(6, 5, generator=generator), torch.randn(4, 5, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    weight, bias = prototype_head(support, labels, n_way=3)
    means = torch.stack([support[labels == c].mean(0) for c in range(3)])
    shift = (F.linear(queries, weight, bias) + torch.cdist(queries, means) ** 2).T  # the same for every class
    torch.testing.assert_close(shift, queries.square().sum(1).expand(3, 4))


def test_prototype_head_classifies_a_separable_task_well_above_chance_with_no_inner_step() -> None:
    batch = separable_batch()
    for head_init, better_than in (("prototypes", 0.9), ("learned", None)):
        learner, params = tiny_learner(head_init=head_init)
        probs = learner.predict_query(params, batch, steps=0)
        accuracy = (probs.argmax(-1) == batch.query_y).double().mean().item()
        if better_than is not None:
            assert accuracy > better_than
        else:  # a random head is not a classifier of these classes
            assert accuracy < 0.7


@pytest.mark.parametrize("anil", [False, True])
@pytest.mark.parametrize("head_init", ["learned", "zero", "prototypes"])
def test_permuting_the_support_labels_permutes_the_predictions_only_when_the_head_is_made_per_task(
    head_init: str, anil: bool
) -> None:
    learner, params = tiny_learner(head_init=head_init, anil=anil)
    batch = random_batch()
    permutation = torch.tensor([2, 0, 1])  # class k is called permutation[k]
    relabelled = EpisodeBatch(batch.support_x, permutation[batch.support_y], batch.query_x, batch.query_y)
    probs = learner.predict_query(params, batch)
    permuted = learner.predict_query(params, relabelled)
    equivariant = torch.allclose(permuted[..., permutation], probs, atol=1e-10)
    assert equivariant == (head_init != "learned")


VARIANTS = {
    "maml": {},
    "anil": {"anil": True},
    "meta-sgd": {"meta_sgd": True},
}


@pytest.mark.parametrize("order", ["first", "second"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loop_and_batched_paths_give_the_same_per_episode_outer_grads_with_prototypes(variant: str, order: str) -> None:
    learner, params = tiny_learner(head_init="prototypes", order=order, **VARIANTS[variant])
    batch = random_batch()
    loop = learner.per_episode_outer_grads(params, batch, "loop")
    batched = learner.per_episode_outer_grads(params, batch, "batched")
    for name in params:
        torch.testing.assert_close(batched.grads[name], loop.grads[name], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(batched.query_losses, loop.query_losses)
    # the head is made from the backbone, so the head's own meta-parameters get nothing and the backbone all of it
    assert all(not loop.grads[name].any() for name in HEAD)
    assert all(loop.grads[name].flatten(1).norm(dim=1).min() > 0 for name in params if name not in HEAD)


@pytest.mark.parametrize("path", ["loop", "batched"])
def test_second_order_prototype_outer_grad_equals_the_written_out_proto_maml(path: str) -> None:
    learner, params = tiny_learner(head_init="prototypes")
    batch = random_batch()
    grads = learner.per_episode_outer_grads(params, batch, path).grads
    for i in range(EPISODES):
        for name, expected in reference_outer_grads(learner, params, batch, i).items():
            torch.testing.assert_close(grads[name][i], expected)


@pytest.mark.parametrize("head_init", ["zero", "prototypes"])
def test_the_stored_head_never_matters_to_the_inner_loop_or_the_fine_tune(head_init: str) -> None:
    learner, params = tiny_learner(dtype=torch.float32, head_init=head_init)
    other = {**params, **{name: 100 * torch.randn_like(params[name]) for name in HEAD}}
    train_x, test_x = torch.rand(20, 1, 28, 28), torch.rand(9, 1, 28, 28)
    labels = np.arange(20) % N_WAY
    task = few_shot_tasks(labels, labels[:9], N_WAY, K_SHOT, tasks=1, seed=0)[0]
    protocol = FewShotProtocol(inner_steps=2, fine_tune_steps=3)
    variants = protocol.meta_predictions(learner, params, task, train_x, test_x, sweep=(0, 1, 2))
    again = protocol.meta_predictions(learner, other, task, train_x, test_x, sweep=(0, 1, 2))
    assert set(variants) == {"meta", "meta+fine-tune", "meta/k=0", "meta/k=1", "meta/k=2"}
    for name, probs in variants.items():
        np.testing.assert_allclose(again[name], probs, atol=1e-6)


def test_fine_tune_starts_from_the_prototype_head_and_adam_from_the_head_it_is_given() -> None:
    learner, params = tiny_learner(head_init="prototypes")
    batch = random_batch()
    sx, sy = batch.support_x[0], batch.support_y[0]
    start = FewShotProtocol.fine_tune(learner, params, sx, sy, steps=0, lr=1e-3)
    weight, bias = prototype_head(learner.features(params, sx), sy, N_WAY)
    torch.testing.assert_close(start[HEAD[0]], weight)
    torch.testing.assert_close(start[HEAD[1]], bias)
    kept = FewShotProtocol.adam(learner, params, sx, sy, steps=0, lr=1e-3)
    torch.testing.assert_close(kept[HEAD[0]], params[HEAD[0]])


def test_one_inner_loop_run_scores_every_step_count_as_separate_adaptations_with_prototypes() -> None:
    learner, params = tiny_learner(dtype=torch.float32, head_init="prototypes", meta_sgd=True)
    batch = random_batch(torch.float32)
    sx, sy = batch.support_x[0], batch.support_y[0]
    states = FewShotProtocol.inner_loop_states(learner, params, sx, sy, (0, 1, 3))
    assert set(states) == {0, 1, 3}
    for steps, state in states.items():
        alone = FewShotProtocol.inner_loop(learner, params, sx, sy, steps)
        np.testing.assert_allclose(predict(learner, state, batch.query_x[0]), predict(learner, alone, batch.query_x[0]))


def test_a_private_release_of_outer_grads_with_a_zero_head_gradient_is_finite_and_noised() -> None:
    learner, params = tiny_learner(dtype=torch.float32, head_init="zero")
    outer = learner.per_episode_outer_grads(params, random_batch(torch.float32), "loop")
    assert all(not outer.grads[name].any() for name in HEAD)
    released = PrivateRelease(params, NoiseCalibration(1.0, 1.0), expected_episodes=EPISODES).release(outer)
    assert released.keys() == params.keys()
    assert all(g.isfinite().all() and g.shape == params[n].shape for n, g in released.items())
    assert all(released[name].any() for name in HEAD)  # the noise covers every meta-parameter


def test_fedmeta_adapt_offers_zero_inner_steps_only_with_a_prototype_head() -> None:
    for head_init, zero_steps in (("learned", False), ("zero", False), ("prototypes", True)):
        cfg = FedMetaConfig().replace(model={"width": 8}, maml={"head_init": head_init})
        meta = MetaLearner(build_model(cfg.model), cfg.maml).init_meta_params()
        names = {c.name for c in candidates(cfg, meta, FewShotProtocol.fresh_init(cfg.model, 0))}
        assert ("inner-loop-0" in names) == zero_steps


def test_fedmeta_adapt_fine_tunes_a_zero_head_model_from_the_zero_head() -> None:
    torch.manual_seed(0)
    images, labels = torch.rand(12, 1, 28, 28), np.repeat([0, 1], 6)
    task = few_shot_tasks(labels, labels, n_way=2, k_shot=3, tasks=1, seed=0)[0]
    shots = images[task.support], torch.from_numpy(task.support_y)
    cfg = FedMetaConfig().replace(model={"width": 8}, maml={"head_init": "zero"})
    learner = MetaLearner(build_model(cfg.model), cfg.maml)
    meta = learner.init_meta_params()
    fine_tune = next(c for c in candidates(cfg, meta, meta) if c.kind == "fine-tune")
    zero_head = {**meta, **{n: torch.zeros_like(meta[n]) for n in HEAD}}
    expected = FewShotProtocol.adam(learner, zero_head, *shots, fine_tune.steps, fine_tune.lr)
    for name, p in fit(learner, fine_tune, *shots).items():
        torch.testing.assert_close(p, expected[name])


def test_config_rejects_an_unknown_head_init_naming_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"maml\.head-init.*learned, zero, prototypes"):
        FedMetaConfig.from_flat({"maml.head-init": "random"})
    assert FedMetaConfig.from_flat({"maml.head-init": "prototypes"}).maml.head_init == "prototypes"


def test_a_zero_head_without_inner_steps_is_refused_and_pretraining_uses_the_models_own_head() -> None:
    with pytest.raises(ConfigError, match=r"maml\.head-init=zero.*maml\.inner-steps"):
        FedMetaConfig.from_flat({"maml.head-init": "zero", "maml.inner-steps": "0"})
    cfg = FedMetaConfig().replace(maml={"head_init": "zero"}, server={"pretrain_rounds": 1})
    assert cfg.for_round(1).maml.head_init == "learned" and cfg.for_round(2).maml.head_init == "zero"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_init", ["zero", "prototypes"])
def test_cuda_graph_replay_matches_the_eager_batched_path_with_a_head_made_per_task(head_init: str) -> None:
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(width=8, n_way=N_WAY)).cuda()
        graphed = MetaLearner(model, MamlConfig(inner_steps=2, order="first", head_init=head_init))
        eager = MetaLearner(model, MamlConfig(inner_steps=2, order="first", head_init=head_init, cuda_graphs=False))
        params = graphed.init_meta_params()
        for seed in range(2):  # a replay with fresh inputs, not just the captured ones
            batch = random_batch(torch.float32).to("cuda")
            batch = EpisodeBatch(batch.support_x + seed, batch.support_y, batch.query_x, batch.query_y)
            out = graphed.per_episode_outer_grads(params, batch, "batched")
            reference = eager.per_episode_outer_grads(params, batch, "batched")
            for name in params:
                torch.testing.assert_close(out.grads[name], reference.grads[name], rtol=1e-4, atol=1e-5)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
