"""fedmeta's Flower ClientApp: one hospital, a train handler and an evaluate handler.

Which hospital: ``data-path`` in the node config (deployment: ``fedmeta client --hospital DIR``),
or, in simulation, hospital ``partition-id`` of the run's federation folder (written by the simulation
before it starts: this app only reads hospital folders).

A real hospital's privacy is its own: its policy file (node config ``policy-file``, default
``STATE/policy.toml``) with ``policy.KEY`` node-config overrides on top, and its ledger in its own
state folder (node config ``state-dir``, default ``HOSPITAL/.fedmeta``). Nothing in the run config
can move either; the run's settings can only make the policy stricter (:mod:`client.policy`).
Virtual hospitals of a simulation belong to the simulation: the run config is their policy.

Everything a reply carries is checked against the wire contract before it leaves. Failures are
answered with a fixed, PHI-free reason; details stay in the hospital's own log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict, UserConfig
from flwr.clientapp import ClientApp

from client.hospital import Hospital
from client.ledger import BudgetExhausted
from client.policy import POLICY_FILE, PolicyRefusal, load_policy
from shared.config import FedMetaConfig
from shared.data.federation import federation_dir, hospital_name
from shared.data.site_keys import STATE_FOLDER
from shared.errors import UserError
from shared.flower_processes import quiet_app_output
from shared.learning.maml import Params, pick_device
from shared.wire import (
    CONFIG_KEY,
    EVALUATE_METRICS,
    GRADIENT_KEY,
    HOSPITAL_KEY,
    HOSPITAL_UNAVAILABLE,
    METRICS_KEY,
    NO_DP_TRAIN_METRICS,
    PARAMS_KEY,
    REFUSED_BUDGET,
    REFUSED_POLICY,
    REJECTED_MESSAGE,
    TRAIN_METRICS,
    WireError,
    WireSchema,
    named_reason,
    put_arrays,
    take_arrays,
    validate_hospital_name,
    validate_metrics,
)

log = logging.getLogger(__name__)
app = ClientApp()
quiet_app_output()


POLICY_OVERRIDE = "policy."


def open_hospital(context: Context, run_cfg: FedMetaConfig) -> Hospital | PolicyRefusal:
    """This node's hospital, on the settings its policy allows for ``run_cfg``, or why it refuses the run."""
    node = context.node_config
    if "data-path" not in node:
        folder = federation_dir(run_cfg) / hospital_name(int(node["partition-id"]))
        if not folder.is_dir():
            raise UserError(
                f"virtual hospital {folder} does not exist: a simulation writes its hospitals before it starts "
                "(`fedmeta simulate` does; for `flwr run`, `fedmeta demo-data --out DIR` and data.federation-dir=DIR)"
            )
        return Hospital(folder, run_cfg, pick_device())
    folder = Path(str(node["data-path"]))
    state_dir = Path(str(node.get("state-dir") or folder / STATE_FOLDER))
    overrides = {k.removeprefix(POLICY_OVERRIDE): v for k, v in node.items() if k.startswith(POLICY_OVERRIDE)}
    policy = load_policy(Path(str(node.get("policy-file") or state_dir / POLICY_FILE)), overrides)
    governed = policy.govern(run_cfg)
    if isinstance(governed, PolicyRefusal):
        return governed
    return Hospital(folder, governed, pick_device(), state_dir=state_dir, policy=policy)


def warm_up(node_config: UserConfig) -> None:
    """Before this hospital's first task, what its first training step would compute once per process, for the
    installed default run config under its policy (:meth:`Hospital.warm_up_accountant`). Nothing is released or
    written, and the global random stream (the hospital's model is built from it) is left as it was."""
    context = Context(run_id=0, node_id=0, node_config=node_config, state=RecordDict(), run_config={})
    with torch.random.fork_rng(devices=[]):
        hospital = open_hospital(context, FedMetaConfig())
    if isinstance(hospital, Hospital):
        hospital.warm_up_accountant()


def receive_params(msg: Message, hospital: Hospital) -> Params:
    arrays = take_arrays(msg.content, PARAMS_KEY, "server message")
    expected = WireSchema.of({n: p.cpu().numpy() for n, p in hospital.learner.init_meta_params().items()})
    expected.validate(arrays, "server message")
    return {name: torch.from_numpy(np.array(a)) for name, a in arrays.items()}


