"""An in-process Flower Grid: the real ServerApp strategy and the real ClientApp, minus the network.

Each node runs ``client.app.app`` with a simulation-style node config (``partition-id``), unless a
test swaps its handler for a misbehaving hospital. Deterministic and fast enough to run many rounds
in a unit test; the full network path is covered by the simulation and deployment tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app

Handler = Callable[[Message], Message | None]

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a Flower runtime


class Interrupted(Exception):
    """Raised by the grid to stop a run at a chosen point, as a kill would."""


class LoopbackGrid(Grid):
    def __init__(self, run_config: dict[str, Any], hospitals: int, first_node_id: int = 2**63 + 5) -> None:
        self.run_config = run_config
        self.handlers: dict[int, Handler] = {}
        for partition in range(hospitals):
            node_id = first_node_id + 7919 * partition  # above 2**63, like Flower's random ids
            self.handlers[node_id] = self.client_handler(node_id, partition)
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.train_rounds_left: int | None = None

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

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train" and self.train_rounds_left is not None:
            if self.train_rounds_left == 0:
                raise Interrupted
            self.train_rounds_left -= 1
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(msg)
            reply = self.handlers[msg.metadata.dst_node_id](msg)
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                replies.append(reply)
        self.replies.extend(replies)
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
