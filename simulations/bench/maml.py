"""MAML meta-step throughput: both execution paths, DP off and on, against a classic reference.

The reference is per-task MAML written the way learn2learn, higher and torchopt do it: clone the
weights, take inner steps (with ``create_graph=True`` in second order), one task at a time, and accumulate the
query loss's gradient with ``backward()``. It computes no per-task gradients, so it cannot be
made private; fedmeta must match it while producing them. It adapts from the stored head at every step; fedmeta,
with ``maml.head-init=zero``, skips the backbone's backward pass at the first step, where its gradient is zero.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from client.privacy import NoiseCalibration, PrivateRelease
from shared.config import MamlConfig, ModelConfig
from shared.learning.maml import EpisodeBatch, MetaLearner, Params, pick_device, resolve_path
from shared.learning.models import build_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=5)
    parser.add_argument("--q-query", type=int, default=15)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--arch", default="conv4", choices=["conv4", "resnet18"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--order", default=MamlConfig.order, choices=["second", "first"], help="default: maml.order's")
    parser.add_argument("--steps", type=int, default=3, help="timed meta-steps per measurement (median taken)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="launch kernels one by one on the GPU")
    parser.add_argument("--paths", default="loop,batched", help="comma-separated execution paths to time")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tasks_per_s(
    steps: dict[str, Callable[[], object]], tasks: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median throughput of each step; the steps take turns, so a change in machine load hits all alike."""
    for step in steps.values():  # warm-up: allocator, kernels, thread pools, CUDA graphs
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: tasks / statistics.median(t) for name, t in times.items()}


def reference_meta_step(learner: MetaLearner, params: Params, batch: EpisodeBatch) -> None:
    cfg = learner.cfg
    for p in params.values():
        p.grad = None
    for i in range(len(batch)):
        fast = dict(params)
        for _ in range(cfg.inner_steps):
            loss = F.cross_entropy(functional_call(learner.model, fast, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=cfg.order == "second")
            fast = {n: p - cfg.inner_lr * g for (n, p), g in zip(fast.items(), grads, strict=True)}
        F.cross_entropy(functional_call(learner.model, fast, (batch.query_x[i],)), batch.query_y[i]).backward()


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    torch.manual_seed(0)
    model_cfg = ModelConfig(
        arch=args.arch, in_channels=args.channels, image_size=args.image_size, width=args.width, n_way=args.n_way
    )
    learner = MetaLearner(
        build_model(model_cfg).to(device),
        MamlConfig(inner_steps=args.inner_steps, order=args.order, cuda_graphs=not args.no_cuda_graphs),
    )
    params = learner.init_meta_params()
    e, n, k, q, s, c = args.meta_batch, args.n_way, args.k_shot, args.q_query, args.image_size, args.channels
    batch = EpisodeBatch(
        torch.randn(e, n * k, c, s, s, device=device),
        torch.arange(n, device=device).repeat_interleave(k).repeat(e, 1),
        torch.randn(e, n * q, c, s, s, device=device),
        torch.arange(n, device=device).repeat_interleave(q).repeat(e, 1),
    )
    release = PrivateRelease(params, NoiseCalibration(1.0, max_grad_norm=1.0), expected_episodes=e)

    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    steps: dict[str, Callable[[], object]] = {"reference": lambda: reference_meta_step(learner, leaves, batch)}
    paths = args.paths.split(",")
    for path in paths:
        steps[f"{path}/dp_off"] = lambda path=path: learner.per_episode_outer_grads(params, batch, path).mean()
        steps[f"{path}/dp_on"] = lambda path=path: release.release(learner.per_episode_outer_grads(params, batch, path))
    measured = _tasks_per_s(steps, e, args.steps, device)
    reference = measured["reference"]
    tasks_per_s = {path: {dp: measured[f"{path}/{dp}"] for dp in ("dp_off", "dp_on")} for path in paths}
    chosen = resolve_path("auto", device)
    if chosen not in tasks_per_s:
        chosen = next(iter(tasks_per_s))
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "config": {
            "n_way": n,
            "k_shot": k,
            "q_query": q,
            "inner_steps": args.inner_steps,
            "meta_batch": e,
            "image_size": s,
            "channels": c,
            "model": f"{args.arch}-{args.width}",
            "order": args.order,
            "cuda_graphs": not args.no_cuda_graphs and device.type == "cuda",
        },
        "chosen_path": chosen,
        "tasks_per_s": {p: {k: round(v, 2) for k, v in d.items()} for p, d in tasks_per_s.items()},
        "reference_tasks_per_s": round(reference, 2),
        "dp_overhead": round(tasks_per_s[chosen]["dp_off"] / tasks_per_s[chosen]["dp_on"], 3),
        "speedup_vs_reference": round(tasks_per_s[chosen]["dp_on"] / reference, 3),
        "torch": torch.__version__,
    }
