"""fedmeta's Flower ClientApp: one hospital, a train handler and an evaluate handler.

Which hospital: ``data-path`` in the node config (deployment: ``fedmeta client --hospital DIR``),
or, in simulation, hospital ``partition-id`` of the run's federation folder (synthetic
hospitals are written there on first use). A hospital's own privacy settings come as
``privacy.*`` keys in its node config and win over the server's run config.

Everything a reply carries is checked against the wire contract before it leaves. Failures are
answered with a fixed, PHI-free reason; details stay in the hospital's own log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.hospital import Hospital
from client.ledger import BudgetExhausted
from shared.config import FedMetaConfig
from shared.errors import UserError
from shared.federation import federation_dir
from shared.maml import Params, pick_device
from shared.synthetic import hospital_name, write_synthetic_hospital
from shared.wire import (
    CONFIG_KEY,
    EVALUATE_METRICS,
    GRADIENT_KEY,
    HOSPITAL_UNAVAILABLE,
    METRICS_KEY,
    PARAMS_KEY,
    REFUSED_BUDGET,
    REJECTED_MESSAGE,
    TRAIN_METRICS,
    WireError,
    WireSchema,
    validate_metrics,
)

log = logging.getLogger(__name__)
app = ClientApp()


def hospital_config(context: Context) -> FedMetaConfig:
    """The run config with the hospital's own ``privacy.*`` node-config keys on top."""
    own = {k: v for k, v in context.node_config.items() if k.startswith("privacy.")}
    return FedMetaConfig.from_flat({**context.run_config, **own})


def hospital_folder(context: Context, cfg: FedMetaConfig) -> Path:
    if "data-path" in context.node_config:
        return Path(str(context.node_config["data-path"]))
    index = int(context.node_config["partition-id"])
    folder = federation_dir(cfg) / hospital_name(index)
    if not folder.exists() and cfg.data.synthetic:
        write_synthetic_hospital(federation_dir(cfg), index, seed=cfg.seed)
    return folder


def receive_params(msg: Message, hospital: Hospital) -> Params:
    record = msg.content.array_records.get(PARAMS_KEY)
    if record is None:
        raise WireError(f"the server's message has no '{PARAMS_KEY}' record")
    arrays = {name: array.numpy() for name, array in record.items()}
    expected = WireSchema.of({n: p.cpu().numpy() for n, p in hospital.learner.init_meta_params().items()})
    expected.validate(arrays, "server message")
    return {name: torch.from_numpy(np.array(a)) for name, a in arrays.items()}


def server_round(msg: Message) -> int:
    config = msg.content.config_records.get(CONFIG_KEY)
    return int(config["server-round"]) if config and "server-round" in config else 0


def _handle(msg: Message, context: Context, work: Callable[[Hospital, Params, Message], Message]) -> Message:
    try:
        cfg = hospital_config(context).for_round(server_round(msg))
        hospital = Hospital(hospital_folder(context, cfg), cfg, pick_device())
        params = receive_params(msg, hospital)
    except WireError as err:
        log.warning("rejected the server's message: %s", err)
        return Message(Error(REJECTED_MESSAGE, str(err)), reply_to=msg)
    except UserError as err:
        log.error("hospital unavailable: %s", err)
        return _unavailable(msg, "hospital data or settings unusable")
    try:
        return work(hospital, params, msg)
    except WireError as err:  # our own reply does not fit: never send it
        log.error("%s", err)
        return _unavailable(msg, str(err))
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
    validate_metrics(outcome.metrics, TRAIN_METRICS, "hospital reply")
    content = RecordDict(
        {
            GRADIENT_KEY: ArrayRecord({n: Array(g) for n, g in grads.items()}),
            METRICS_KEY: MetricRecord(outcome.metrics),
        }
    )
    return Message(content, reply_to=msg)


def _evaluate_reply(hospital: Hospital, params: Params, msg: Message) -> Message:
    metrics = hospital.evaluate(params)
    validate_metrics(metrics, EVALUATE_METRICS, "hospital reply")
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _train_reply)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _evaluate_reply)
