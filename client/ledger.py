"""The hospital's durable privacy ledger.

One JSON file on the hospital's disk holds the accountant's history of (noise multiplier, sample
rate, steps), the budget, the noise calibrated for it (fixed at the first release, so later
config changes cannot quietly reset it) and the secret key that assigns records to episode
groups. Every release is written here, atomically, *before* the gradient leaves the process; a
restarted client continues from the file, and a release that would pass the budget is refused.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from client.privacy import spent_epsilon
from shared.atomic import atomic_write_json
from shared.config import Accountant, PrivacyConfig
from shared.errors import UserError

LEDGER_VERSION = 1


class LedgerError(UserError):
    """The ledger file is unreadable or belongs to other privacy settings."""


@dataclass(frozen=True)
class BudgetExhausted:
    """Why a hospital refused to train: the next release would pass its budget."""

    epsilon_spent: float
    epsilon_next: float
    epsilon_budget: float

    def __str__(self) -> str:
        return (
            f"privacy budget exhausted: epsilon spent {self.epsilon_spent:.3f}, the next release would reach "
            f"{self.epsilon_next:.3f} > budget {self.epsilon_budget:.3f}"
        )


class PrivacyLedger:
    def __init__(self, path: Path, accountant: Accountant, delta: float, epsilon_budget: float) -> None:
        self.path = path
        self.accountant_kind = accountant
        self.delta = delta
        self.epsilon_budget = epsilon_budget
        self.history: list[tuple[float, float, int]] = []
        self.noise_multiplier: float | None = None
        self.grouping_key = secrets.token_hex(32)

    @classmethod
    def open(cls, path: Path, privacy: PrivacyConfig) -> PrivacyLedger:
        """Load the ledger at ``path``, or start an empty one (written at the first release)."""
        ledger = cls(path, privacy.accountant, privacy.delta, privacy.target_epsilon)
        if not path.exists():
            return ledger
        try:
            state = json.loads(path.read_text())
            if state["version"] != LEDGER_VERSION:
                raise LedgerError(
                    f"privacy ledger {path.name} has version {state['version']}, expected {LEDGER_VERSION}"
                )
            ledger.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]
            ledger.noise_multiplier = state["noise_multiplier"]
            ledger.grouping_key = state["grouping_key"]
            recorded = (state["accountant"], state["delta"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger {path.name} is unreadable ({type(err).__name__}); restore it from backup — "
                "deleting it would forget the privacy already spent"
            ) from None
        if recorded != (privacy.accountant, privacy.delta):
            raise LedgerError(
                f"privacy ledger {path.name} was kept with accountant={recorded[0]}, delta={recorded[1]}; "
                f"keep those settings (now accountant={privacy.accountant}, delta={privacy.delta})"
            )
        return ledger

    def epsilon(self, extra: tuple[float, float, int] | None = None) -> float:
        return spent_epsilon(self.accountant_kind, self.history + ([extra] if extra else []), self.delta)

    def check(self, noise_multiplier: float, sample_rate: float) -> BudgetExhausted | None:
        """``None`` when one more step fits the budget, else why not."""
        spent = self.epsilon()
        following = self.epsilon((noise_multiplier, sample_rate, 1))
        if following > self.epsilon_budget:
            return BudgetExhausted(spent, following, self.epsilon_budget)
        return None

    def record(self, noise_multiplier: float, sample_rate: float) -> None:
        """Add one step and write the ledger durably; call before the gradient is released."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))
        self.noise_multiplier = noise_multiplier
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.path,
            {
                "version": LEDGER_VERSION,
                "accountant": self.accountant_kind,
                "delta": self.delta,
                "epsilon_budget": self.epsilon_budget,
                "noise_multiplier": self.noise_multiplier,
                "history": [list(step) for step in self.history],
                "epsilon_spent": self.epsilon(),
                "grouping_key": self.grouping_key,
            },
        )
