"""``RUN_DIR/metrics.jsonl``: one :class:`RoundRecord` per completed round, one JSON object a line.

The strategy fills a record in as its round goes and :func:`append_round` writes it, fsynced, before the round's
checkpoint; a resumed run first drops the lines of rounds after its checkpoint (:func:`drop_rounds_after`). Every
reader (report, ServerApp, simulate, benchmarks, tests) goes through :func:`read_round_log`, which checks each line
against the record's types: a line that does not fit is a :class:`~shared.errors.UserError` naming the file, the
line and the fix; only a last line cut short (the server stopped, or is still writing it) is skipped, with a warning.

Hospitals are named as the strategy shows them (their public names). JSON has no infinity: a hospital that released
without DP has ``epsilon`` null and ``dp`` false, and then ``epsilon_max`` is null (unbounded). A line's ``epsilon``
and ``dp`` hold only the hospitals that released in that round (a line stays the same size however many hospitals
the federation has); :func:`privacy_so_far` folds them into every hospital's standing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import types
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np

from shared.atomic import atomic_write
from shared.errors import UserError
from shared.run_folder import METRICS

log = logging.getLogger(__name__)

HEADLINE_METRIC = "balanced-accuracy"
Metrics = dict[str, float]
# Field metadata: the field's JSON key where it is not the field's name; a field the line leaves out when it is
# None or empty (this round had no step, no evaluation, no refusal of evaluation).
KEY, LEFT_OUT = "json_key", "left_out_when_empty"
LEFT_OUT_WHEN_EMPTY = {LEFT_OUT: True}
FIX = "each line is one round's record as the fedmeta server writes it: restore the file or delete that line"


@dataclass(frozen=True)
class Rejection:
    """A reply the round did not use."""

    hospital: str
    reason: str


@dataclass(frozen=True)
class Refusal:
    """A hospital that said no for the rest of the run; ``kind`` is ``budget`` or ``policy``."""

    hospital: str
    kind: str
    reason: str


@dataclass(frozen=True)
class TrainStep:
    """The meta-optimizer's step: episodes behind it, the outer gradient's norm, the learning rate after it, and the
    mean query loss of the replies without DP (None when every reply ran DP: a DP reply carries no loss)."""

    episodes: float
    update_norm: float = field(metadata={KEY: "update-norm"})
    lr: float
    query_loss: float | None = field(default=None, metadata={KEY: "query-loss", **LEFT_OUT_WHEN_EMPTY})


@dataclass(frozen=True)
class Worst:
    """The hospital with the lowest headline metric."""

    hospital: str
    balanced_accuracy: float = field(metadata={KEY: HEADLINE_METRIC})


@dataclass
class RoundRecord:
    """One round; the strategy sets the fields as the round goes."""

    round: int
    eligible: int = 0  # connected hospitals that have not refused
    sampled: int = 0
    participants: int = 0  # replies whose gradient was used
    trained: list[str] = field(default_factory=list)  # ... their hospitals, sorted
    released: list[str] = field(default_factory=list)  # hospitals whose gradient arrived, used or not
    rejected: list[Rejection] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    train: TrainStep | None = field(default=None, metadata=LEFT_OUT_WHEN_EMPTY)  # None: the meta-model did not move
    hospitals: dict[str, Metrics] = field(default_factory=dict, metadata=LEFT_OUT_WHEN_EMPTY)  # training hospitals
    worst_hospital: Worst | None = field(default=None, metadata=LEFT_OUT_WHEN_EMPTY)
    evaluation_refused: list[Refusal] = field(default_factory=list, metadata=LEFT_OUT_WHEN_EMPTY)
    heldout: dict[str, Metrics] = field(default_factory=dict, metadata=LEFT_OUT_WHEN_EMPTY)
    heldout_mean: Metrics = field(default_factory=dict, metadata=LEFT_OUT_WHEN_EMPTY)
    heldout_worst: Worst | None = field(default=None, metadata=LEFT_OUT_WHEN_EMPTY)
    # cumulative, per hospital that released this round; None: no DP
    epsilon: dict[str, float | None] = field(default_factory=dict)
    dp: dict[str, bool] = field(default_factory=dict)
    epsilon_max: float | None = 0.0  # over every hospital so far; None once one released without DP
    site_epsilon: float | None = None
    seconds: float = 0.0

    @property
    def query_loss(self) -> float | None:
        return None if self.train is None else self.train.query_loss

    @property
    def without_dp(self) -> list[str]:
        """The hospitals of this round's releases that have released without DP (epsilon infinite), sorted."""
        return hospitals_without_dp(self.dp)


def hospitals_without_dp(dp: dict[str, bool]) -> list[str]:
    return sorted(hospital for hospital, ran_dp in dp.items() if not ran_dp)


