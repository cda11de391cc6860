"""The functional MAML core: functions of (meta-parameters, episode batch), no module state.

Meta-parameters are a flat ``dict[str, Tensor]``: the model's parameters by name, plus, with
Meta-SGD, one learned inner learning rate per adapted parameter under ``inner_lr.<name>``.
The module is used only as an architecture through ``functional_call``.

A task's inner loop starts from the meta-parameters with the head ``maml.head-init`` names: the meta-learned one,
zeros (the zeroing trick) or the support set's class prototypes (Proto-MAML). With the last two, the order of an
episode's labels costs nothing, and the head's own outer-loop gradient is zero (it stays a meta-parameter).

Per-episode outer-loop gradients (what DP clips) come from two execution paths over the same
inner loop:

* ``loop``: one episode at a time with reverse-mode autograd, spread over a small thread pool
  with one intra-op thread each (measured on 2 CPU cores: 1.15x over one episode at a time on
  two intra-op threads, and torch.func.grad per episode is 25% slower than autograd here);
* ``batched``: the forward pass ``torch.func.vmap``-ed over per-episode leaf copies of the
  meta-parameters and differentiated with autograd (replayed as a CUDA graph on a GPU), which turns
  the convolutions into large batched kernels: 4.5-18x the loop on a GPU, slower on a CPU.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from shared.config import ExecutionPath, MamlConfig
from shared.learning.models import BACKBONE_PREFIX, HEAD_PREFIX, MetaClassifier

Params = dict[str, Tensor]
InnerGrads = Callable[[Callable[[Params], Tensor], Params, list[str]], Params]  # (loss, fast, names) -> grads of names
INNER_LR_PREFIX = "inner_lr."


@dataclass(frozen=True)
class EpisodeBatch:
    """A meta-batch of few-shot episodes: support/query images ``[E, S, C, H, W]`` and labels ``[E, S]``."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EpisodeBatch:
        return EpisodeBatch(
            self.support_x.to(device=device, dtype=dtype),
            self.support_y.to(device),
            self.query_x.to(device=device, dtype=dtype),
            self.query_y.to(device),
        )

    def episode(self, i: int) -> EpisodeBatch:
        """Episode ``i`` alone, without the leading episode dimension."""
        return EpisodeBatch(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i])


@dataclass(frozen=True)
class OuterGrads:
    """Per-episode outer-loop gradients ``[E, *param.shape]`` and post-adaptation query losses ``[E]``."""

    grads: Params
    query_losses: Tensor

    def mean(self) -> Params:
        return {name: g.mean(0) for name, g in self.grads.items()}


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU. On a GPU, matrix products and convolutions
    run in full float32: through TF32 (PyTorch's default for cuDNN), a second-order meta-gradient at
    initialisation came out with 29x the norm of the float32 one (measured on an H200)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def resolve_path(path: ExecutionPath, device: torch.device) -> ExecutionPath:
    if path != "auto":
        return path
    return "batched" if device.type == "cuda" else "loop"


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class MetaLearner:
    """Binds an architecture to a MAML configuration; every method is a function of the parameters
    it is given."""

    def __init__(self, model: MetaClassifier, cfg: MamlConfig) -> None:
        self.model = model
        self.cfg = cfg
        names = [name for name, _ in model.named_parameters()]
        norms = {
            f"{module_name}.{name}"
            for module_name, module in model.named_modules()
            if isinstance(module, nn.GroupNorm)
            for name, _ in module.named_parameters(recurse=False)
        }
        if cfg.anil:
            self.adapted_names = [n for n in names if n.startswith(HEAD_PREFIX)]
        elif cfg.norm_affine:
            self.adapted_names = [n for n in names if n.startswith(HEAD_PREFIX) or n in norms]
        else:
            self.adapted_names = names
        self._replicas = threading.local()
        self._graphed = GraphedOuterGrads(self._batched_outer_grads)

    def init_meta_params(self) -> Params:
        params = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        if self.cfg.meta_sgd:
            for name in self.adapted_names:
                params[INNER_LR_PREFIX + name] = torch.full_like(params[name], self.cfg.inner_lr)
        return params

    def _module(self) -> MetaClassifier:
        # functional_call swaps parameters into the module while it runs: one replica per thread.
        if threading.current_thread() is threading.main_thread():
            return self.model
        if not hasattr(self._replicas, "model"):
            self._replicas.model = copy.deepcopy(self.model)
        return self._replicas.model

    def features(self, params: Params, x: Tensor) -> Tensor:
        backbone = {k[len(BACKBONE_PREFIX) :]: v for k, v in params.items() if k.startswith(BACKBONE_PREFIX)}
        return functional_call(self._module().backbone, backbone, (x,)).flatten(1)

    def logits(self, params: Params, x: Tensor) -> Tensor:
        return self._head_logits(params, self.features(params, x))

    def _head_logits(self, params: Params, features: Tensor) -> Tensor:
        return F.linear(features, params[HEAD_PREFIX + "weight"], params[HEAD_PREFIX + "bias"])

    def adapt(
        self,
        meta_params: Params,
        support_x: Tensor,
        support_y: Tensor,
        inner_grads: InnerGrads,
        steps: int | None = None,
        batched: bool = False,
    ) -> Callable[[Tensor], Tensor]:
        """Run the inner loop on the support set; return the adapted model as a function of images.

        ``batched``: every tensor has a leading episode dimension and the forward pass is
        ``vmap``-ed over it; the summed loss then has each episode's gradient in its own slice.
        """
        adapted = self.adapted_params(meta_params, support_x, support_y, inner_grads, steps, batched)
        features = vmap(self.features) if batched else self.features
        head = vmap(self._head_logits) if batched else self._head_logits
        backbone = {**meta_params, **adapted}
        return lambda x: head(adapted, features(backbone, x))

    def adapted_params(
        self,
        meta_params: Params,
        support_x: Tensor,
        support_y: Tensor,
        inner_grads: InnerGrads,
        steps: int | None = None,
        batched: bool = False,
    ) -> Params:
        """The inner loop's result: :meth:`inner_loop`'s state after ``steps`` steps."""
        steps = self.cfg.inner_steps if steps is None else steps
        states = self.inner_loop(meta_params, support_x, support_y, inner_grads, batched)
        return next(itertools.islice(states, steps, None))

    def inner_loop(
        self,
        meta_params: Params,
        support_x: Tensor,
        support_y: Tensor,
        inner_grads: InnerGrads,
        batched: bool = False,
    ) -> Iterator[Params]:
        """The parameters in ``adapted_names`` as the task starts, then after each inner-loop step (the others stay
        at ``meta_params``). A task starts from ``meta_params`` with the head ``maml.head-init`` says, here and
        nowhere else, so meta-training, evaluation and ``fedmeta adapt`` start alike. With ANIL only the head
        adapts, so the backbone's features are computed once; with ``maml.norm-affine`` the head and the
        normalisation's scale and shift."""
        features = vmap(self.features) if batched else self.features
        head = vmap(self._head_logits) if batched else self._head_logits
        needs_features = self.cfg.anil or self.cfg.head_init == "prototypes"
        support_features = features(meta_params, support_x) if needs_features else None
        start = {**meta_params, **self._task_head(meta_params, support_features, support_y)}
        # Views: the loop's own variables, so the support loss's gradient is partial in each (with a prototype
        # head, not also through the head's dependence on the backbone it starts from).
        adapted = {n: start[n].view_as(start[n]) for n in self.adapted_names}
        kept = {n: p for n, p in start.items() if n not in adapted}
        if self.cfg.anil:

            def support_loss(fast: Params) -> Tensor:
                return _summed_episode_loss(head(fast, support_features), support_y)
        else:

            def support_loss(fast: Params) -> Tensor:
                return _summed_episode_loss(head(fast, features({**kept, **fast}, support_x)), support_y)

        # With a zero head the support loss's gradient w.r.t. the backbone is zero at the first step, whatever the
        # backbone (it goes through the head's weight): that step differentiates the head alone.
        moving = [n for n in self.adapted_names if n.startswith(HEAD_PREFIX)] if self.cfg.head_init == "zero" else None
        while True:
            yield adapted
            names = moving or self.adapted_names
            grads = inner_grads(support_loss, adapted, names)
            # the others as fresh views: the next step's gradient is partial in them, not also through the head
            adapted = {
                n: p - self._inner_lr(meta_params, n) * grads[n] if n in grads else p.view_as(p)
                for n, p in adapted.items()
            }
            moving = None

    def _task_head(self, meta_params: Params, support_features: Tensor | None, support_y: Tensor) -> Params:
        """The head a task's inner loop starts from (with the episode dimension when the inputs have one)."""
        weight, bias = meta_params[HEAD_PREFIX + "weight"], meta_params[HEAD_PREFIX + "bias"]
        if self.cfg.head_init == "zero":
            # leaves of their own, to be differentiated in the inner loop; no outer gradient reaches the meta head
            weight, bias = (torch.zeros_like(p).requires_grad_(p.requires_grad) for p in (weight, bias))
        elif self.cfg.head_init == "prototypes":
            assert support_features is not None
            weight, bias = prototype_head(support_features, support_y, n_way=weight.shape[-2])
        return {HEAD_PREFIX + "weight": weight, HEAD_PREFIX + "bias": bias}

    def _inner_lr(self, meta_params: Params, name: str) -> Tensor | float:
        return meta_params[INNER_LR_PREFIX + name] if self.cfg.meta_sgd else self.cfg.inner_lr

    def _autograd_inner_grads(self, loss: Callable[[Params], Tensor], fast: Params, names: list[str]) -> Params:
        values = torch.autograd.grad(loss(fast), [fast[n] for n in names], create_graph=self.cfg.order == "second")
        return dict(zip(names, values, strict=True))

    @staticmethod
    def detached_inner_grads(loss: Callable[[Params], Tensor], fast: Params, names: list[str]) -> Params:
        leaves = {n: p.detach().requires_grad_(n in names) for n, p in fast.items()}
        return dict(zip(names, torch.autograd.grad(loss(leaves), [leaves[n] for n in names]), strict=True))

    def _outer_grads(self, leaves: Params, batch: EpisodeBatch, batched: bool) -> tuple[Params, Tensor]:
        """Gradients of the post-adaptation query loss w.r.t. ``leaves`` (one episode, or all
        episodes with a leading dimension when ``batched``)."""
        with torch.enable_grad():
            adapted = self.adapt(leaves, batch.support_x, batch.support_y, self._autograd_inner_grads, batched=batched)
            query_losses = (
                F.cross_entropy(adapted(batch.query_x).flatten(0, -2), batch.query_y.flatten(), reduction="none")
                .view(batch.query_y.shape)
                .mean(-1)
            )
            grads = torch.autograd.grad(query_losses.sum(), list(leaves.values()), allow_unused=True)
        return (
            {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(leaves.items(), grads, strict=True)},
            query_losses.detach(),
        )

    def per_episode_outer_grads(
        self, meta_params: Params, batch: EpisodeBatch, path: ExecutionPath | None = None
    ) -> OuterGrads:
        device = next(iter(meta_params.values())).device
        if resolve_path(path or self.cfg.path, device) == "batched":
            if device.type == "cuda" and self.cfg.cuda_graphs:
                return self._graphed(meta_params, batch)
            return self._batched_outer_grads(meta_params, batch)

        def one_episode(i: int) -> tuple[Params, Tensor]:
            leaves = {n: p.detach().requires_grad_() for n, p in meta_params.items()}
            return self._outer_grads(leaves, batch.episode(i), batched=False)

        workers = min(len(batch), torch.get_num_threads()) if device.type == "cpu" else 1
        if workers > 1:
            with intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(one_episode, range(len(batch))))
        else:
            results = [one_episode(i) for i in range(len(batch))]
        grads = {name: torch.stack([g[name] for g, _ in results]) for name in meta_params}
        return OuterGrads(grads, torch.stack([loss for _, loss in results]))

    def _batched_outer_grads(self, meta_params: Params, batch: EpisodeBatch) -> OuterGrads:
        # One leaf copy of the meta-parameters per episode: the gradient of the summed loss with
        # respect to copy e is episode e's outer-loop gradient.
        leaves = {
            n: p.detach().unsqueeze(0).expand(len(batch), *p.shape).clone().requires_grad_()
            for n, p in meta_params.items()
        }
        return OuterGrads(*self._outer_grads(leaves, batch, batched=True))

    def predict_query(self, meta_params: Params, batch: EpisodeBatch, steps: int | None = None) -> Tensor:
        """Few-shot evaluation: adapt on each episode's support set, return query class probabilities
        ``[E, Q, N]``."""
        probs = []
        for i in range(len(batch)):
            with torch.enable_grad():
                adapted = self.adapt(
                    meta_params, batch.support_x[i], batch.support_y[i], self.detached_inner_grads, steps
                )
            with torch.no_grad():
                probs.append(adapted(batch.query_x[i]).softmax(-1))
        return torch.stack(probs)


