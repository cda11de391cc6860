"""``flwr-simulation`` as fedmeta's simulation SuperLink starts it: Flower's simulation process with a message
pump whose cost follows the messages in flight, not the size of the federation.

Flower 1.42's pump (``vce_api.add_messages_to_queue``) asks the run's in-memory LinkState for one message per
virtual node, for every node, ten times a second, and each ask walks every stored message: about
N x M checks a pass (N nodes, M messages). At 10,000 hospitals that kept a core busy all run and made the
first round, whose roll call holds 10,000 messages, take minutes. This pump takes the same messages, at most
one undelivered message per node a pass as Flower's does, checked for expiry as Flower does, from one walk
over the stored messages. A LinkState that is not the in-memory one keeps Flower's pump.
"""

from __future__ import annotations

import sys
import threading
from queue import Queue

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState
from flwr.supercore.date import now

PASS_INTERVAL_S = 0.1  # Flower's
FLOWER_PUMP = vce_api.add_messages_to_queue


def take_pending_messages(state: InMemoryLinkState, nodes: dict[int, int]) -> list[Message]:
    """The first undelivered message of each node in ``nodes``, marked delivered; expired ones are dropped (and
    answered with an error) as Flower's ``get_message_ins`` drops them."""
    taken: dict[int, Message] = {}
    with state.lock:
        for message_id in list(state.message_ins_store):
            state._check_stored_messages({message_id})
            message = state.message_ins_store.get(message_id)
            if message is None or message.metadata.delivered_at != "":
                continue
            node = message.metadata.dst_node_id
            if node in nodes and node not in taken:
                taken[node] = message
        delivered_at = now().isoformat()
        for message in taken.values():
            message.metadata.delivered_at = delivered_at
    return list(taken.values())


def add_messages_to_queue(
    state: LinkState, queue: Queue[Message], nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    if not isinstance(state, InMemoryLinkState):
        FLOWER_PUMP(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        for message in take_pending_messages(state, nodes_mapping):
            queue.put(message)
        f_stop.wait(PASS_INTERVAL_S)


def install() -> None:
    vce_api.add_messages_to_queue = add_messages_to_queue


def main() -> None:
    from flwr.simulation.app import flwr_simulation

    install()
    sys.argv[0] = "flwr-simulation"  # Flower names its exit event by the command it was started as
    flwr_simulation()


if __name__ == "__main__":
    main()
