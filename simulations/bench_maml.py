"""MAML meta-step throughput: both execution paths, DP off and on, against a classic reference.

The reference is per-task MAML written the way learn2learn, higher and torchopt do it: clone the
weights, take inner steps with ``create_graph=True``, one task at a time, and accumulate the
query loss's gradient with ``backward()``. It computes no per-task gradients, so it cannot be
made private; fedmeta must match it while producing them.
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
from shared.maml import EpisodeBatch, MetaLearner, Params, pick_device, resolve_path
from shared.models import build_model


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
    parser.add_argument("--order", default="second", choices=["second", "first"])
    parser.add_argument("--steps", type=int, default=3, help="timed meta-steps per measurement (median taken)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="launch kernels one by one on the GPU")
    parser.add_argument("--paths", default="loop,batched", help="comma-separated execution paths to time")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tasks_per_s(step: Callable[[], object], tasks: int, steps: int, device: torch.device) -> float:
    step()  # warm-up: allocator, kernels, thread pools
    _synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return tasks / statistics.median(times)


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

    tasks_per_s: dict[str, dict[str, float]] = {}
    for path in args.paths.split(","):
        tasks_per_s[path] = {
            "dp_off": _tasks_per_s(
                lambda path=path: learner.per_episode_outer_grads(params, batch, path).mean(), e, args.steps, device
            ),
            "dp_on": _tasks_per_s(
                lambda path=path: release.release(learner.per_episode_outer_grads(params, batch, path)),
                e,
                args.steps,
                device,
            ),
        }
    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    reference = _tasks_per_s(lambda: reference_meta_step(learner, leaves, batch), e, args.steps, device)
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
