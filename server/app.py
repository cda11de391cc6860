"""fedmeta's Flower ServerApp: meta-parameters out, private outer-loop gradients in, one run folder.

Restarting with the same ``server.out-dir`` continues from the last complete round.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save

from server.capture import ReplyCapture
from server.checkpoint import ServerState, load_latest
from server.report import read_metrics, write_report
from server.strategy import MetaGradientStrategy
from shared.atomic import atomic_write, atomic_write_json
from shared.config import FedMetaConfig
from shared.errors import UserError
from shared.maml import MetaLearner
from shared.models import build_model

log = logging.getLogger(__name__)
app = ServerApp()

PRIVACY_UNIT = (
    "Record-level DP per hospital: one scan (or one patient when the hospital's labels name patients) under "
    "remove-one-record adjacency; records are hashed into fixed episode groups, groups are Poisson-sampled, "
    "each group's outer-loop gradient is clipped to privacy.max-grad-norm C, and the accountant is told "
    "noise std / 2C (removing a record changes one clipped group gradient by at most 2C)."
)


def initial_state(cfg: FedMetaConfig) -> ServerState:
    torch.manual_seed(cfg.seed)
    params = MetaLearner(build_model(cfg.model), cfg.maml).init_meta_params()
    return ServerState(
        round=0,
        meta_params=params,
        optimizer={},
        scheduler={},
        sampler_rng={},
        site_noise_rng=torch.empty(0, dtype=torch.uint8),
        config=cfg.to_flat(),
    )


def resume_state(cfg: FedMetaConfig, run_dir: Path) -> ServerState:
    fresh = initial_state(cfg)
    state = load_latest(run_dir)
    if state is None:
        return fresh
    changed = sorted(
        k for k, v in cfg.to_flat().items() if k.startswith(("model.", "maml.")) and state.config.get(k) != v
    )
    if changed:
        raise UserError(
            f"{run_dir} holds a run with other model settings ({', '.join(changed)}); "
            "use a new server.out-dir or the run's original settings"
        )
    if set(state.meta_params) != set(fresh.meta_params):
        raise UserError(f"{run_dir} holds meta-parameters of another model; use a new server.out-dir")
    # safetensors stores names sorted; the optimizer's state follows the model's parameter order
    state.meta_params = {name: state.meta_params[name] for name in fresh.meta_params}
    log.info("resuming %s after round %d", run_dir, state.round)
    return state


def drop_rounds_after(run_dir: Path, completed: int) -> None:
    """A kill between a metrics line and its checkpoint leaves lines the resumed run will redo."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = "".join(json.dumps(r) + "\n" for r in read_metrics(run_dir) if r["round"] <= completed)
        atomic_write(path, lambda f: f.write(kept.encode()))


def run_federation(grid: Grid, cfg: FedMetaConfig) -> Path:
    run_dir = Path(cfg.server.out_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    state = resume_state(cfg, run_dir)
    drop_rounds_after(run_dir, state.round)
    heldout = None
    if cfg.data.heldout_hospitals > 0:
        from simulations.heldout import HeldoutHospitals

        heldout = HeldoutHospitals(cfg)
    strategy_class = ReplyCapture if cfg.server.capture_replies else MetaGradientStrategy
    strategy = strategy_class(cfg, run_dir, state, heldout)
    remaining = cfg.server.rounds - state.round
    if remaining > 0:
        strategy.start(
            grid,
            ArrayRecord({n: p.detach().clone() for n, p in strategy.params.items()}),
            num_rounds=remaining,
            timeout=cfg.server.round_timeout_s,
            evaluate_fn=strategy.end_round,
        )
    final = {n: p.detach().contiguous() for n, p in strategy.params.items()}
    atomic_write(run_dir / "meta-model.safetensors", lambda f: f.write(save(final)))
    if heldout is not None:
        atomic_write_json(run_dir / "heldout-comparison.json", heldout.compare_with_scratch(final))
    summary = write_report(
        run_dir, cfg.to_flat(), {"privacy_unit": PRIVACY_UNIT, "rounds_completed": cfg.server.rounds}
    )
    print(summary, flush=True)
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, FedMetaConfig.from_flat(context.run_config))
