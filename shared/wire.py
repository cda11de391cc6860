"""The wire contract: what may cross the network between the server and a hospital.

Server -> hospital: the meta-parameters (named float32 arrays of the model's exact shapes) and a
config record. Hospital -> server: one outer-loop gradient per meta-parameter (same names, shapes,
dtype) and the scalar metrics in :data:`TRAIN_METRICS` / :data:`EVALUATE_METRICS`, plus the hospital's
public name (a setting the hospital chose, under :data:`HOSPITAL_KEY`, and as the ``[name]`` prefix of an
error's reason: an Error carries only a code and a reason). Nothing else: no images, embeddings,
per-sample values, file names or DICOM tags. Both sides validate every message with
:class:`WireSchema` and :func:`validate_hospital_name` and reject what does not fit.

Named arrays travel packed (:func:`put_arrays` / :func:`take_arrays`): one flat float32 array in name
order plus a layout record of each name's shape. Flower 1.42 moves every Array and each of its chunks as
an object of its own, one request each; a model's 18 tensors cost about 40 requests a message, one flat
array about 8. What the receiver validates is the same: the named arrays, after unpacking.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared.errors import UserError

WIRE_DTYPE = np.dtype("float32")

# Scalar metrics of a train reply. Each depends only on public settings or is itself private:
# `episodes` is the number of episodes the released mean gradient is normalised by (episode.meta-batch,
# or privacy.groups-per-step under DP, times the releases made): a public setting, never a count of data;
# `epsilon` and `delta` are the hospital's lifetime spend by its ledger; `dp` is 1.0 when DP ran.
TRAIN_METRICS = frozenset({"episodes", "epsilon", "delta", "dp"})
# Only a reply without DP may add the mean training query loss (un-noised, so never under DP).
NO_DP_TRAIN_METRICS = TRAIN_METRICS | {"query-loss"}
# Few-shot metrics a hospital's evaluation reply carries, when its privacy policy lets it answer at all: the
# same two keys always (AUC, sensitivity and specificity exist only when the queries hold both classes, so
# their presence would say something about the test split). No counts (of scans, queries or tasks) cross.
EVALUATE_METRICS = frozenset({"accuracy", "balanced-accuracy"})


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


def validate_metrics(
    metrics: Mapping[str, object], allowed: frozenset[str], what: str, required: frozenset[str] = frozenset()
) -> None:
    """Raise :class:`WireError` for a key outside ``allowed``, a missing ``required`` key or a non-finite value."""
    unexpected = sorted(set(metrics) - allowed)
    if unexpected:
        raise WireError(f"{what}: unexpected metric keys {unexpected}; only {sorted(allowed)} may cross")
    missing = sorted(required - set(metrics))
    if missing:
        raise WireError(f"{what}: metric keys {missing} are missing; hospital and server must run the same fedmeta")
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not np.isfinite(value):
            raise WireError(f"{what}: metric '{key}'={value!r} is not a finite number")


# A hospital's public name: what the operator sees in round lines, records and the model card.
HOSPITAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# An error reason that names its hospital: "[h0] privacy budget exhausted ...".
NAMED_REASON = re.compile(r"\[([^\]]*)\] (.*)", re.DOTALL)


def validate_hospital_name(name: object, what: str) -> str:
    """``name`` when it is a public hospital name: 1-64 letters, digits, '.', '_' or '-', starting alphanumeric."""
    if not isinstance(name, str) or not HOSPITAL_NAME.fullmatch(name):
        raise WireError(
            f"{what}: hospital name {str(name)[:80]!r} does not fit; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_hospital_record(record: Mapping[str, object], what: str) -> str:
    """The name in a :data:`HOSPITAL_KEY` config record, which holds exactly ``{"name": str}``."""
    if set(record) != {"name"}:
        raise WireError(f"{what}: '{HOSPITAL_KEY}' holds {sorted(record)}; only ['name'] may cross")
    return validate_hospital_name(record["name"], what)


def named_reason(name: str, reason: str) -> str:
    return f"[{name}] {reason}"


def split_named_reason(reason: str | None, what: str) -> tuple[str | None, str]:
    """(hospital name or None, the rest) of an error reason; a ``[name]`` prefix that does not fit raises."""
    text = reason or ""
    named = NAMED_REASON.fullmatch(text)
    if named is None:
        return None, text
    return validate_hospital_name(named.group(1), what), named.group(2)


# Record keys and error codes of fedmeta's messages (Flower's own codes are below 1000).
PARAMS_KEY = "meta-params"
GRADIENT_KEY = "outer-grad"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
HOSPITAL_KEY = "hospital"  # ConfigRecord {"name": the hospital's public name}, in every reply with content
REFUSED_BUDGET = 1001  # the hospital's privacy budget is spent: stop sampling it
REJECTED_MESSAGE = 1002  # the server's message did not fit the wire contract
HOSPITAL_UNAVAILABLE = 1003  # the hospital's data could not be used (details stay in its own log)
# The run asks for less privacy or more work than the hospital's own policy allows, or for an evaluation the
# policy does not answer: the reason names the setting; the run's settings do not change, so stop asking.
REFUSED_POLICY = 1004


FLAT_ARRAY = "flat"  # the one Array of a packed record
LAYOUT_SUFFIX = ".layout"  # ConfigRecord {name: [ndim, *shape]} next to a packed record


def layout_key(key: str) -> str:
    return key + LAYOUT_SUFFIX


def put_arrays(content: RecordDict, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Put ``arrays`` into ``content`` under ``key``: one flat Array in name order, and their shapes."""
    names = sorted(arrays)
    # no cast: a float64 array makes the whole buffer float64, which the receiver rejects by name of the record
    flat = np.concatenate([np.asarray(arrays[n]).ravel() for n in names]) if names else np.zeros(0, WIRE_DTYPE)
    content[key] = ArrayRecord({FLAT_ARRAY: Array(flat)})
    content[layout_key(key)] = ConfigRecord({n: [np.ndim(arrays[n]), *np.shape(arrays[n])] for n in names})


