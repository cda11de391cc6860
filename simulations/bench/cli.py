"""``fedmeta bench NAME [--json]``: benchmarks that print numbers, never pass/fail."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

# benchmark -> module exposing add_arguments(parser) and run(args) -> dict
BENCHMARKS: dict[str, str] = {
    "maml": "simulations.bench.maml",
    "ingest": "simulations.bench.ingest",
    "scale": "simulations.bench.scale",
    "adapt": "simulations.bench.adapt",
    "quality": "simulations.bench.quality",
    "deployment": "simulations.bench.deployment",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks that print JSON")
    names = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        sub.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        module.add_arguments(sub)
        sub.set_defaults(handler=lambda args, module=module: _run(module, args))


def _run(module: Any, args: argparse.Namespace) -> int:
    result = module.run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    elif hasattr(module, "table"):
        print(module.table(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {json.dumps(value)}")
    return 0
