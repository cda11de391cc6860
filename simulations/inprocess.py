"""An in-process Flower Grid: the real ServerApp strategy and the real ClientApp, minus the network.

Each virtual hospital runs ``client.app.app`` with a simulation-style node config
(``partition-id``), one message at a time, in this process; a synthetic federation is written when the
grid is made, before anything runs. No SuperLink, no Ray: the engine for
benchmarks that train many federations on a small machine, and for unit tests. The network path
(``fedmeta simulate``, ``flwr run .``, deployment) runs exactly the same app code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from shared.config import FedMetaConfig
from simulations.data.synthetic import write_synthetic_federation

Handler = Callable[[Message], Message | None]

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a Flower runtime


class InProcessGrid(Grid):
    def __init__(self, run_config: dict[str, Any], hospitals: int, first_node_id: int = 2**63 + 5) -> None:
        self.run_config = run_config
        cfg = FedMetaConfig.from_flat(run_config)
        if cfg.data.synthetic:
            write_synthetic_federation(cfg, hospitals)
        self.handlers: dict[int, Handler] = {}
        for partition in range(hospitals):
            node_id = first_node_id + 7919 * partition  # above 2**63, like Flower's random ids
            self.handlers[node_id] = self.client_handler(node_id, partition)

    def client_handler(self, node_id: int, partition: int, node_config: dict[str, Any] | None = None) -> Handler:
        context = Context(
            run_id=1,
            node_id=node_id,
            node_config={"partition-id": partition, **(node_config or {})},
            state=RecordDict(),
            run_config=self.run_config,
        )
        return lambda msg: client_app(msg, context)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.handlers)

    def handler_for(self, msg: Message) -> Handler:
        return self.handlers[msg.metadata.dst_node_id]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            reply = self.handler_for(msg)(msg)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                replies.append(reply)
        return replies

    # The strategy uses only the two calls above.
    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[str]:
        raise NotImplementedError


def run_in_process(cfg: FedMetaConfig, hospitals: int) -> Path:
    """The whole federated run of ``server.app`` over ``hospitals`` virtual hospitals; returns the run folder."""
    from server.app import run_federation

    return run_federation(InProcessGrid(cfg.to_flat(), hospitals), cfg)
