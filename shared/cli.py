"""The ``fedmeta`` command line.

Each subcommand lives next to the code it drives, in a module exposing
``register(subparsers) -> None``; the module is imported only when that subcommand runs, so
``fedmeta --help`` stays fast. Errors meant for the user are :class:`UserError`: one line, no
traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shared.errors import UserError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulations.simulate", "a federated run with many virtual hospitals on this machine"),
    "bench": ("simulations.bench.cli", "benchmarks that print JSON (maml, ingest, ...)"),
    "ingest": ("client.ingest", "read a hospital folder of DICOM files into the cache and report what was skipped"),
    "demo-data": ("simulations.data.synthetic", "write synthetic hospital folders of DICOM files"),
    "import-medmnist": ("simulations.data.medmnist", "turn MedMNIST .npz files into hospital folders of DICOM files"),
    "pretrain": ("simulations.pretrain", "pretrain a backbone on public .npz data that runs start from (model.init)"),
    "adapt": ("client.adapt", "adapt the meta-model to a new hospital from K labelled scans per class"),
    "predict": ("client.predict", "predict labels for DICOM files with an adapted model"),
    "certs": ("shared.certs", "make the CA, the server certificate and one key pair per hospital (offline)"),
    "server": ("server.deploy", "run the fedmeta server: a TLS SuperLink, hospital keys registered, the run streamed"),
    "client": ("client.deploy", "join a hospital to a fedmeta server: a SuperNode on the hospital's folder"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeta", description="Federated meta-learning for medical imaging.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == wanted:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"fedmeta {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedmeta {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
