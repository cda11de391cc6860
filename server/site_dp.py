"""Site-level DP: the meta-model protects each hospital's whole contribution, not only one record.

A wrapper strategy in the shape of Flower's ``DifferentialPrivacyServerSideFixedClipping``
(``flwr/serverapp/strategy/dp_fixed_clipping.py``): it holds the meta-gradient strategy, delegates
evaluation to it, and puts clip-and-noise between accepting the replies and stepping the
meta-optimizer (Flower's wrapper clips ``client arrays - global arrays``; here a reply is already a
gradient, so the gradient itself is clipped). Each round:

1. Poisson-sample the hospitals: each eligible one independently with probability
   ``q = server.fraction-train``, from the operating system's randomness (``secrets``), so nobody can
   replay which hospitals took part;
2. clip each usable reply's gradient to ``server.site-clip`` C (flat L2 over all arrays) and sum;
3. add Gaussian noise of std ``server.site-noise-multiplier`` z times C, drawn from a
   ``torch.Generator`` seeded from ``secrets`` every round: never from the run seed, never checkpointed;
4. divide by the expected number sampled, ``q`` x eligible hospitals (dividing by the realised count
   would tell which hospitals took part);
5. account the release with Opacus' RDP accountant as one Poisson-subsampled Gaussian step
   (noise multiplier z, sample rate q): adding or removing one hospital changes the sum by at most C.

Every round with an eligible hospital releases and is accounted, even when fewer than
``server.min-train-nodes`` replies were usable (then mostly noise): skipping the release on the number
of usable replies would itself depend on the hospitals' data. Sampling under site-level DP is not
reproducible from ``seed``; evaluation sampling, and training sampling without site-level DP, are.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Iterable
from random import SystemRandom

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from opacus.accountants import RDPAccountant

from server.strategy import Accepted, MetaGradientStrategy
from shared.accounting import check_history
from shared.config import ConfigError
from shared.learning.maml import Params

log = logging.getLogger(__name__)


class SiteLevelDP(Strategy):
    def __init__(self, strategy: MetaGradientStrategy, noise_multiplier: float, clipping_norm: float, delta: float):
        super().__init__()
        if noise_multiplier <= 0 or clipping_norm <= 0 or not 0 < delta < 1:
            raise ConfigError(
                "with server.site-dp=true, server.site-noise-multiplier and server.site-clip must be > 0 "
                "and server.site-delta in (0, 1)"
            )
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.delta = delta
        self.sample_rate = strategy.cfg.server.fraction_train
        self.accountant = RDPAccountant()
        self.accountant.history = [(float(z), float(q), int(n)) for z, q, n in strategy.site_accountant]
        self.spent = self.epsilon()
        self.expected_hospitals = 0.0

    def __repr__(self) -> str:
        return "Site-level DP wrapper (server-side fixed clipping, Poisson-sampled hospitals)"

    def summary(self) -> None:
        log.info(
            "site-level DP: clip %.4g, noise multiplier %.4g, hospitals Poisson-sampled at rate %.4g, delta %.3g",
            self.clipping_norm,
            self.noise_multiplier,
            self.sample_rate,
            self.delta,
        )
        self.strategy.summary()

    def epsilon(self) -> float | None:
        if not self.accountant.history:
            return None
        check_history("rdp", self.accountant.history, self.delta)
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, just loose
            warnings.simplefilter("ignore", UserWarning)
            return float(self.accountant.get_epsilon(delta=self.delta))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        eligible = self.strategy.begin_train_round(server_round, grid)
        coins = SystemRandom()
        chosen = [node for node in eligible if coins.random() < self.sample_rate]
        self.expected_hospitals = self.sample_rate * len(eligible)
        self.strategy.record.site_epsilon = self.spent
        return self.strategy.train_messages(chosen, arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.strategy.accept_replies(replies)
        if self.expected_hospitals == 0:  # no hospital could be sampled: nothing is released
            return None, None
        if len(accepted) < self.strategy.cfg.server.min_train_nodes:
            log.warning(
                "round %d: %d usable replies < server.min-train-nodes: the site-level DP release goes ahead",
                self.strategy.record.round,
                len(accepted),
            )
        private = self.private_mean(accepted)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.strategy.site_accountant = [list(step) for step in self.accountant.history]
        self.spent = self.epsilon()
        self.strategy.record.site_epsilon = self.spent
        return self.strategy.apply_outer_grad(private, accepted)

    def private_mean(self, accepted: list[Accepted]) -> Params:
        """Clip each hospital's gradient to C, sum, add N(0, (z C)^2) per coordinate, divide by the expected count."""
        shapes = {n: tuple(p.shape) for n, p in self.strategy.params.items()}
        total = {n: torch.zeros(shape, dtype=torch.float64) for n, shape in shapes.items()}
        for grads, _ in accepted:
            norm = math.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads.values()))
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            for name, g in grads.items():
                total[name] += torch.from_numpy(np.asarray(g, dtype=np.float64)) * scale
        noise = torch.Generator().manual_seed(secrets.randbits(64))
        std = self.noise_multiplier * self.clipping_norm
        noisy = {n: t + std * torch.randn(shapes[n], generator=noise, dtype=torch.float64) for n, t in total.items()}
        return {name: (t / self.expected_hospitals).float() for name, t in noisy.items()}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