def server_round(msg: Message) -> int:
    config = msg.content.config_records.get(CONFIG_KEY)
    return int(config["server-round"]) if config and "server-round" in config else 0


def public_name(context: Context) -> str | None:
    """The name this hospital shows the operator: node config ``hospital-name``, or a virtual hospital's folder."""
    node = context.node_config
    if "hospital-name" in node:
        return validate_hospital_name(node["hospital-name"], "node config hospital-name")
    if "data-path" not in node:
        return hospital_name(int(node["partition-id"]))
    return None


def _named(msg: Message, context: Context, answer: Callable[[], Message]) -> Message:
    """``answer()`` with this hospital's public name on it (in front of an Error's reason, which holds only text)."""
    try:
        name = public_name(context)
    except WireError as err:
        log.error("%s", err)
        return Message(Error(HOSPITAL_UNAVAILABLE, str(err)), reply_to=msg)
    reply = answer()
    if name is None:
        return reply
    if reply.has_error():
        return Message(Error(reply.error.code, named_reason(name, reply.error.reason or "")), reply_to=msg)
    reply.content[HOSPITAL_KEY] = ConfigRecord({"name": name})
    return reply


def _answer(msg: Message, context: Context, work: Callable[[Hospital, Params, Message], Message]) -> Message:
    try:
        hospital = open_hospital(context, FedMetaConfig.from_flat(context.run_config).for_round(server_round(msg)))
        if isinstance(hospital, PolicyRefusal):
            log.warning("%s", hospital)
            return Message(Error(REFUSED_POLICY, str(hospital)), reply_to=msg)
        params = receive_params(msg, hospital)
    except WireError as err:
        log.warning("rejected the server's message: %s", err)
        return Message(Error(REJECTED_MESSAGE, str(err)), reply_to=msg)
    except UserError as err:
        log.error("hospital unavailable: %s", err)
        return _unavailable(msg, "hospital data or settings unusable")
    except Exception:  # whatever it is, its text (paths, values) stays in the hospital's log
        log.exception("hospital failed")
        return _unavailable(msg, "hospital failed")
    try:
        return work(hospital, params, msg)
    except WireError as err:  # our own reply does not fit: never send it, nor what was wrong with it
        log.error("%s", err)
        return _unavailable(msg, "the hospital's reply did not fit the wire contract")
    except UserError as err:
        log.error("hospital unavailable: %s", err)
        return _unavailable(msg, "hospital data or settings unusable")
    except Exception:
        log.exception("hospital failed")
        return _unavailable(msg, "hospital failed")


def _unavailable(msg: Message, reason: str) -> Message:
    return Message(Error(HOSPITAL_UNAVAILABLE, f"{reason}; see the hospital's log"), reply_to=msg)


def _train_reply(hospital: Hospital, params: Params, msg: Message) -> Message:
    outcome = hospital.train(params, server_round=server_round(msg))
    if isinstance(outcome, BudgetExhausted):
        log.warning("%s", outcome)
        return Message(Error(REFUSED_BUDGET, str(outcome)), reply_to=msg)
    grads = {n: g.numpy() for n, g in outcome.outer_grad.items()}
    WireSchema.of(params).validate(grads, "hospital reply")
    allowed = TRAIN_METRICS if outcome.metrics["dp"] else NO_DP_TRAIN_METRICS
    validate_metrics(outcome.metrics, allowed, "hospital reply", required=TRAIN_METRICS)
    content = RecordDict({METRICS_KEY: MetricRecord(outcome.metrics)})
    put_arrays(content, GRADIENT_KEY, grads)
    return Message(content, reply_to=msg)


def _evaluate_reply(hospital: Hospital, params: Params, msg: Message) -> Message:
    metrics = hospital.answer_evaluation(params)
    if isinstance(metrics, PolicyRefusal):
        log.warning("%s", metrics)
        return Message(Error(REFUSED_POLICY, str(metrics)), reply_to=msg)
    validate_metrics(metrics, EVALUATE_METRICS, "hospital reply", required=EVALUATE_METRICS)
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _named(msg, context, lambda: _answer(msg, context, _train_reply))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _named(msg, context, lambda: _answer(msg, context, _evaluate_reply))


@app.query()
def roll_call(msg: Message, context: Context) -> Message:
    """The server's roll call: this hospital's public name only; no data is read."""
    return _named(msg, context, lambda: Message(RecordDict(), reply_to=msg))
