"""The in-process grid with what tests need on top: a record of every message, and a stop at a
chosen round, as a kill would."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message

from client.app import app as client_app
from simulations.inprocess import InProcessGrid

__all__ = ["Interrupted", "LoopbackGrid", "client_app"]


class Interrupted(Exception):
    """Raised by the grid to stop a run at a chosen point, as a kill would."""


class LoopbackGrid(InProcessGrid):
    def __init__(self, run_config: dict[str, Any], hospitals: int, first_node_id: int = 2**63 + 5) -> None:
        super().__init__(run_config, hospitals, first_node_id)
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.train_rounds_left: int | None = None

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train" and self.train_rounds_left is not None:
            if self.train_rounds_left == 0:
                raise Interrupted
            self.train_rounds_left -= 1
        self.sent.extend(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies
