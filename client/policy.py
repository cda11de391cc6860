"""A hospital's privacy policy: written by the hospital, read by its client, never set by a server.

The policy lives in a TOML file the hospital owns (``HOSPITAL/.fedmeta/policy.toml`` by default, or
``fedmeta client --policy FILE``), created with safe defaults on first use. It holds whether DP is on,
the lifetime epsilon budget and delta, the noise it calibrates for, clipping, the privacy unit, whether
and how often it answers evaluation requests, and upper limits on the work a server may ask for.

A run's config may make a hospital stricter, never looser: :meth:`HospitalPolicy.govern` turns the run's
settings into the ones the hospital trains with, or into a :class:`PolicyRefusal` naming the setting.
Privacy values take the stricter of the two (the smaller budget and delta, the larger noise); a run
that asks a DP hospital to train without DP, to sample more episode groups per step than the policy,
or for more work than its limits, is refused.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from shared.atomic import atomic_write, private_dir
from shared.config import Accountant, ConfigError, FedMetaConfig, PrivacyConfig, PrivacyUnit, coerce_value
from shared.errors import UserError

POLICY_FILE = "policy.toml"


class PolicyError(UserError):
    """The policy file is unreadable or holds a value it cannot hold."""


@dataclass(frozen=True)
class PolicyRefusal:
    """Why a hospital will not do what a run asks; sent to the server under ``REFUSED_POLICY``."""

    reason: str

    def __str__(self) -> str:
        return f"refused by the hospital's privacy policy: {self.reason}"


@dataclass(frozen=True)
class HospitalPolicy:
    # -- the guarantee
    dp: bool = True
    epsilon_budget: float = 8.0  # lifetime, over every run this hospital takes part in
    delta: float = 1e-5  # lowered to a power of 10 below 1 / (10 x privacy units) for a larger hospital
    planned_releases: int = 100  # the noise spends the budget in this many releases (several runs)
    noise_multiplier: float = 0.0  # a fixed noise multiplier instead (std / sensitivity); 0: calibrate
    max_grad_norm: float = 1.0
    privacy_unit: PrivacyUnit = "patient"
    episode_groups: int = 16
    groups_per_step: int = 4
    accountant: Accountant = "rdp"
    # -- evaluation: few-shot metrics on the test split are not privatised, so each answer is a choice
    evaluation_requests: int = 0  # lifetime answers; 0 answers none
    # -- the most work a server may ask for
    max_inner_steps: int = 20
    max_local_steps: int = 10
    max_meta_batch: int = 64
    max_eval_episodes: int = 50
    max_eval_steps: int = 100
    max_image_size: int = 128
    max_k_shot: int = 50
    max_q_query: int = 100
    max_n_way: int = 10
    max_width: int = 128
    max_episode_groups: int = 1024

    def __post_init__(self) -> None:
        problems = []
        reals = (self.epsilon_budget, self.delta, self.noise_multiplier, self.max_grad_norm)
        if not all(math.isfinite(value) for value in reals):
            problems.append("epsilon-budget, delta, noise-multiplier and max-grad-norm must be finite numbers")
        if self.epsilon_budget <= 0:
            problems.append("epsilon-budget must be > 0")
        if not 0 < self.delta < 1:
            problems.append("delta must be in (0, 1)")
        if self.planned_releases < 1:
            problems.append("planned-releases must be >= 1")
        if self.noise_multiplier < 0 or self.max_grad_norm <= 0:
            problems.append("noise-multiplier must be >= 0 and max-grad-norm > 0")
        if not 1 <= self.groups_per_step <= self.episode_groups:
            problems.append("groups-per-step must be between 1 and episode-groups")
        limits = (
            self.max_inner_steps,
            self.max_local_steps,
            self.max_meta_batch,
            self.max_eval_episodes,
            self.max_k_shot,
            self.max_q_query,
            self.max_n_way,
            self.max_width,
            self.max_episode_groups,
        )
        if self.evaluation_requests < 0 or min(limits) < 1 or self.max_eval_steps < 0 or self.max_image_size < 28:
            problems.append("evaluation-requests must be >= 0 and every max-* limit >= 1 (max-image-size >= 28)")
        if problems:
            raise PolicyError(f"privacy policy: {'; '.join(problems)}")

    @property
    def sample_rate(self) -> float:
        return self.groups_per_step / self.episode_groups

    @classmethod
    def for_virtual_hospital(cls, cfg: FedMetaConfig) -> HospitalPolicy:
        """A simulated hospital's policy: the simulation owns its virtual hospitals, so the run decides."""
        privacy, episode = cfg.privacy, cfg.episode
        return cls(
            dp=privacy.enabled,
            epsilon_budget=privacy.target_epsilon,
            delta=privacy.delta,
            planned_releases=privacy.planned_releases or cfg.server.rounds * cfg.server.local_steps,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            privacy_unit=privacy.unit,
            episode_groups=privacy.episode_groups,
            groups_per_step=privacy.groups_per_step,
            accountant=privacy.accountant,
            evaluation_requests=cfg.server.rounds,
            max_inner_steps=max(cls.max_inner_steps, cfg.maml.inner_steps),
            max_local_steps=max(cls.max_local_steps, cfg.server.local_steps),
            max_meta_batch=max(cls.max_meta_batch, episode.meta_batch),
            max_eval_episodes=max(cls.max_eval_episodes, episode.eval_episodes),
            max_eval_steps=max(cls.max_eval_steps, episode.eval_steps),
            max_image_size=max(cls.max_image_size, cfg.model.image_size),
            max_k_shot=max(cls.max_k_shot, episode.k_shot),
            max_q_query=max(cls.max_q_query, episode.q_query),
            max_n_way=max(cls.max_n_way, cfg.model.n_way),
            max_width=max(cls.max_width, cfg.model.width),
            max_episode_groups=max(cls.max_episode_groups, privacy.episode_groups),
        )

    def govern(self, cfg: FedMetaConfig) -> FedMetaConfig | PolicyRefusal:
        """The settings this hospital trains with when a run asks for ``cfg``, or why it will not."""
        asked, episode = cfg.privacy, cfg.episode
        if self.dp and not asked.enabled:
            return PolicyRefusal("the run asks privacy.enabled=false; this hospital's policy requires DP (dp = true)")
        limits = (
            ("maml.inner-steps", cfg.maml.inner_steps, "max-inner-steps", self.max_inner_steps),
            ("server.local-steps", cfg.server.local_steps, "max-local-steps", self.max_local_steps),
            ("episode.meta-batch", episode.meta_batch, "max-meta-batch", self.max_meta_batch),
            ("episode.eval-episodes", episode.eval_episodes, "max-eval-episodes", self.max_eval_episodes),
            ("episode.eval-steps", episode.eval_steps, "max-eval-steps", self.max_eval_steps),
            ("model.image-size", cfg.model.image_size, "max-image-size", self.max_image_size),
            ("episode.k-shot", episode.k_shot, "max-k-shot", self.max_k_shot),
            ("episode.q-query", episode.q_query, "max-q-query", self.max_q_query),
            ("model.n-way", cfg.model.n_way, "max-n-way", self.max_n_way),
            ("model.width", cfg.model.width, "max-width", self.max_width),
            ("privacy.episode-groups", asked.episode_groups, "max-episode-groups", self.max_episode_groups),
        )
        for key, value, limit_key, limit in limits:
            if value > limit:
                return PolicyRefusal(f"the run asks {key}={value}; this hospital allows at most {limit_key} = {limit}")
        if not (self.dp or asked.enabled):
            return cfg.replace(privacy={"enabled": False})
        if asked.sample_rate > self.sample_rate:
            return PolicyRefusal(
                f"the run samples privacy.groups-per-step / privacy.episode-groups = {asked.sample_rate:.3g} of the "
                f"episode groups per step; this hospital allows at most {self.sample_rate:.3g}"
            )
        return cfg.replace(
            privacy=PrivacyConfig(
                enabled=True,
                # privacy does not depend on C (the noise scales with it); a C far below the policy's would push
                # the noise towards float32's smallest numbers, so the run may lower it 1,000x at most
                max_grad_norm=max(min(self.max_grad_norm, asked.max_grad_norm), self.max_grad_norm / 1000),
                noise_multiplier=max(self.noise_multiplier, asked.noise_multiplier),
                target_epsilon=min(self.epsilon_budget, asked.target_epsilon),
                delta=min(self.delta, asked.delta),
                accountant=self.accountant,
                episode_groups=asked.episode_groups,
                groups_per_step=asked.groups_per_step,
                unit="patient" if "patient" in (self.privacy_unit, asked.unit) else "record",
                planned_releases=self.planned_releases,
            )
        )

    def to_toml(self) -> str:
        lines = [
            "# This hospital's privacy policy for fedmeta. Only this hospital writes it; a server's run config",
            "# can make it stricter, never looser. Edit and restart `fedmeta client` to change it. Raising",
            "# epsilon-budget grants more privacy spending: a decision for this hospital alone.",
        ]
        for f in fields(self):
            value = getattr(self, f.name)
            text = str(value).lower() if isinstance(value, bool) else f'"{value}"' if isinstance(value, str) else value
            lines.append(f"{f.name.replace('_', '-')} = {text}")
        return "\n".join(lines) + "\n"


