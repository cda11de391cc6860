"""What a hospital and an operator read: ``fedmeta client``'s lines from its SuperNode's log, ``fedmeta
server``'s from its run's stream, Flower's log lines where our apps run, and ``fedmeta simulate``'s progress
when its output is a log file. No processes: recorded Flower lines."""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

import pytest
from flwr.common.logger import log as flower_log

from client import deploy
from client.deploy import ClientSettings, SupernodeOutput, join, supernode_command
from server.deploy import RunOutput
from shared.errors import UserError
from shared.flower_processes import quiet_app_output
from simulations.simulate import LineProgress, progress_bar

SERVER = "127.0.0.1:8000"
RETRY = "WARNING :   Connection attempt failed, retrying in {:.2f} seconds"
CONNECTED = "INFO :      SuperNode ID: 1234"
REQUEST = "INFO :      [RUN 7]\nINFO :      Receiving: {} message (ID: ab12)"
ANSWERS_AGAIN = "INFO :      Connection successful after 12.30 seconds and 5 tries."
GAVE_UP = "WARNING :   Giving up reconnection after 600.00 seconds and 31 tries."
AFTER_GIVING_UP = "ERROR :     [Errno 111] Connection refused"


def settings(tmp_path: Path, server_wait_s: float = 600.0, activation_timeout_s: float = 90.0) -> ClientSettings:
    return ClientSettings(
        hospital=tmp_path,
        name="st-mary",
        server=SERVER,
        ca=None,
        key=None,
        port=9999,
        policy_file=None,
        policy_overrides={},
        activation_timeout_s=activation_timeout_s,
        server_wait_s=server_wait_s,
    )


def said(out: str) -> list[str]:
    return [line.removeprefix("fedmeta client: ") for line in out.splitlines()]


def test_a_server_that_stops_answering_is_reported_once_each_way_not_every_retry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stops = []
    output = SupernodeOutput(settings(tmp_path), stop=lambda: stops.append(True))
    requests = "\n".join(REQUEST.format(kind) for kind in ("query", "train", "train")).splitlines()
    for line in [CONNECTED, *requests, *(RETRY.format(s) for s in (0.5, 1.7, 3.9)), ANSWERS_AGAIN]:
        output(line)
    for line in [RETRY.format(0.4), RETRY.format(2.2), GAVE_UP, AFTER_GIVING_UP]:
        output(line)
    lines = said(capsys.readouterr().out)
    assert lines == [
        f"hospital st-mary connected to {SERVER} as SuperNode 1234",
        "run 7, request 1: asked for its name (roll call)",
        "run 7, request 2: asked to train",
        "run 7, request 3: asked to train",
        f"the server at {SERVER} stopped answering after run 7: its run ended, or it stopped or restarts; "
        "waiting for it up to 600s (--wait-for-server)",
        f"the server at {SERVER} answers again",
        f"the server at {SERVER} stopped answering after run 7: its run ended, or it stopped or restarts; "
        "waiting for it up to 600s (--wait-for-server)",
    ]
    assert output.gave_up and stops == [True]  # a connected SuperNode stays up after giving up: we stop it


def test_a_client_started_before_its_server_says_it_waits_and_lets_flower_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stops = []
    output = SupernodeOutput(settings(tmp_path, server_wait_s=0), stop=lambda: stops.append(True))
    for line in [RETRY.format(0.6), RETRY.format(1.1), GAVE_UP]:
        output(line)
    assert said(capsys.readouterr().out) == [f"waiting for the server at {SERVER} to answer, until Ctrl-C"]
    assert output.gave_up and output.node_id is None and stops == []


def test_a_refused_run_is_said_once_in_the_hospitals_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = SupernodeOutput(settings(tmp_path), stop=lambda: None)
    refusal = "fedmeta: refused run 7: its app (FAB sha256 1353ea9dacac) is not this hospital's installed fedmeta"
    for line in [CONNECTED, *REQUEST.format("train").splitlines(), refusal]:
        output(line)
    assert said(capsys.readouterr().out)[1:] == ["run 7, request 1: asked to train", refusal.removeprefix("fedmeta: ")]


