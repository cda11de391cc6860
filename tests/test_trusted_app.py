"""The hospital's ClientApp executor warms up before its first training task: the roll call does not wait for it,
training does, and the warm-up releases nothing, writes no ledger and leaves the random stream as it was. A task
whose run is stopped while it is served does not end the executor."""

from __future__ import annotations

import hashlib
import logging
import shlex
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from flwr.app import MessageType
from flwr.supercore.constant import TaskType
from flwr.supernode.runtime import run_clientapp

from client.app import warm_up
from client.ledger import LEDGER_FILE, LedgerTerms, PrivacyLedger
from client.policy import POLICY_FILE, HospitalPolicy, load_policy
from client.privacy import calibrate_accountant_noise
from client.private_training import PrivateTraining
from client.trusted_app import EXECUTOR_COMMAND, serve_task, write_task_commands
from shared.config import FedMetaConfig
from shared.data.site_keys import STATE_FOLDER
from shared.installed_app import task_retry_invoker

FAB = b"the installed fedmeta"


class TaskClient:
    """The Runtime API client of one task, as far as ``serve_task`` uses it past the patched pulls and pushes."""

    def SendTaskHeartbeat(self, request: Any) -> None:
        pass

    def close(self) -> None:
        pass


def serve(message_type: str, warmed_up: threading.Thread, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Serve one task of ``message_type`` with the installed FAB; what the ClientApp saw when it was called."""
    message = SimpleNamespace(metadata=SimpleNamespace(message_type=message_type))  # as pulled from the SuperNode
    pushed: list[Any] = []
    monkeypatch.setattr(
        run_clientapp, "pull_task_input", lambda client: (message, "context", None, SimpleNamespace(content=FAB))
    )
    monkeypatch.setattr(run_clientapp, "push_message", lambda client, reply, context: pushed.append(reply))
    monkeypatch.setattr(run_clientapp, "push_task_output", lambda *args: None)
    seen: dict[str, Any] = {}

    def app(message: Any, context: str) -> str:
        seen["warm-up running"] = warmed_up.is_alive()
        return "reply"

    serve_task(TaskClient(), TaskType.CLIENT_APP, hashlib.sha256(FAB).hexdigest(), app, warmed_up)
    seen["pushed"] = pushed
    return seen


def test_the_roll_call_is_answered_during_the_warm_up_and_training_waits_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    finish = threading.Event()
    warmed_up = threading.Thread(target=finish.wait, daemon=True)
    warmed_up.start()
    assert serve(MessageType.QUERY, warmed_up, monkeypatch) == {"warm-up running": True, "pushed": ["reply"]}

    trained: dict[str, Any] = {}
    training = threading.Thread(target=lambda: trained.update(serve(MessageType.TRAIN, warmed_up, monkeypatch)))
    training.start()
    finish.set()
    training.join()
    assert trained == {"warm-up running": False, "pushed": ["reply"]}


def test_the_warm_up_calibrates_the_first_release_without_reading_scans_or_writing_the_ledger(tmp_path: Path) -> None:
    hospital = tmp_path / "hospital"  # no scans at all: the warm-up must not need them
    hospital.mkdir()
    state = hospital / STATE_FOLDER
    calibrate_accountant_noise.cache_clear()
    random_state = torch.random.get_rng_state()

    warm_up({"data-path": str(hospital), "hospital-name": "h0"})

    assert torch.equal(torch.random.get_rng_state(), random_state)
    assert not (state / LEDGER_FILE).exists()
    policy = load_policy(state / POLICY_FILE)
    assert policy == HospitalPolicy()  # the default policy, written as the first task would
    # the first release of a hospital of up to 1 / (10 delta) privacy units finds its noise calibrated
    governed = policy.govern(FedMetaConfig())
    assert isinstance(governed, FedMetaConfig)
    private = PrivateTraining(state / LEDGER_FILE, governed.privacy, policy, units=200)
    hits = calibrate_accountant_noise.cache_info().hits
    private.pinned_noise(PrivacyLedger(state / LEDGER_FILE, LedgerTerms("rdp", policy.delta), policy.epsilon_budget))
    assert calibrate_accountant_noise.cache_info().hits == hits + 1


def test_the_supernode_starts_this_executor_with_its_own_node_config(tmp_path: Path) -> None:
    node_config = 'data-path="/data/pacs export" hospital-name="st-mary" policy.epsilon-budget=3.0'
    write_task_commands(tmp_path, node_config)
    command = shlex.split((tmp_path / EXECUTOR_COMMAND).read_text().splitlines()[-1])
    assert command[0] == "exec" and command[2:] == ["-m", "client.trusted_app", "--node-config", node_config, "$@"]


@pytest.mark.parametrize("status", [401, 403])
def test_a_task_whose_run_was_stopped_fails_its_call_and_the_executor_serves_on(status: int) -> None:
    """Flower's retry invoker would SIGINT the whole executor on a 401 and raise past ``httpx.HTTPError`` on a
    403 (an operator's ``flwr stop`` while the hospital serves that run's task); a task's calls give up instead."""
    request = httpx.Request("POST", "http://127.0.0.1/v1/runtime/push-task-output")
    stopped = httpx.HTTPStatusError("stopped", request=request, response=httpx.Response(status, request=request))
    assert task_retry_invoker().should_giveup(stopped) is True
    unavailable = httpx.HTTPStatusError("busy", request=request, response=httpx.Response(503, request=request))
    assert task_retry_invoker().should_giveup(unavailable) is False  # still retried, as Flower does


def test_a_task_of_a_run_stopped_before_its_message_arrived_ends_unanswered_and_silent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The SuperNode ended the task (its run stopped while the message was received): the executor answers
    nothing, reports no failure to the hospital and is free for the next task."""
    request = httpx.Request("POST", "http://127.0.0.1/v1/runtime/pull-object")
    gone = httpx.HTTPStatusError("gone", request=request, response=httpx.Response(401, request=request))

    def pull_task_input(client: Any) -> None:
        raise gone

    calls: list[str] = []
    monkeypatch.setattr(run_clientapp, "pull_task_input", pull_task_input)
    monkeypatch.setattr(run_clientapp, "push_message", lambda *args: calls.append("reply"))
    monkeypatch.setattr(run_clientapp, "push_task_output", lambda *args: calls.append("task output"))
    ready = threading.Thread(target=lambda: None)
    ready.start()
    serve_task(TaskClient(), TaskType.CLIENT_APP, hashlib.sha256(FAB).hexdigest(), lambda **kw: "reply", ready)
    assert calls == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