POLICY_KEYS = tuple(f.name.replace("_", "-") for f in fields(HospitalPolicy))


def policy_from_mapping(values: dict[str, Any], where: str, base: HospitalPolicy | None = None) -> HospitalPolicy:
    """A policy from ``key = value`` entries (a TOML file or ``policy.KEY`` node-config overrides)."""
    typed_hints = get_type_hints(HospitalPolicy)
    changes = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in typed_hints:
            raise PolicyError(f"{where}: unknown policy key '{key}' (known: {', '.join(POLICY_KEYS)})")
        try:
            changes[name] = coerce_value(key, typed_hints[name], value)
        except ConfigError as err:
            raise PolicyError(f"{where}: {err}") from None
    return dataclasses.replace(base or HospitalPolicy(), **changes)


def load_policy(path: Path, overrides: dict[str, Any] | None = None) -> HospitalPolicy:
    """The hospital's policy at ``path`` (written with the defaults when missing), then ``overrides`` on top."""
    if not path.exists():
        private_dir(path.parent)
        default = HospitalPolicy().to_toml().encode()
        atomic_write(path, lambda f: f.write(default))
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        reason = f"privacy policy {path}: unreadable ({err})"
        raise PolicyError(f"{reason}; fix the file, or delete it for the defaults") from None
    policy = policy_from_mapping(values, f"privacy policy {path}")
    return policy_from_mapping(overrides or {}, "privacy policy overrides", base=policy)