def test_the_supernode_waits_for_the_server_only_as_long_as_the_hospital_said(tmp_path: Path) -> None:
    command = supernode_command(settings(tmp_path, server_wait_s=600))
    assert command[command.index("--max-wait-time") + 1] == "600"
    assert "--max-wait-time" not in supernode_command(settings(tmp_path, server_wait_s=0))  # 0: forever


def test_a_client_rejoins_a_server_that_forgot_it_and_stops_when_the_server_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    endings = iter(["forgotten", "server gone"])
    monkeypatch.setattr(deploy, "run_supernode", lambda *_: next(endings))
    join(settings(tmp_path))
    lines = said(capsys.readouterr().out)
    assert lines[1:] == [
        f"the server at {SERVER} no longer knows this SuperNode (a new run folder?): joining",
        f"the server at {SERVER} has not answered for 600s: stopping. Start `fedmeta client` again to join the "
        "server's next run",
    ]


def test_a_refused_key_is_tried_again_for_the_activation_timeout_from_its_first_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = [5000.0]  # long after the client started: waiting for the server does not use up the timeout
    attempts = []
    monkeypatch.setattr(deploy, "run_supernode", lambda *_: attempts.append(clock[0]) or "refused")
    monkeypatch.setattr(deploy.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(deploy.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    with pytest.raises(UserError, match=r"refused hospital st-mary's key .*register st-mary\.key\.pub"):
        join(settings(tmp_path, activation_timeout_s=12))
    assert attempts == [5000.0, 5005.0, 5010.0]
    waiting = [line for line in said(capsys.readouterr().out) if line.startswith("waiting")]
    assert waiting == [
        "waiting for the server to accept hospital st-mary's key, up to 12s: `fedmeta server` registers keys as it "
        "starts, and lets go of an earlier client with this key within a minute"
    ]


def test_progress_in_a_log_file_is_plain_lines_not_a_bar(capsys: pytest.CaptureFixture[str]) -> None:
    rounds = progress_bar(5, "rounds", "round", initial=1)  # pytest's captured stderr is not a terminal
    assert isinstance(rounds, LineProgress)
    for done in (1, 3, 0):
        rounds.update(done)
    hospitals = LineProgress(25, "writing hospitals", step=10)
    for _ in range(25):
        hospitals.update(1)
    assert capsys.readouterr().err.splitlines() == [
        "fedmeta simulate: rounds 2/5",
        "fedmeta simulate: rounds 5/5",
        "fedmeta simulate: writing hospitals 10/25",
        "fedmeta simulate: writing hospitals 20/25",
        "fedmeta simulate: writing hospitals 25/25",
    ]


def test_the_server_shows_round_lines_and_warnings_but_not_flowers_known_notices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = RunOutput()
    for line in [
        "Successfully started run 42",
        "WARNING :   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.",
        "fedmeta: round 1/1, 0/3 hospitals, 3 rejected (h0, h1, h2), epsilon max 0.00, 12.6s",
        "12/03/2026 13:44:34:WARNING:round 1: 0 usable replies < server.min-train-nodes=2: meta-parameters unchanged",
        "WARNING :   a warning of Flower's that matters",
        "ERROR :     ServerApp raised an exception",
        "ERROR :     Exit Code: 201",
    ]:
        output(line)
    assert output.run_id == "42"
    assert capsys.readouterr().out.splitlines() == [
        "fedmeta: round 1/1, 0/3 hospitals, 3 rejected (h0, h1, h2), epsilon max 0.00, 12.6s",
        "fedmeta server: warning: round 1: 0 usable replies < server.min-train-nodes=2: meta-parameters unchanged",
        "fedmeta server: warning: a warning of Flower's that matters",
    ]


def test_where_our_apps_run_flower_lines_do_not_reach_the_root_handler_opacus_adds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logging.getLogger("flwr"), "propagate", True)
    monkeypatch.delenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", raising=False)
    root_handler = logging.handlers.BufferingHandler(capacity=100)  # as Opacus' logging.basicConfig on import
    logging.getLogger().addHandler(root_handler)
    try:
        quiet_app_output()
        flower_log(logging.WARNING, "a Flower line, printed by Flower's own console handler")
        logging.getLogger("server.strategy").warning("one of ours")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert [record.getMessage() for record in root_handler.buffer] == ["one of ours"]
    assert os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "0"  # no accelerator tip when Ray starts
