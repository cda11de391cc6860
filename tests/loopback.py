"""The in-process grid with what tests need on top: a record of every train and evaluate message, and a stop
at a chosen round, as a kill would. The server's roll call (query messages, for hospitals' names) is answered
by each hospital's real ClientApp even where a test replaced its train and evaluate handler, and recorded
apart, in ``roll_calls``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, MessageType

from client.app import app as client_app
from simulations.inprocess import Handler, InProcessGrid

__all__ = ["Interrupted", "LoopbackGrid", "client_app"]


class Interrupted(Exception):
    """Raised by the grid to stop a run at a chosen point, as a kill would."""


class LoopbackGrid(InProcessGrid):
    def __init__(self, run_config: dict[str, Any], hospitals: int, first_node_id: int = 2**63 + 5) -> None:
        super().__init__(run_config, hospitals, first_node_id)
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.roll_calls: list[Message] = []
        self.train_rounds_left: int | None = None
        self.real_handlers = dict(self.handlers)

    def handler_for(self, msg: Message) -> Handler:
        if msg.metadata.message_type == MessageType.QUERY:  # the real ClientApp answers the roll call
            return self.real_handlers.get(msg.metadata.dst_node_id, self.handlers[msg.metadata.dst_node_id])
        return super().handler_for(msg)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.QUERY:
            self.roll_calls.extend(messages)
            return super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == "train" and self.train_rounds_left is not None:
            if self.train_rounds_left == 0:
                raise Interrupted
            self.train_rounds_left -= 1
        self.sent.extend(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies
