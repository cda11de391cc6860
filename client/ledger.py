"""The hospital's durable privacy ledger.

One JSON file on the hospital's disk (mode 0600, in an owner-only folder) holds the accountant's history of
(noise multiplier, sample rate, steps), the delta and the noise pinned when the ledger was created (so later
config changes cannot quietly reset them), the budget last checked against (the policy's, which the hospital
alone may change), the secret key that assigns records to
episode groups and the evaluation answers given. Every release is written here, atomically and with its
folder fsynced, *before* the gradient leaves the process; a restarted client continues from the file.
Readers and writers of one ledger hold an exclusive file lock (:meth:`PrivacyLedger.locked`), so two
processes training one hospital at once add up their steps instead of overwriting each other's.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from client.privacy import spent_epsilon
from shared.atomic import PRIVATE_FILE, atomic_write_json, private_dir
from shared.config import Accountant
from shared.errors import UserError

LEDGER_FILE = "privacy-ledger.json"
LEDGER_VERSION = 2
GROUPING_KEY = re.compile(r"^[0-9a-f]{64}$")


class LedgerError(UserError):
    """The ledger file is unreadable, inconsistent, or belongs to other privacy settings."""


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


@dataclass(frozen=True)
class LedgerTerms:
    """What a new ledger pins for life: the accountant and delta (the noise multiplier is pinned at its first step)."""

    accountant: Accountant
    delta: float


class PrivacyLedger:
    def __init__(self, path: Path, terms: LedgerTerms, epsilon_budget: float) -> None:
        self.path = path
        self.accountant_kind = terms.accountant
        self.delta = terms.delta
        self.noise_multiplier: float | None = None
        self.epsilon_budget = epsilon_budget
        self.history: list[tuple[float, float, int]] = []
        self.grouping_key = secrets.token_hex(32)
        self.evaluations_answered = 0

    @classmethod
    @contextmanager
    def locked(cls, path: Path) -> Iterator[None]:
        """Hold the ledger's exclusive lock (across processes and threads) for a read-check-record sequence."""
        private_dir(path.parent)
        lock_path = path.with_name(path.name + ".lock")
        with os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE), "r+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @classmethod
    def open(cls, path: Path, terms: LedgerTerms, epsilon_budget: float) -> PrivacyLedger:
        """Load the ledger at ``path``, or start one on ``terms`` (written at the first release).

        An existing ledger keeps its own terms; the caller's accountant must match, and the budget is the
        policy's (a hospital grants more, or less, by changing its policy)."""
        ledger = cls(path, terms, epsilon_budget)
        if not path.exists():
            return ledger
        try:
            state = json.loads(path.read_text())
            version = state["version"]
            if version not in (1, LEDGER_VERSION):
                raise LedgerError(f"privacy ledger {path.name} has version {version}, expected {LEDGER_VERSION}")
            ledger._load(state)
        except LedgerError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger {path.name} is unreadable ({type(err).__name__}); restore it from backup — "
                "deleting it would forget the privacy already spent"
            ) from None
        if ledger.accountant_kind != terms.accountant:
            raise LedgerError(
                f"privacy ledger {path.name} was kept with accountant={ledger.accountant_kind}; keep it in the "
                f"policy (now accountant={terms.accountant})"
            )
        return ledger

    def _load(self, state: dict[str, Any]) -> None:
        """Take every field from ``state``, refusing any value no real release could have written."""
        where = f"privacy ledger {self.path.name}"
        accountant, delta, noise = state["accountant"], float(state["delta"]), state["noise_multiplier"]
        if accountant not in get_args(Accountant):
            raise LedgerError(f"{where}: accountant {accountant!r} is not one of {get_args(Accountant)}")
        if not 0 < delta < 1:
            raise LedgerError(f"{where}: delta {delta} is not in (0, 1)")
        history = []
        for entry in state["history"]:
            z, q, n = float(entry[0]), float(entry[1]), entry[2]
            if not (math.isfinite(z) and z > 0 and 0 < q <= 1 and isinstance(n, int) and n >= 1):
                raise LedgerError(
                    f"{where}: history entry {entry} is impossible (needs noise > 0, 0 < q <= 1, steps >= 1); "
                    "restore the ledger from backup"
                )
            history.append((z, q, n))
        if noise is not None and not (math.isfinite(float(noise)) and float(noise) > 0):
            raise LedgerError(f"{where}: noise multiplier {noise} must be > 0")
        key = state["grouping_key"]
        answered = state.get("evaluations_answered", 0)
        if not isinstance(key, str) or not GROUPING_KEY.match(key):
            raise LedgerError(f"{where}: the grouping key is damaged; restore the ledger from backup")
        if not isinstance(answered, int) or answered < 0:
            raise LedgerError(f"{where}: evaluations_answered {answered!r} must be a count >= 0")
        self.accountant_kind, self.delta = accountant, delta
        self.noise_multiplier = None if noise is None else float(noise)
        self.history, self.grouping_key, self.evaluations_answered = history, key, answered

    def epsilon(self, extra: tuple[float, float, int] | None = None, delta: float | None = None) -> float:
        history = self.history + ([extra] if extra else [])
        return spent_epsilon(self.accountant_kind, history, self.delta if delta is None else delta)

    def check(
        self, noise_multiplier: float, sample_rate: float, budget: float | None = None, delta: float | None = None
    ) -> BudgetExhausted | None:
        """``None`` when one more step fits the budget (the ledger's, or a stricter one), else why not."""
        budget = self.epsilon_budget if budget is None else min(budget, self.epsilon_budget)
        spent = self.epsilon(delta=delta)
        following = self.epsilon((noise_multiplier, sample_rate, 1), delta=delta)
        if following > budget:
            return BudgetExhausted(spent, following, budget)
        return None

    def record(self, noise_multiplier: float, sample_rate: float) -> None:
        """Add one step and write the ledger durably; call before the gradient is released."""
        if not (noise_multiplier > 0 and 0 < sample_rate <= 1):
            raise LedgerError(f"refusing to record noise {noise_multiplier}, sample rate {sample_rate}")
        if self.noise_multiplier is None:
            raise LedgerError("a ledger's noise multiplier is pinned before its first step")
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))
        self.save()

    def record_evaluation(self) -> None:
        self.evaluations_answered += 1
        self.save()

    def save(self) -> None:
        private_dir(self.path.parent)
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
                "evaluations_answered": self.evaluations_answered,
            },
        )