def take_arrays(content: RecordDict, key: str, what: str) -> dict[str, np.ndarray]:
    """The named arrays :func:`put_arrays` put under ``key`` (read-only views of one buffer); a packed record
    that does not add up raises :class:`WireError`. Validate the result with :class:`WireSchema`."""
    record = content.array_records.get(key)
    layout = content.config_records.get(layout_key(key))
    if record is None or layout is None:
        raise WireError(f"{what} lacks '{key}' or its layout '{layout_key(key)}'")
    if set(record) != {FLAT_ARRAY}:
        raise WireError(f"{what}: '{key}' holds {sorted(record)[:3]}; only ['{FLAT_ARRAY}'] may cross")
    flat = record[FLAT_ARRAY].numpy()
    if flat.ndim != 1:
        raise WireError(f"{what}: '{key}' has {flat.ndim} dimensions, expected 1 (packed by put_arrays)")
    if flat.dtype != WIRE_DTYPE:
        raise WireError(f"{what}: '{key}' is {flat.dtype}, expected {WIRE_DTYPE}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in sorted(layout):
        entry = layout[name]
        if not (isinstance(entry, list) and entry and all(isinstance(d, int) and d >= 0 for d in entry)):
            raise WireError(f"{what}: layout of '{name}' is {entry!r}, expected [ndim, *shape] of non-negative ints")
        if entry[0] != len(entry) - 1:
            raise WireError(f"{what}: layout of '{name}' says {entry[0]} dimensions but lists {len(entry) - 1}")
        shapes[name] = tuple(entry[1:])
    sizes = [math.prod(shape) for shape in shapes.values()]
    if sum(sizes) != flat.size:
        raise WireError(f"{what}: '{key}' holds {flat.size} values, its layout {sum(sizes)}")
    flat.flags.writeable = False
    offsets = np.cumsum([0, *sizes])
    return {
        name: flat[start:end].reshape(shape)
        for (name, shape), start, end in zip(shapes.items(), offsets[:-1], offsets[1:], strict=True)
    }
