"""The wire contract: what may cross the network between the server and a hospital.

Server -> hospital: the meta-parameters (named float32 arrays of the model's exact shapes) and a
config record. Hospital -> server: one outer-loop gradient per meta-parameter (same names, shapes,
dtype) and the scalar metrics in :data:`TRAIN_METRICS` / :data:`EVALUATE_METRICS`. Nothing else:
no images, embeddings, per-sample values, file names or DICOM tags. Both sides validate every
message with :class:`WireSchema` and reject what does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shared.errors import UserError

WIRE_DTYPE = np.dtype("float32")

# Scalar metrics a train reply carries (all numbers; `dp` is 1.0 when DP ran, 0.0 when it was off,
# `refused` is 1.0 when the hospital's privacy budget is spent and it did not train).
TRAIN_METRICS = frozenset({"episodes", "query-loss", "epsilon", "delta", "dp", "refused", "num-examples"})
EVALUATE_METRICS = frozenset(
    {
        "episodes",
        "queries",
        "accuracy",
        "balanced-accuracy",
        "auc",
        "sensitivity",
        "specificity",
        "num-examples",
    }
)


class WireError(UserError):
    """A message does not fit the wire contract."""


@dataclass(frozen=True)
class WireSchema:
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> WireSchema:
        return cls({name: tuple(a.shape) for name, a in arrays.items()})

    def validate(self, arrays: Mapping[str, np.ndarray], what: str) -> None:
        """Raise :class:`WireError` naming the first array that does not fit (``what`` names the message)."""
        missing = sorted(set(self.shapes) - set(arrays))
        extra = sorted(set(arrays) - set(self.shapes))
        if missing or extra:
            raise WireError(
                f"{what}: arrays do not match the meta-parameters (missing {missing[:3]}, unexpected {extra[:3]}); "
                "server and hospital must run the same model config"
            )
        for name, shape in self.shapes.items():
            array = arrays[name]
            if tuple(array.shape) != shape:
                raise WireError(
                    f"{what}: '{name}' has shape {tuple(array.shape)}, expected {shape}; "
                    "server and hospital must run the same model config"
                )
            if array.dtype != WIRE_DTYPE:
                raise WireError(f"{what}: '{name}' is {array.dtype}, expected {WIRE_DTYPE}")
            if not np.isfinite(array).all():
                raise WireError(f"{what}: '{name}' has non-finite values (NaN or inf); the sender diverged")


def validate_metrics(metrics: Mapping[str, object], allowed: frozenset[str], what: str) -> None:
    unexpected = sorted(set(metrics) - allowed)
    if unexpected:
        raise WireError(f"{what}: unexpected metric keys {unexpected}; only {sorted(allowed)} may cross")
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not np.isfinite(value):
            raise WireError(f"{what}: metric '{key}'={value!r} is not a finite number")


# Record keys and error codes of fedmeta's messages (Flower's own codes are below 1000).
PARAMS_KEY = "meta-params"
GRADIENT_KEY = "outer-grad"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
REFUSED_BUDGET = 1001  # the hospital's privacy budget is spent: stop sampling it
REJECTED_MESSAGE = 1002  # the server's message did not fit the wire contract
HOSPITAL_UNAVAILABLE = 1003  # the hospital's data could not be used (details stay in its own log)
