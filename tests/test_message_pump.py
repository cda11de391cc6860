"""The simulation SuperLink's message pump: Flower's deliveries from one walk over the stored messages."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from queue import Queue

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID, TaskType
from flwr.supercore.object_store.object_store_factory import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from simulations import message_pump

# (partition of the destination hospital, tag): two for hospital 0, one for 1, one for 3, which the pump is
# not told about (a node of no virtual hospital of this run)
MESSAGES = [(0, "a"), (0, "b"), (1, "c"), (3, "d")]
PUMPED = (0, 1, 2)


@pytest.fixture(autouse=True)
def superlink_identity() -> Iterator[None]:
    """Messages take their run from the process's task identity, as in the SuperLink's simulation process."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def federation_with_messages(ttl: float = 600.0) -> tuple[InMemoryLinkState, dict[int, int]]:
    """A run's in-memory LinkState with four virtual hospitals and MESSAGES pushed to them as the ServerApp's
    grid pushes; the node -> partition mapping of the hospitals in PUMPED."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(simulation=True), ObjectStoreFactory())
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, TaskType.SIMULATION)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
    nodes = vce_api._register_nodes(4, factory)
    node_of = {partition: node for node, partition in nodes.items()}
    grid = InMemoryGrid(factory)
    grid.push_messages(
        Message(RecordDict(), node_of[partition], "train", ttl=ttl, group_id=tag) for partition, tag in MESSAGES
    )
    return state, {node: partition for node, partition in nodes.items() if partition in PUMPED}


def tags(messages: list[Message]) -> list[str]:
    return sorted(m.metadata.group_id for m in messages)


def flower_pass(state: InMemoryLinkState, nodes: dict[int, int]) -> list[Message]:
    """One pass of Flower 1.42's pump: each node asks for one message."""
    return [m for node in nodes for m in state.get_message_ins(node_id=node, limit=1)]


def test_each_pass_delivers_what_flowers_pump_delivers_one_message_per_hospital() -> None:
    ours, nodes = federation_with_messages()
    flowers, flower_nodes = federation_with_messages()
    passes = [tags(message_pump.take_pending_messages(ours, nodes)) for _ in range(3)]
    assert passes == [tags(flower_pass(flowers, flower_nodes)) for _ in range(3)]
    assert passes == [["a", "c"], ["b"], []]
    assert all(m.metadata.delivered_at != "" for m in ours.message_ins_store.values() if m.metadata.group_id != "d")


def test_a_message_for_a_node_the_pump_does_not_serve_stays_undelivered() -> None:
    state, nodes = federation_with_messages()
    while message_pump.take_pending_messages(state, nodes):
        pass
    (left,) = [m for m in state.message_ins_store.values() if m.metadata.delivered_at == ""]
    assert left.metadata.group_id == "d"


def test_an_expired_message_is_dropped_not_delivered() -> None:
    state, nodes = federation_with_messages(ttl=1.0)
    for message in state.message_ins_store.values():
        message.metadata.created_at -= 10.0
    assert message_pump.take_pending_messages(state, nodes) == []
    assert not state.message_ins_store


def test_the_installed_pump_feeds_the_simulation_queue_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    message_pump.install()
    assert vce_api.add_messages_to_queue is message_pump.add_messages_to_queue
    state, nodes = federation_with_messages()
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    pump = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, queue, nodes, stop))
    pump.start()
    try:
        delivered = [queue.get(timeout=60) for _ in range(3)]
    finally:
        stop.set()
        pump.join()
    assert tags(delivered) == ["a", "b", "c"]
    assert queue.empty()