@dataclass(frozen=True)
class PrivacySoFar:
    """Every hospital's cumulative epsilon (None: released without DP) and whether it always ran DP."""

    epsilon: dict[str, float | None]
    dp: dict[str, bool]

    @property
    def without_dp(self) -> list[str]:
        return hospitals_without_dp(self.dp)


def privacy_so_far(records: list[RoundRecord]) -> PrivacySoFar:
    """The hospitals' privacy standing after ``records``: the last epsilon each reported, and no DP for good once a
    hospital released without it."""
    epsilon: dict[str, float | None] = {}
    dp: dict[str, bool] = {}
    for record in records:
        for hospital, ran_dp in record.dp.items():
            dp[hospital] = ran_dp and dp.get(hospital, True)
            epsilon[hospital] = record.epsilon.get(hospital) if dp[hospital] else None
    return PrivacySoFar(epsilon, dp)


def mean_metrics(per_hospital: dict[str, Metrics]) -> Metrics:
    """Each metric's unweighted mean over the hospitals that report it."""
    keys = sorted({k for m in per_hospital.values() for k in m})
    return {k: float(np.mean([m[k] for m in per_hospital.values() if k in m])) for k in keys}


def rounds_trained(records: list[RoundRecord]) -> int:
    """Rounds in which at least one hospital's gradient stepped the meta-model."""
    return sum(1 for r in records if r.train is not None and r.participants > 0)


def as_json(value: Any) -> Any:
    """A record (or a part of one) as the JSON the log holds."""
    if is_dataclass(value):
        encoded = {}
        for f in fields(value):
            item = getattr(value, f.name)
            if f.metadata.get(LEFT_OUT) and (item is None or item == [] or item == {}):
                continue
            encoded[f.metadata.get(KEY, f.name)] = as_json(item)
        return encoded
    if isinstance(value, list):
        return [as_json(item) for item in value]
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    return value


def append_round(run_dir: Path, record: RoundRecord) -> None:
    """Append ``record`` as one line and fsync it, so that it is on disk before the round's checkpoint."""
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(as_json(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _Misfit(Exception):
    """Where in a line a value does not fit the record, and how."""


SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "a whole number"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _decode(kind: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType):  # X | None, the only unions a record has
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _decode(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise _Misfit(f"'{where}' must be a list, not {_shown(value)}")
        return [_decode(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict or is_dataclass(kind):
        if not isinstance(value, dict):
            raise _Misfit(f"'{where}' must be an object, not {_shown(value)}")
        if origin is dict:
            return {key: _decode(args[1], item, f"{where}.{key}") for key, item in value.items()}
        return _decode_fields(kind, value, f"{where}.")
    accepted, expected = SCALARS[kind]
    if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
        return float(value) if kind is float else value
    raise _Misfit(f"'{where}' must be {expected}, not {_shown(value)}")


def _decode_fields(cls: type, value: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` from a JSON object; keys the record does not have are ignored."""
    values = {}
    for f in fields(cls):
        key = f.metadata.get(KEY, f.name)
        if key in value:
            values[f.name] = _decode(_hints(cls)[f.name], value[key], prefix + key)
        elif not f.metadata.get(LEFT_OUT):
            raise _Misfit(f"'{prefix}{key}' is missing")
    return cls(**values)


def read_round_log(run_dir: Path) -> list[RoundRecord]:
    """The run's records in round order, the last line written for a round winning; [] before the first round."""
    path = run_dir / METRICS
    try:
        lines = path.read_text(errors="replace").split("\n")
    except FileNotFoundError:
        return []
    by_round: dict[int, RoundRecord] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: cut short
                log.warning(
                    "%s line %d is incomplete (the server stopped while writing it, or is writing it): skipped",
                    path,
                    number,
                )
                continue
            raise UserError(f"{path} line {number} is not JSON ({err.msg} at column {err.colno}); {FIX}") from None
        try:
            if not isinstance(value, dict):
                raise _Misfit(f"the line must be a JSON object, not {_shown(value)}")
            record = _decode_fields(RoundRecord, value)
        except _Misfit as misfit:
            raise UserError(f"{path} line {number}: {misfit}; {FIX}") from None
        by_round[record.round] = record
    return [by_round[r] for r in sorted(by_round)]


def drop_rounds_after(run_dir: Path, completed: int) -> None:
    """Keep only the records of rounds up to ``completed``: a kill between a round's line and its checkpoint
    leaves lines (and perhaps a cut-short one) that the resumed run writes again."""
    path = run_dir / METRICS
    if path.exists():
        kept = [json.dumps(as_json(r)) + "\n" for r in read_round_log(run_dir) if r.round <= completed]
        atomic_write(path, lambda f: f.write("".join(kept).encode()))
