"""The SuperLink of ``fedmeta server``: Flower's own SuperLink, with its APIs split over two listeners.

Flower 1.42's ``flower-superlink`` serves its Fleet API (what SuperNodes use), its Control API (register
SuperNode keys, submit, list and stop runs) and its Runtime API (what the ServerApp uses) on one
``--host/--port``, and without Flower Enterprise (OIDC account authentication) the Control API accepts any
caller who completes the TLS handshake: anyone holding ``ca.crt`` could run the federation. Its
``--control-api-address`` only moves a deprecated gRPC copy of the Control API; the HTTP one stays on the
main port.

So this runs Flower's own SuperLink application (Flower's argument parsing, its FastAPI app and lifespan,
its TLS and SuperNode authentication) in one uvicorn server with two listening sockets:

- ``--fleet-host/--fleet-port``, the one port hospitals reach: only ``/v1/fleet/`` requests are served there;
  anything else gets 403 before any Flower handler runs;
- Flower's own ``--host/--port``, bound to loopback by ``fedmeta server``: Control and Runtime APIs (and
  Fleet, for a hospital on the server's machine). The ServerApp executor (:mod:`server.serverapp_executor`)
  connects there.

Usage: ``python -m server.superlink --fleet-host HOST --fleet-port PORT [flower-superlink arguments]``.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

import uvicorn
from flwr.supercore.http_logging import get_uvicorn_log_config
from flwr.supercore.logger import console_handler
from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config
from flwr.superlink.main import create_app

FLEET_PATH = "/v1/fleet/"
REFUSED_BODY = b"this port serves only the Fleet API (SuperNodes); the operator's Control API is not here"


class FleetOnlyOnPublicPort:
    """ASGI wrapper: on the public listener, refuse every request that is not a Fleet API call."""

    def __init__(self, app: Any, public_port: int) -> None:
        self.app = app
        self.public_port = public_port

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        server = scope.get("server")
        on_public_port = scope["type"] in ("http", "websocket") and server is not None and server[1] == self.public_port
        if on_public_port and not (scope["type"] == "http" and scope["path"].startswith(FLEET_PATH)):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(REFUSED_BODY)).encode())]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": REFUSED_BODY})
            return
        await self.app(scope, receive, send)


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main() -> None:
    ours = argparse.ArgumentParser(prog="python -m server.superlink", add_help=False)
    ours.add_argument("--fleet-host", required=True)
    ours.add_argument("--fleet-port", type=int, required=True)
    args, flower_args = ours.parse_known_args()
    sys.argv = [sys.argv[0], *flower_args]
    config = _parse_superlink_lifespan_config()  # Flower's own flower-superlink arguments and checks
    if config.port == args.fleet_port:
        raise SystemExit("the Fleet port and the Control/Runtime port must differ")
    app = FleetOnlyOnPublicPort(create_app(config, SuperLinkLifespan), args.fleet_port)
    server = uvicorn.Server(
        uvicorn.Config(
            app=app,
            reload=False,
            access_log=True,
            log_config=get_uvicorn_log_config(console_handler.level),
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            workers=1,
        )
    )
    sockets = [listening_socket(args.fleet_host, args.fleet_port), listening_socket(config.host, config.port)]
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
