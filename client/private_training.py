"""A hospital's private meta-training steps, in the one order the privacy promise depends on.

For each step, under the ledger's exclusive lock: calibrate (the noise the ledger pinned), check (one
more step fits the budget), compute (the per-episode outer-loop gradients of the Poisson-sampled groups),
record (the step is durable on disk) and only then release (Opacus clips, sums and adds noise). Nothing
outside this object sees a gradient that the ledger does not already hold.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from client.ledger import BudgetExhausted, LedgerTerms, PrivacyLedger
from client.policy import HospitalPolicy
from client.privacy import NoiseCalibration, PrivateRelease, calibrate_accountant_noise
from shared.config import PrivacyConfig
from shared.learning.maml import OuterGrads, Params


@dataclass(frozen=True)
class PrivateSteps:
    released: list[Params]  # one noisy mean outer-loop gradient per step
    outers: list[OuterGrads]  # what they were computed from; stays at the hospital
    epsilon: float  # the hospital's lifetime spend after these steps
    delta: float


def new_ledger_delta(delta: float, units: int) -> float:
    """A new ledger's delta: the policy's, or for a hospital of more than 1 / (10 delta) privacy units the power of
    10 at or below 1 / (10 x units) (a power of 10, so the delta a reply carries tells the size to a factor of 10
    at most)."""
    bound = 1.0 / (10 * max(units, 1))
    return delta if delta <= bound else min(delta, 10.0 ** math.floor(math.log10(bound)))


class PrivateTraining:
    """``privacy`` is what this run trains with (the policy governed it); ``policy`` alone calibrates the noise a
    new ledger pins, so no run can set a hospital's noise for later runs."""

    def __init__(self, ledger_path: Path, privacy: PrivacyConfig, policy: HospitalPolicy, units: int) -> None:
        self.ledger_path = ledger_path
        self.privacy = privacy
        self.policy = policy
        self.units = units

    def open_ledger(self) -> PrivacyLedger:
        terms = LedgerTerms(self.policy.accountant, new_ledger_delta(self.policy.delta, self.units))
        return PrivacyLedger.open(self.ledger_path, terms, self.privacy.target_epsilon)

    def pinned_noise(self, ledger: PrivacyLedger) -> float:
        """The ledger's noise multiplier, or for a new ledger the policy's: fixed, or calibrated to spend the
        policy's budget in its planned releases at its sample rate."""
        if ledger.noise_multiplier is not None:
            return ledger.noise_multiplier
        policy = self.policy
        return policy.noise_multiplier or calibrate_accountant_noise(
            policy.epsilon_budget, ledger.delta, policy.sample_rate, policy.planned_releases
        )

    def calibration(self, ledger: PrivacyLedger) -> NoiseCalibration:
        """The pinned noise, or more when the run asks for more (for its own releases; nothing of it is pinned)."""
        noise = max(self.pinned_noise(ledger), self.privacy.noise_multiplier)
        return NoiseCalibration(noise, self.privacy.max_grad_norm)

    def release_delta(self, ledger: PrivacyLedger) -> float:
        """The delta a release is accounted at: the ledger's, or the run's when smaller."""
        return min(ledger.delta, self.privacy.delta)

    def warm_up(self) -> None:
        """What a process's first release computes once, computed ahead with nothing written: a new ledger's noise
        calibration (seconds) and, with RDP, the curve of the next step (cached per process; PRV's epsilon is
        computed afresh at every check)."""
        with PrivacyLedger.locked(self.ledger_path):
            ledger = self.open_ledger()
        calibration = self.calibration(ledger)
        if ledger.accountant_kind == "rdp":
            noise, rate = calibration.accountant_noise_multiplier, self.privacy.sample_rate
            ledger.check(noise, rate, delta=self.release_delta(ledger))

    def run(
        self, meta_params: Params, steps: int, outer_grads: Callable[[str], OuterGrads]
    ) -> PrivateSteps | BudgetExhausted:
        """Up to ``steps`` private releases; ``outer_grads(grouping_key)`` computes one step's per-group gradients.

        Stops early (keeping what was released) when the budget runs out, and refuses when not one step fits."""
        privacy = self.privacy
        with PrivacyLedger.locked(self.ledger_path):
            ledger = self.open_ledger()
            ledger.noise_multiplier = self.pinned_noise(ledger)  # written with the first step
            calibration = self.calibration(ledger)
            delta = self.release_delta(ledger)
            device = next(iter(meta_params.values())).device
            noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
            release = PrivateRelease(meta_params, calibration, privacy.groups_per_step, generator=noise)
            released, outers = [], []
            for _ in range(steps):
                refusal = ledger.check(calibration.accountant_noise_multiplier, privacy.sample_rate, delta=delta)
                if refusal is not None:
                    if not released:
                        return refusal
                    break
                outer = outer_grads(ledger.grouping_key)
                ledger.record(calibration.accountant_noise_multiplier, privacy.sample_rate)  # durable first
                outers.append(outer)
                released.append(release.release(outer))
            return PrivateSteps(released, outers, ledger.epsilon(delta=delta), delta)
