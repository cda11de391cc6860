"""The hospital's SuperNode: Flower 1.42's receive-then-send loop, driven step by step with its own state."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, Status
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

from client.deploy import survive_stopped_runs

STOPPED_RUN, RUN = 1, 2
HOSPITAL_NODE = 7


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """A message takes its run and sender from the process's task identity."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def request(run_id: int, tag: str) -> Message:
    """A message of the server's ``run_id``."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
    return Message(RecordDict(), HOSPITAL_NODE, "train", group_id=tag)


def reply(to: Message) -> Message:
    """The hospital's ClientApp's reply."""
    TaskIdentity.node_id = HOSPITAL_NODE
    return Message(RecordDict(), reply_to=to)


class Hospital:
    """A SuperNode's state with the messages the server sent it and the replies its ClientApp gave."""

    def __init__(self) -> None:
        self.store = ObjectStoreFactory().store()
        self.state = InMemoryNodeState(self.store)
        self.sent: list[int] = []

    def put(self, message: Message) -> Message:
        start_client_internal._insert_message(message, self.state, self.store)
        return message

    def send(self, message: Message, object_tree: Any, runtime: float) -> tuple[set[str], str]:
        self.sent.append(message.metadata.run_id)
        return set(), "session"

    def push_replies(self) -> None:
        start_client_internal._push_messages(self.state, self.store, self.send, lambda *args: None)


def mended_supernode() -> types.ModuleType:
    """Flower's receive as fedmeta's hospital runs it."""
    supernode = types.ModuleType("supernode")
    supernode._pull_and_store_message = start_client_internal._pull_and_store_message
    survive_stopped_runs(supernode)
    return supernode


def ask_for_work(supernode: types.ModuleType, hospital: Hospital, **server: Any) -> int | None:
    """One ask of the SuperNode's loop (``server``: how the server answers; by default with nothing new); the run
    whose replies the loop then sends, if any."""
    answers = {
        "receive": lambda: None,
        **dict.fromkeys(("get_run", "get_fab", "pull_object", "confirm_message_received")),
    }
    return supernode._pull_and_store_message(
        state=hospital.state, object_store=hospital.store, node_config={}, trusted_entities=None, **answers | server
    )


def test_a_message_whose_run_stops_while_it_is_received_is_dropped_and_its_task_ended() -> None:
    """Flower leaves such a message to the ClientApp, which then waits minutes for arrays that never come while
    the next run's messages queue behind it."""
    hospital = Hospital()
    run = Run.create_empty(STOPPED_RUN)
    run.primary_task_type = TaskType.CLIENT_APP
    hospital.state.store_run(run)
    message = request(STOPPED_RUN, "train")
    message.metadata.__dict__["_message_id"] = message.object_id

    def run_stopped(run_id: int, object_id: str) -> bytes:
        raise RunNotRunningException

    received = (message, get_object_tree(message))
    assert ask_for_work(mended_supernode(), hospital, receive=lambda: received, pull_object=run_stopped) is None
    assert hospital.state.get_messages_legacy(is_reply=False) == []
    assert hospital.store.get(message.object_id) is None
    [task] = hospital.state.get_tasks(run_ids=[STOPPED_RUN])
    assert task.status.status == Status.FINISHED


def test_a_reply_that_comes_late_does_not_take_the_place_of_the_next_one() -> None:
    """The stopped run's message was received while the run stopped, and answered late; the next message's
    reply, which the server waits for, still goes out."""
    supernode = mended_supernode()
    hospital = Hospital()
    hospital.put(reply(hospital.put(request(STOPPED_RUN, "refused"))))
    training = hospital.put(request(RUN, "round 2"))
    hospital.push_replies()  # Flower's loop sends what is ready right after it received a message
    assert hospital.sent == [STOPPED_RUN]

    assert ask_for_work(supernode, hospital) is None  # still training: the loop just waits
    hospital.put(reply(training))
    assert ask_for_work(supernode, hospital) == RUN
    hospital.push_replies()
    assert hospital.sent == [STOPPED_RUN, RUN]
    assert ask_for_work(supernode, hospital) is None
