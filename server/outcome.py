"""How a run ended, for the commands that started it: ``RUN_DIR/run-status.json``.

The ServerApp writes ``running`` when it starts and ``completed`` or ``failed`` (with a reason an operator
can act on) when it ends; ``fedmeta server`` and ``fedmeta simulate`` read it after the Flower run is over,
so a run that trained nothing exits non-zero with that reason instead of "finished".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from shared.atomic import atomic_write_json
from shared.errors import UserError
from shared.run_folder import STATUS

State = Literal["running", "completed", "failed"]


class RunFailed(UserError):
    """The run stopped without a usable result; the message says why, hospital by hospital where it can."""


@dataclass(frozen=True)
class RunOutcome:
    state: State
    reason: str = ""
    rounds: int = 0  # rounds the run was asked for
    rounds_trained: int = 0  # rounds whose replies stepped the meta-model


def write_outcome(run_dir: Path, outcome: RunOutcome) -> None:
    atomic_write_json(run_dir / STATUS, asdict(outcome))


def read_outcome(run_dir: Path) -> RunOutcome | None:
    """The run's outcome, or None when the ServerApp never wrote one (it did not start, or is an older one)."""
    path = run_dir / STATUS
    try:
        return RunOutcome(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is unreadable ({type(err).__name__}); see the run's log") from None
