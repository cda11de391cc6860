"""Limits on privacy accounting: a history whose epsilon would take unbounded memory or time is refused.

An accountant history is a list of (noise multiplier, sample rate, steps). RDP costs the same whatever
the history holds. Opacus' PRV accountant discretises the privacy-loss distribution on a grid of
``2 L / mesh`` points, where ``L`` (the privacy loss it must cover) grows as the noise shrinks and
``mesh`` shrinks with ``eps_error`` and with the square root of the number of steps; it holds about
160 bytes per grid point. Measured here (opacus 1.6, q = 0.25, delta = 1e-5, eps_error = 0.01, 100 steps
unless said): noise 0.5: 0.65 M points, 1.6 s, +110 MB; noise 0.3: 1.8 M, 4.1 s, +310 MB; noise 0.2:
4.3 M, 4.2 s, +280 MB; noise 0.1: 27 M, 101 s, +4.4 GB (and the answer is infinity); noise 0.5 over
1,000 steps: 9.0 M, 30 s, +1.5 GB; over 10,000 steps: 196 M points, out of memory at 8 GB.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from shared.errors import UserError

# Up to ~800 MB and ~20 s of PRV accounting (the measurements above); larger grids are refused.
MAX_PRV_GRID_POINTS = 5_000_000
# Far beyond any real run (a billion releases); a larger count is a corrupt or hostile history.
MAX_STEPS = 10**9
PRV_EPS_ERROR = 0.01  # Opacus' default for PRVAccountant.get_epsilon


class AccountingError(UserError):
    """A privacy accountant history that is invalid, or whose epsilon would take unbounded memory or time."""


def check_history(
    kind: str, history: Sequence[tuple[float, float, int]], delta: float, eps_error: float = PRV_EPS_ERROR
) -> None:
    """Raise :class:`AccountingError` for an invalid history, or one the ``kind`` accountant cannot bound cheaply."""
    for sigma, q, steps in history:
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise AccountingError(f"accountant history: noise multiplier {sigma!r} must be a finite number > 0")
        if not (isinstance(q, int | float) and 0 < q <= 1):
            raise AccountingError(f"accountant history: sample rate {q!r} must be in (0, 1]")
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or not 1 <= steps <= MAX_STEPS:
            raise AccountingError(f"accountant history: step count {steps!r} must be an integer in [1, {MAX_STEPS}]")
    if kind == "prv" and history:
        points = prv_grid_points(history, delta, eps_error)
        if points > MAX_PRV_GRID_POINTS:
            sigma = min(s for s, _, _ in history)
            steps = sum(int(n) for _, _, n in history)
            raise AccountingError(
                f"PRV accounting of noise multiplier {sigma:.3g} over {steps} steps needs a grid of {points:.3g} "
                f"points (the limit is {MAX_PRV_GRID_POINTS:.3g}, about 800 MB): use accountant=rdp, "
                "or more noise or fewer releases"
            )


def prv_grid_points(history: Sequence[tuple[float, float, int]], delta: float, eps_error: float) -> float:
    """The size of the grid Opacus' ``PRVAccountant.get_epsilon(delta, eps_error)`` would allocate (its own rule)."""
    delta_error = delta / 1000  # PRVAccountant's default
    steps = [int(n) for _, _, n in history]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, just loose
        warnings.simplefilter("ignore", UserWarning)
        half_width = compute_safe_domain_size(
            [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history], steps, eps_error, delta_error
        )
    mesh = eps_error / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh
