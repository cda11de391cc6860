"""fedmeta's Flower ServerApp: meta-parameters out, private outer-loop gradients in, one run folder.

Restarting with the same ``server.out-dir`` continues from the last complete round. A run in which no
hospital can train (all refused, none connected, or no round with enough usable replies) stops early,
writes its records and report as far as it got, records why in ``run-status.json`` (:mod:`server.outcome`)
and raises :class:`server.outcome.RunFailed`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save

from server.capture import ReplyCapture
from server.checkpoint import ServerState, load_latest
from server.outcome import RunFailed, RunOutcome, write_outcome
from server.report import write_report
from server.round_log import drop_rounds_after, read_round_log, rounds_trained
from server.site_dp import SiteLevelDP
from server.strategy import MetaGradientStrategy, NoHospitalCanTrain
from shared.atomic import atomic_write, atomic_write_json
from shared.config import FedMetaConfig
from shared.errors import UserError
from shared.flower_processes import prompt_object_pulls, prompt_sleeps, quiet_app_output
from shared.learning.maml import MetaLearner
from shared.learning.models import build_model
from shared.learning.pretrained import load_initial_weights
from shared.run_folder import HELDOUT_COMPARISON, META_MODEL, METRICS

log = logging.getLogger(__name__)
# Flower 1.42's HttpGrid sleeps a fixed 3 s between pulls of replies: 0.1 s
GRID_SPEEDUP = 30
GRID_PULL_RETRY_S = 0.1  # a reply's arrays still on their way are asked for again this soon
app = ServerApp()
quiet_app_output()

PRIVACY_UNIT = (
    "Record-level DP per hospital: one scan (or one patient when the hospital's labels name patients) under "
    "remove-one-record adjacency; records are hashed into fixed episode groups, groups are Poisson-sampled, "
    "each group's outer-loop gradient is clipped to privacy.max-grad-norm C, and the accountant is told "
    "noise std / 2C (removing a record changes one clipped group gradient by at most 2C)."
)


def initial_state(cfg: FedMetaConfig) -> ServerState:
    torch.manual_seed(cfg.seed)
    params = MetaLearner(build_model(cfg.model), cfg.maml).init_meta_params()
    if cfg.model.init:
        params = load_initial_weights(cfg.model, params)
    return ServerState(
        round=0,
        meta_params=params,
        optimizer={},
        scheduler={},
        sampler_rng={},
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


def run_federation(grid: Grid, cfg: FedMetaConfig) -> Path:
    run_dir = Path(cfg.server.out_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    state = resume_state(cfg, run_dir)
    drop_rounds_after(run_dir, state.round)
    heldout = None
    if cfg.data.heldout_hospitals > 0:
        from server.heldout import HeldoutHospitals

        heldout = HeldoutHospitals(cfg)
    strategy_class = ReplyCapture if cfg.server.capture_replies else MetaGradientStrategy
    strategy = strategy_class(cfg, run_dir, state, heldout)
    server = cfg.server
    runner = (
        SiteLevelDP(strategy, server.site_noise_multiplier, server.site_clip, server.site_delta)
        if server.site_dp
        else strategy
    )
    write_outcome(run_dir, RunOutcome("running", rounds=cfg.server.rounds))
    remaining = cfg.server.rounds - state.round
    stopped = None
    if remaining > 0:
        try:
            runner.start(
                grid,
                ArrayRecord({n: p.detach().clone() for n, p in strategy.params.items()}),
                num_rounds=remaining,
                timeout=cfg.server.round_timeout_s,
                evaluate_fn=strategy.end_round,
            )
        except NoHospitalCanTrain as err:
            stopped = str(err)
    trained = rounds_trained(read_round_log(run_dir))
    if stopped is None and trained == 0:
        stopped = strategy.cannot_train(grid) or (
            f"no round trained the meta-model: every round had fewer than server.min-train-nodes="
            f"{cfg.server.min_train_nodes} usable replies (each reply's reason is in {METRICS})"
        )
    if trained > 0:  # an untrained initialisation is no result
        final = {n: p.detach().contiguous() for n, p in strategy.params.items()}
        atomic_write(run_dir / META_MODEL, lambda f: f.write(save(final)))
        if heldout is not None and stopped is None:
            atomic_write_json(run_dir / HELDOUT_COMPARISON, heldout.compare_with_scratch(final))
    outcome = RunOutcome(
        "failed" if stopped else "completed", stopped or "", rounds=cfg.server.rounds, rounds_trained=trained
    )
    summary = write_report(run_dir, cfg.to_flat(), {"privacy_unit": PRIVACY_UNIT}, outcome)
    print(summary, flush=True)
    write_outcome(run_dir, outcome)
    if stopped:
        for line in f"stopped: {stopped}".splitlines():
            print(f"fedmeta: {line}", flush=True)
        raise RunFailed(stopped)
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    prompt_deployment_grid()
    run_federation(grid, FedMetaConfig.from_flat(context.run_config))


def prompt_deployment_grid() -> None:
    """The deployment grid (Flower 1.42's ``HttpGrid``) looks for replies every 0.1 s instead of every 3 s, and
    asks again for a reply's arrays still on their way after 0.1 s instead of 1 s: a round is no longer at least
    3 s and about one poll longer than its slowest hospital."""
    from flwr.superlink.grid import http_grid

    prompt_sleeps(http_grid, GRID_SPEEDUP)
    prompt_object_pulls(http_grid, "pull_objects", GRID_PULL_RETRY_S)
