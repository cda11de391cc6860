"""``fedmeta server`` registers hospital keys and counts connected hospitals through the SuperLink's Control API
from its own process, as ``flwr supernode register`` and ``flwr supernode ls`` would."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.control import ControlApi
from server.deploy import ServerSettings, register_hospitals, settings_from_args, superlink_command
from shared.certs import CA_CERT, hospital_public_keys, make_certs
from shared.errors import UserError
from shared.flower_processes import (
    CONNECTION,
    ProcessTree,
    flower_env,
    free_port,
    stop_process_tree,
    wait_for_port,
)


def server_settings(tmp_path: Path) -> ServerSettings:
    args = argparse.Namespace(
        out=tmp_path / "run", rounds=None, host="127.0.0.1", port=free_port(), control_port=free_port(),
        certs=tmp_path / "certs", insecure=False, run_config=[], min_hospitals=None,
    )  # fmt: skip
    return settings_from_args(args)


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerSettings]:
    """The SuperLink ``fedmeta server`` starts (TLS, hospital authentication), without its run."""
    tmp = tmp_path_factory.mktemp("control")
    make_certs(tmp / "certs", ["h0", "h1"], [])
    settings = server_settings(tmp)
    settings.run_dir.mkdir(parents=True)
    log_path = settings.run_dir / "superlink.log"
    with open(log_path, "ab") as log:
        process = ProcessTree(superlink_command(settings), flower_env(settings.run_dir / "flwr-home"), log)
    try:
        wait_for_port(settings.control_port, process, log_path)
        yield settings
    finally:
        stop_process_tree(process)


def control_api(settings: ServerSettings) -> ControlApi:
    assert settings.certs is not None
    return ControlApi(CONNECTION, settings.control_address, settings.certs / CA_CERT)


@pytest.mark.slow
@pytest.mark.deployment
def test_keys_are_registered_once_and_a_later_start_finds_them_registered(
    superlink: ServerSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert superlink.certs is not None
    keys = hospital_public_keys(superlink.certs)
    control = control_api(superlink)
    try:
        register_hospitals(keys, control)
        register_hospitals(keys, control)  # the next `fedmeta server` start on the same run folder
        assert control.online_nodes() == 0
    finally:
        control.close()
    assert capsys.readouterr().out.splitlines() == [
        "fedmeta server: hospital h0 registered",
        "fedmeta server: hospital h1 registered",
        "fedmeta server: hospital h0 was registered before",
        "fedmeta server: hospital h1 was registered before",
    ]


@pytest.mark.slow
@pytest.mark.deployment
def test_a_key_that_is_not_a_nist_ec_public_key_is_one_error_naming_it(superlink: ServerSettings) -> None:
    assert superlink.certs is not None
    broken = superlink.certs / "hospitals" / "broken.key.pub"
    broken.write_text("ssh-ed25519 not-a-key broken\n")
    control = control_api(superlink)
    try:
        with pytest.raises(UserError, match=f"^{broken} is not a readable OpenSSH public key") as raised:
            control.register("broken", broken)
    finally:
        control.close()
        broken.unlink()
    assert len(str(raised.value).splitlines()) == 1


def test_a_control_api_that_does_not_answer_is_one_error(tmp_path: Path) -> None:
    make_certs(tmp_path / "certs", ["h0"], [])
    settings = server_settings(tmp_path)  # nothing listens on its control port
    control = control_api(settings)
    try:
        with pytest.raises(UserError, match=r"^registering .*h0\.key\.pub failed: ") as raised:
            control.register("h0", tmp_path / "certs" / "hospitals" / "h0.key.pub")
    finally:
        control.close()
    assert len(str(raised.value).splitlines()) == 1
