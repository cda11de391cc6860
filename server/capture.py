"""An audit of what crosses the network: the meta-gradient strategy, plus one line per reply it receives.

``server.capture-replies=true`` makes the ServerApp use :class:`ReplyCapture`, which appends to
``OUT_DIR/replies.jsonl`` what each train or evaluate reply carries: its record names by kind, each
array's name, shape and dtype, each metric and config record's keys (a packed gradient's layout record
lists the meta-parameters' names), or its error code. Never a value: the file shows that replies hold
only what the wire contract allows, and nothing to leak.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, MessageType, MetricRecord

from server.strategy import Accepted, MetaGradientStrategy
from shared.run_folder import REPLIES


def reply_shape(reply: Message) -> dict[str, Any]:
    """Names, shapes, dtypes and keys of a reply's content; no values."""
    if reply.has_error():
        return {"error": reply.error.code}
    content = reply.content
    return {
        "error": None,
        "arrays": {
            record: {name: {"shape": list(array.shape), "dtype": array.dtype} for name, array in arrays.items()}
            for record, arrays in content.array_records.items()
        },
        "metrics": {record: sorted(metrics) for record, metrics in content.metric_records.items()},
        "configs": {record: sorted(config) for record, config in content.config_records.items()},
    }


class ReplyCapture(MetaGradientStrategy):
    def _capture(self, message_type: str, replies: list[Message]) -> None:
        with open(self.run_dir / REPLIES, "a") as f:
            for node, reply, _ in self._by_sender(replies):
                line = {"round": self.record.round, "type": message_type, "hospital": self.label(node)}
                f.write(json.dumps(line | reply_shape(reply)) + "\n")

    def accept_replies(self, replies: Iterable[Message]) -> list[Accepted]:
        # every train reply passes here, with site-level DP (server.site_dp.SiteLevelDP) or without
        replies = list(replies)
        self._capture(MessageType.TRAIN, replies)
        return super().accept_replies(replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._capture(MessageType.EVALUATE, replies)
        return super().aggregate_evaluate(server_round, replies)
