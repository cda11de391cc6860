"""The functional MAML core: functions of (meta-parameters, episode batch), no module state.

Meta-parameters are a flat ``dict[str, Tensor]``: the model's parameters by name, plus, with
Meta-SGD, one learned inner learning rate per adapted parameter under ``inner_lr.<name>``.
The module is used only as an architecture through ``functional_call``.

Per-episode outer-loop gradients (what DP clips) come from two execution paths over the same
inner loop:

* ``loop``: one episode at a time with reverse-mode autograd, spread over a small thread pool
  with one intra-op thread each (measured on 2 CPU cores: 1.15x over one episode at a time on
  two intra-op threads, and torch.func.grad per episode is 25% slower than autograd here);
* ``batched``: ``torch.func.vmap(torch.func.grad(...))`` over episodes, which turns the
  convolutions into large batched kernels: 4.5-18x the loop on a GPU, slower on a CPU.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from shared.config import ExecutionPath, MamlConfig
from shared.models import BACKBONE_PREFIX, HEAD_PREFIX, MetaClassifier

Params = dict[str, Tensor]
InnerGrads = Callable[[Callable[[Params], Tensor], Params], Params]
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

    def select(self, index: int | slice | Tensor) -> EpisodeBatch:
        """Episodes at ``index``, keeping the leading episode dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return EpisodeBatch(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index])


@dataclass(frozen=True)
class OuterGrads:
    """Per-episode outer-loop gradients ``[E, *param.shape]`` and post-adaptation query losses ``[E]``."""

    grads: Params
    query_losses: Tensor

    def mean(self) -> Params:
        return {name: g.mean(0) for name, g in self.grads.items()}


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_path(path: ExecutionPath, device: torch.device) -> ExecutionPath:
    if path != "auto":
        return path
    return "batched" if device.type == "cuda" else "loop"


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
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
        self.adapted_names = [n for n in names if n.startswith(HEAD_PREFIX)] if cfg.anil else names
        self._replicas = threading.local()

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
    ) -> Callable[[Tensor], Tensor]:
        """Run the inner loop on the support set; return the adapted model as a function of images.

        With ANIL only the head adapts, so the backbone's features are computed once.
        """
        steps = self.cfg.inner_steps if steps is None else steps
        adapted = {n: meta_params[n] for n in self.adapted_names}
        if self.cfg.anil:
            support_features = self.features(meta_params, support_x)

            def support_loss(fast: Params) -> Tensor:
                return F.cross_entropy(self._head_logits(fast, support_features), support_y)
        else:

            def support_loss(fast: Params) -> Tensor:
                return F.cross_entropy(self.logits(fast, support_x), support_y)

        for _ in range(steps):
            grads = inner_grads(support_loss, adapted)
            adapted = {n: p - self._inner_lr(meta_params, n) * grads[n] for n, p in adapted.items()}
        if self.cfg.anil:
            return lambda x: self._head_logits(adapted, self.features(meta_params, x))
        return lambda x: self.logits(adapted, x)

    def _inner_lr(self, meta_params: Params, name: str) -> Tensor | float:
        return meta_params[INNER_LR_PREFIX + name] if self.cfg.meta_sgd else self.cfg.inner_lr

    # -- inner-loop differentiation: torch.func for the batched path, autograd for the loop --

    def _func_inner_grads(self, loss: Callable[[Params], Tensor], fast: Params) -> Params:
        grads = grad(loss)(fast)
        if self.cfg.order == "first":
            grads = {n: g.detach() for n, g in grads.items()}
        return grads

    def _autograd_inner_grads(self, loss: Callable[[Params], Tensor], fast: Params) -> Params:
        values = torch.autograd.grad(loss(fast), list(fast.values()), create_graph=self.cfg.order == "second")
        return dict(zip(fast, values, strict=True))

    @staticmethod
    def _no_graph_inner_grads(loss: Callable[[Params], Tensor], fast: Params) -> Params:
        leaves = {n: p.detach().requires_grad_() for n, p in fast.items()}
        return dict(zip(fast, torch.autograd.grad(loss(leaves), list(leaves.values())), strict=True))

    # -- outer loop --

    def _outer_loss_func(
        self, meta_params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Tensor, Tensor]:
        adapted = self.adapt(meta_params, sx, sy, self._func_inner_grads)
        loss = F.cross_entropy(adapted(qx), qy)
        return loss, loss.detach()

    def _episode_outer_grad_autograd(self, meta_params: Params, batch: EpisodeBatch, i: int) -> tuple[Params, Tensor]:
        leaves = {n: p.detach().requires_grad_() for n, p in meta_params.items()}
        with torch.enable_grad():
            adapted = self.adapt(leaves, batch.support_x[i], batch.support_y[i], self._autograd_inner_grads)
            loss = F.cross_entropy(adapted(batch.query_x[i]), batch.query_y[i])
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return (
            {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(leaves.items(), grads, strict=True)},
            loss.detach(),
        )

    def per_episode_outer_grads(
        self, meta_params: Params, batch: EpisodeBatch, path: ExecutionPath | None = None
    ) -> OuterGrads:
        device = next(iter(meta_params.values())).device
        chosen = resolve_path(path or self.cfg.path, device)
        if chosen == "batched":
            per_episode = grad(self._outer_loss_func, has_aux=True)
            grads, losses = vmap(per_episode, in_dims=(None, 0, 0, 0, 0))(
                meta_params, batch.support_x, batch.support_y, batch.query_x, batch.query_y
            )
            return OuterGrads(grads, losses)
        workers = min(len(batch), torch.get_num_threads()) if device.type == "cpu" else 1
        if workers > 1:
            with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
                results = list(
                    pool.map(lambda i: self._episode_outer_grad_autograd(meta_params, batch, i), range(len(batch)))
                )
        else:
            results = [self._episode_outer_grad_autograd(meta_params, batch, i) for i in range(len(batch))]
        grads = {name: torch.stack([g[name] for g, _ in results]) for name in meta_params}
        return OuterGrads(grads, torch.stack([loss for _, loss in results]))

    def predict_query(self, meta_params: Params, batch: EpisodeBatch, steps: int | None = None) -> Tensor:
        """Few-shot evaluation: adapt on each episode's support set, return query class probabilities
        ``[E, Q, N]``."""
        probs = []
        for i in range(len(batch)):
            with torch.enable_grad():
                adapted = self.adapt(
                    meta_params, batch.support_x[i], batch.support_y[i], self._no_graph_inner_grads, steps
                )
            with torch.no_grad():
                probs.append(adapted(batch.query_x[i]).softmax(-1))
        return torch.stack(probs)
