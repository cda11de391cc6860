"""A hospital's private meta-training steps, in the one order the privacy promise depends on.

For each step, under the ledger's exclusive lock: calibrate (the noise the ledger pinned), check (one
more step fits the budget), compute (the per-episode outer-loop gradients of the Poisson-sampled groups),
record (the step is durable on disk) and only then release (Opacus clips, sums and adds noise). Nothing
outside this object sees a gradient that the ledger does not already hold.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from client.ledger import BudgetExhausted, LedgerTerms, PrivacyLedger
from client.privacy import NoiseCalibration, PrivateRelease, calibrate_accountant_noise
from shared.config import PrivacyConfig
from shared.maml import OuterGrads, Params


@dataclass(frozen=True)
class PrivateSteps:
    released: list[Params]  # one noisy mean outer-loop gradient per step
    outers: list[OuterGrads]  # what they were computed from; stays at the hospital
    epsilon: float  # the hospital's lifetime spend after these steps
    delta: float


def new_ledger_delta(privacy: PrivacyConfig, units: int) -> float:
    """A new ledger's delta: the policy's, or 1 / (10 x privacy units) when the hospital is smaller."""
    return min(privacy.delta, 1.0 / (10 * max(units, 1)))


class PrivateTraining:
    def __init__(self, ledger_path: Path, privacy: PrivacyConfig, units: int) -> None:
        self.ledger_path = ledger_path
        self.privacy = privacy
        self.units = units

    def open_ledger(self) -> PrivacyLedger:
        terms = LedgerTerms(self.privacy.accountant, new_ledger_delta(self.privacy, self.units))
        return PrivacyLedger.open(self.ledger_path, terms, self.privacy.target_epsilon)

    def calibration(self, ledger: PrivacyLedger) -> NoiseCalibration:
        """The ledger's pinned noise, calibrated at the first step from the budget and the planned releases;
        a run may ask for more noise (stricter), never less."""
        privacy = self.privacy
        pinned = ledger.noise_multiplier
        if pinned is None:
            budget, releases = ledger.epsilon_budget, privacy.planned_releases
            pinned = privacy.noise_multiplier or calibrate_accountant_noise(
                budget, ledger.delta, privacy.sample_rate, releases
            )
        return NoiseCalibration(max(pinned, privacy.noise_multiplier), privacy.max_grad_norm)

    def run(
        self, meta_params: Params, steps: int, outer_grads: Callable[[str], OuterGrads]
    ) -> PrivateSteps | BudgetExhausted:
        """Up to ``steps`` private releases; ``outer_grads(grouping_key)`` computes one step's per-group gradients.

        Stops early (keeping what was released) when the budget runs out, and refuses when not one step fits."""
        privacy = self.privacy
        with PrivacyLedger.locked(self.ledger_path):
            ledger = self.open_ledger()
            calibration = self.calibration(ledger)
            delta = min(ledger.delta, privacy.delta)
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
