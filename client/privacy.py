"""Differential privacy for outer-loop gradients, with Opacus doing the clipping, noise and accounting.

Privacy unit: one record (a scan, or a patient when patient ids exist) at one hospital, under
remove-one-record adjacency. Records go into a fixed number of episode groups by a keyed hash of
the record id (a rule that does not look at any other record), groups are Poisson-sampled each
meta-step, and each sampled group yields one episode and one clipped outer-loop gradient.
Removing a record changes at most one group's clipped gradient ``g`` into another ``g'`` with
``|g|, |g'| <= C``, so the L2 sensitivity of the summed clipped gradients is ``2C``.

Opacus' ``DPOptimizer`` adds noise of std ``noise_multiplier * C``; the accountant must be told
``std / sensitivity = noise_multiplier / 2``. :class:`PrivateRelease` owns that conversion.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer

from shared.accounting import check_history
from shared.config import Accountant
from shared.learning.maml import OuterGrads, Params

SENSITIVITY_IN_CLIP_NORMS = 2.0


def make_accountant(kind: Accountant) -> IAccountant:
    return {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]()


def spent_epsilon(kind: Accountant, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of an accountant history of (noise multiplier, sample rate, steps)."""
    if not history:
        return 0.0
    check_history(kind, history, delta)  # PRV's grid grows without bound as the noise shrinks
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, just loose
        warnings.simplefilter("ignore", UserWarning)
        if kind == "rdp":  # what RDPAccountant computes, with each (sigma, q) pair's RDP curve computed once
            orders = RDPAccountant.DEFAULT_ALPHAS
            rdp = sum(steps * _rdp_per_step(sigma, q) for sigma, q, steps in history)
            return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])
        accountant = make_accountant(kind)
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    # The fractional orders cost ~0.3 s per curve: uncached, every release paid it four times.
    return np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
        )
    )


@lru_cache(maxsize=64)
def calibrate_accountant_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Noise multiplier (std over sensitivity) that spends ``target_epsilon`` in ``steps`` steps.

    Always by RDP: PRV's bisection would try noise levels whose grid takes unbounded memory, and PRV's
    epsilon is never above RDP's, so the RDP noise keeps a PRV ledger within the budget too.
    Cached: the search takes about a second, and every hospital of a run asks the same question
    at its first release (at 1,000 simulated hospitals, each sampled hospital is a first)."""
    with warnings.catch_warnings():  # the search's epsilons: the bound is valid, just loose
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha", UserWarning)
        return get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
        )


@dataclass(frozen=True)
class NoiseCalibration:
    """The accountant's noise multiplier and the std Opacus must add for it."""

    accountant_noise_multiplier: float
    max_grad_norm: float

    @property
    def sensitivity(self) -> float:
        return SENSITIVITY_IN_CLIP_NORMS * self.max_grad_norm

    @property
    def noise_std(self) -> float:
        return self.accountant_noise_multiplier * self.sensitivity

    @property
    def opacus_noise_multiplier(self) -> float:
        return self.noise_std / self.max_grad_norm


def zero_diverged(outer: OuterGrads) -> Params:
    """The per-episode gradients with every episode that is not finite in some parameter set to zero."""
    rows = [g.flatten(1).isfinite().all(1) for g in outer.grads.values()]
    if not rows:
        return dict(outer.grads)
    finite = torch.stack(rows).all(0)
    return {n: torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, 0.0) for n, g in outer.grads.items()}


class PrivateRelease:
    """Clips per-episode outer-loop gradients, sums them and adds Gaussian noise with Opacus'
    ``DPOptimizer``; the result is the mean gradient over the expected number of episodes.

    Opacus' GradSampleModule cannot see through a MAML inner loop, so the per-episode meta-gradients
    are written into ``p.grad_sample`` directly and ``pre_step()`` turns them into ``p.grad``.
    """

    def __init__(
        self,
        meta_params: Params,
        calibration: NoiseCalibration,
        expected_episodes: float,
        generator: torch.Generator | None = None,
    ) -> None:
        self.calibration = calibration
        self.params = {n: torch.nn.Parameter(v.detach().clone()) for n, v in meta_params.items()}
        self.optimizer = DPOptimizer(
            torch.optim.SGD(list(self.params.values()), lr=0.0),
            noise_multiplier=calibration.opacus_noise_multiplier,
            max_grad_norm=calibration.max_grad_norm,
            expected_batch_size=max(1, round(expected_episodes)),
            loss_reduction="mean",
            generator=generator,
        )

    def _load(self, outer: OuterGrads) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        # A diverged episode counts as a zero gradient: the release stays finite and private, and
        # whether an episode diverged (which the server can provoke) does not show in the reply.
        grads = zero_diverged(outer)
        for name, p in self.params.items():
            p.grad_sample = grads[name].to(p.dtype)

    def release(self, outer: OuterGrads) -> Params:
        self._load(outer)
        self.optimizer.pre_step()
        released = {name: p.grad.detach().clone() for name, p in self.params.items()}
        self.optimizer.zero_grad(set_to_none=True)
        return released

    def clipped_sum(self, outer: OuterGrads) -> Params:
        """The summed clipped gradients before noise (what the sensitivity bound is about)."""
        self._load(outer)
        self.optimizer.clip_and_accumulate()
        summed = {name: p.summed_grad.detach().clone() for name, p in self.params.items()}
        self.optimizer.zero_grad(set_to_none=True)
        return summed