def prototype_head(features: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
    """Proto-MAML's head (Triantafillou et al. 2020) from ``[..., S, D]`` features and ``[..., S]`` labels: weight
    row k is 2 c_k and bias k is -|c_k|^2, with c_k the mean feature of class k's scans (zero for a class with none),
    so logit k is -|x - c_k|^2 up to a term shared by all classes."""
    members = (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).to(features.dtype)  # [..., S, N]
    prototypes = members.transpose(-1, -2) @ features / members.sum(-2).clamp(min=1).unsqueeze(-1)
    return 2 * prototypes, -prototypes.square().sum(-1)


def _summed_episode_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy per episode, summed over episodes (``[..., S, N]`` logits, ``[..., S]`` labels)."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum") / labels.shape[-1]


class GraphedOuterGrads:
    """Replays a CUDA graph of the batched meta-gradient step, one graph per shape.

    At a meta-batch of 16 small episodes the GPU waits on kernel launches (thousands per step);
    a graph launches them all at once.
    """

    def __init__(self, step: Callable[[Params, EpisodeBatch], OuterGrads]) -> None:
        self.step = step
        self.graphs: dict[tuple, tuple[Params, EpisodeBatch, torch.cuda.CUDAGraph, OuterGrads]] = {}

    def __call__(self, meta_params: Params, batch: EpisodeBatch) -> OuterGrads:
        key = (
            tuple((n, tuple(p.shape), p.dtype) for n, p in meta_params.items()),
            tuple((tuple(t.shape), t.dtype) for t in _tensors(batch)),
        )
        if key not in self.graphs:
            self.graphs[key] = self._capture(meta_params, batch)
        static_params, static_batch, graph, static_out = self.graphs[key]
        for name, p in meta_params.items():
            static_params[name].copy_(p)
        for static, fresh in zip(_tensors(static_batch), _tensors(batch), strict=True):
            static.copy_(fresh)
        graph.replay()
        return OuterGrads({n: g.clone() for n, g in static_out.grads.items()}, static_out.query_losses.clone())

    def _capture(self, meta_params: Params, batch: EpisodeBatch) -> tuple:
        static_params = {n: p.detach().clone() for n, p in meta_params.items()}
        static_batch = EpisodeBatch(*(t.clone() for t in _tensors(batch)))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step(static_params, static_batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.step(static_params, static_batch)
        return static_params, static_batch, graph, static_out


def _tensors(batch: EpisodeBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return batch.support_x, batch.support_y, batch.query_x, batch.query_y
