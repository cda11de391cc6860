"""The SuperLink's Control API, called from the ``fedmeta server`` process itself.

``flwr supernode register`` and ``flwr supernode ls`` are each a process that imports Flower's CLI (about 2 s
on two cores, several times that while the SuperLink and the spare ServerApp start beside it); this is the
client they use (Flower's ``init_http_client_from_connection``, with the same TLS, interceptors and error
translation), opened once on the operator's loopback connection.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import click
import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from flwr.cli.auth_plugin.noop_auth_plugin import NoOpCliAuthPlugin
from flwr.cli.typing import SuperLinkConnection
from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
from flwr.supercore.error.base import ApiErrorCode, FlowerError
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

from shared.errors import UserError


class _AlreadyRegistered(Exception):
    pass


def _raise_if_already_registered(err: Exception) -> None:
    """``flwr_cli_exc_handler``'s hook: the one refusal that is not an error here."""
    if isinstance(err, httpx.HTTPStatusError):
        flower_error = FlowerError.from_json(err.response.text)
        if flower_error is not None and flower_error.code == ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE:
            raise _AlreadyRegistered


def public_key_bytes(path: Path) -> bytes:
    """The key as ``flwr supernode register`` sends it: an OpenSSH public key on a NIST EC curve."""
    try:
        key = load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise UserError(
            f"{path} is not a readable OpenSSH public key ({err}): use NAME.key.pub from `fedmeta certs`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise UserError(f"{path} is not a NIST EC public key: make the hospital's key pair with `fedmeta certs`")
    return public_key_to_bytes(key)


class ControlApi:
    """The operator's client of the SuperLink's Control API at ``address`` (TLS with ``root_certificates``, or
    insecure without)."""

    def __init__(self, connection_name: str, address: str, root_certificates: Path | None) -> None:
        connection = SuperLinkConnection(
            connection_name,
            address,
            root_certificates=None if root_certificates is None else str(root_certificates),
            insecure=root_certificates is None,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # Flower's "Using SuperLink: ..." line for a CLI user
            self.client = init_http_client_from_connection(connection, NoOpCliAuthPlugin(address))

    def close(self) -> None:
        self.client.close()

    def register(self, name: str, public_key: Path) -> bool:
        """Register a hospital's key under its name: True, or False when the SuperLink has it from an earlier start."""
        request = RegisterNodeRequest(public_key=public_key_bytes(public_key), name=name)
        try:
            with flwr_cli_exc_handler(_raise_if_already_registered):
                response = self.client.RegisterNode(request)
        except _AlreadyRegistered:
            return False
        except click.ClickException as err:
            raise UserError(f"registering {public_key} failed: {err.message}") from None
        if not response.node_id:
            raise UserError(f"registering {public_key} failed: the SuperLink returned no node id; see superlink.log")
        return True

    def online_nodes(self) -> int:
        """How many registered SuperNodes are connected now."""
        try:
            with flwr_cli_exc_handler():
                nodes = self.client.ListNodes(ListNodesRequest()).nodes_info
        except click.ClickException as err:
            raise UserError(f"listing the connected hospitals failed: {err.message}") from None
        return sum(node.status == "online" for node in nodes)
