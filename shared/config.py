"""One typed configuration object for a fedmeta run.

The Flower run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, overridden by
``flwr run --run-config`` or the ``fedmeta`` CLI) is a flat mapping of dotted keys such as
``maml.inner-steps``. :meth:`FedMetaConfig.from_flat` turns it into this tree once, at the entry
point, and everything below receives the typed object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from shared.errors import UserError

Arch = Literal["conv4", "resnet18"]
Order = Literal["second", "first"]
ExecutionPath = Literal["auto", "loop", "batched"]
Accountant = Literal["rdp", "prv"]
Aggregation = Literal["episodes", "uniform"]
ServerOptimizer = Literal["adam", "sgd"]
LrSchedule = Literal["constant", "cosine"]
TaskKind = Literal["class-subsets", "one-vs-rest"]
PrivacyUnit = Literal["patient", "record"]
# The head a few-shot task's inner loop starts from: the meta-learned one, zeros, or the support set's
# class prototypes (Proto-MAML); see shared.learning.maml.
HeadInit = Literal["learned", "zero", "prototypes"]


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch = "conv4"
    in_channels: int = 1
    image_size: int = 28
    width: int = 32
    n_way: int = 2
    # a local .safetensors file the meta-model starts from (shared.learning.pretrained); "" for a random start
    init: str = ""

    def __post_init__(self) -> None:
        if self.arch == "conv4" and self.image_size not in (28, 64, 128):
            raise ConfigError(f"model.image-size={self.image_size} is not supported by conv4; use 28, 64 or 128")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"model.in-channels={self.in_channels}: use 1 (gray) or 3 (colour)")
        if self.n_way < 2:
            raise ConfigError(f"model.n-way={self.n_way}: a classifier needs at least 2 classes")


@dataclass(frozen=True)
class MamlConfig:
    inner_steps: int = 5
    inner_lr: float = 0.1
    # First order with a zero head: the best by the training hospitals' own validation on synthetic, blood and
    # pneumonia federations, and no worse held out after a fine-tune (BENCHMARKS.md); second order is an option.
    order: Order = "first"
    anil: bool = False
    # The inner loop adapts the head and the normalisation's scale and shift only (a site's scanner shift absorbed
    # by a few parameters); the convolutions stay at the meta-parameters.
    norm_affine: bool = False
    meta_sgd: bool = False
    path: ExecutionPath = "auto"
    cuda_graphs: bool = True
    head_init: HeadInit = "zero"

    def __post_init__(self) -> None:
        if self.inner_steps < 0:
            raise ConfigError(f"maml.inner-steps={self.inner_steps}: must be >= 0")
        if self.inner_lr <= 0:
            raise ConfigError(f"maml.inner-lr={self.inner_lr}: must be > 0")
        if self.anil and self.norm_affine:
            raise ConfigError("maml.anil and maml.norm-affine both choose what the inner loop adapts: set one")
        if self.head_init == "zero" and self.inner_steps == 0:
            raise ConfigError(
                "maml.head-init=zero with maml.inner-steps=0 predicts uniformly and learns nothing; "
                "set maml.inner-steps >= 1 or another maml.head-init"
            )


@dataclass(frozen=True)
class EpisodeConfig:
    k_shot: int = 5
    q_query: int = 10
    meta_batch: int = 16
    eval_episodes: int = 20
    eval_steps: int = 10
    # How training tasks are made from a hospital's labels (each a switch; see shared.learning.episodes):
    # N-way class subsets or one class against the rest, ...
    tasks: TaskKind = "class-subsets"
    # ... episode labels in random order (the head cannot memorise classes) or in class order ...
    permute_labels: bool = True
    # ... and, optionally, each episode seen through its own random scanner (a pseudo-task).
    augment: bool = False

    def __post_init__(self) -> None:
        if min(self.k_shot, self.q_query, self.meta_batch, self.eval_episodes) < 1 or self.eval_steps < 0:
            raise ConfigError(
                "episode.k-shot, episode.q-query, episode.meta-batch and episode.eval-episodes must be >= 1, "
                "episode.eval-steps >= 0"
            )


@dataclass(frozen=True)
class PrivacyConfig:
    """What a run asks of its hospitals' privacy. A real hospital's own policy (client.policy) decides:
    a run may make it stricter, never looser. Virtual hospitals of a simulation take these as their policy."""

    enabled: bool = True
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0  # 0 means: calibrate from target_epsilon over planned_releases
    target_epsilon: float = 8.0
    delta: float = 1e-5
    accountant: Accountant = "rdp"
    # Records are hashed into a fixed number of episode groups; each meta-step Poisson-samples
    # groups at rate groups_per_step / episode_groups.
    episode_groups: int = 16
    groups_per_step: int = 4
    # One patient's scans (when the hospital's labels name patients) or one scan is the protected record.
    unit: PrivacyUnit = "patient"
    # Releases the noise is calibrated for (target_epsilon spent after this many); 0: server.rounds x local-steps.
    planned_releases: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.groups_per_step <= self.episode_groups:
            raise ConfigError(
                f"privacy.groups-per-step={self.groups_per_step} must be between 1 and "
                f"privacy.episode-groups={self.episode_groups}"
            )
        if self.max_grad_norm <= 0:
            raise ConfigError(f"privacy.max-grad-norm={self.max_grad_norm}: must be > 0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta={self.delta}: must be in (0, 1)")
        if self.noise_multiplier < 0 or self.target_epsilon <= 0 or self.planned_releases < 0:
            raise ConfigError(
                "privacy.noise-multiplier and privacy.planned-releases must be >= 0, privacy.target-epsilon > 0"
            )

    @property
    def sample_rate(self) -> float:
        return self.groups_per_step / self.episode_groups


@dataclass(frozen=True)
class ServerConfig:
    rounds: int = 3
    # Rounds 1..pretrain-rounds train FedAvg-style (supervised gradients, classes in fixed order, no
    # inner loop); meta-learning starts from that model ("pretrain then meta-train").
    pretrain_rounds: int = 0
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    # Training hospitals asked for few-shot metrics on their own held-out split after each round.
    fraction_evaluate: float = 0.0
    # Few-shot evaluation (hospitals' own and held-out) every this many rounds, and after the last.
    eval_every: int = 1
    local_steps: int = 1
    meta_lr: float = 3e-3
    optimizer: ServerOptimizer = "adam"
    lr_schedule: LrSchedule = "constant"
    aggregation: Aggregation = "episodes"
    max_update_norm: float = 1e4
    round_timeout_s: float = 600.0
    # How long a round waits for min-train-nodes hospitals to connect before it goes on without an update.
    wait_for_nodes_s: float = 300.0
    out_dir: str = "runs/default"
    # Site-level DP: clip each hospital's gradient to site-clip, add noise to the sum in the strategy.
    site_dp: bool = False
    site_clip: float = 1.0
    site_noise_multiplier: float = 1.0
    site_delta: float = 1e-3
    # Audit: write what every reply carries (record, array and metric names, shapes, dtypes; never
    # values) to OUT_DIR/replies.jsonl (server.capture.ReplyCapture).
    capture_replies: bool = False

    def __post_init__(self) -> None:
        if self.pretrain_rounds < 0:
            raise ConfigError(f"server.pretrain-rounds={self.pretrain_rounds}: must be >= 0")
        if min(self.rounds, self.local_steps, self.min_train_nodes, self.eval_every) < 1:
            raise ConfigError(
                "server.rounds, server.local-steps, server.min-train-nodes and server.eval-every must be >= 1"
            )
        if not 0 < self.fraction_train <= 1 or not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError("server.fraction-train must be in (0, 1] and server.fraction-evaluate in [0, 1]")


@dataclass(frozen=True)
class DataConfig:
    # Folder holding hospital-000, hospital-001, ... and heldout/hospital-NNN; empty means
    # ~/.cache/fedmeta/federations/synthetic-seed<seed>. The apps only read it: a simulation writes it first.
    federation_dir: str = ""
    synthetic: bool = True
    # Hospitals after the training ones, never sampled for training: few-shot evaluation only.
    heldout_hospitals: int = 2
    # Where a simulation's virtual hospitals keep their privacy ledgers (STATE_DIR/<hospital folder name>);
    # empty means HOSPITAL/.fedmeta. A real hospital's ledger is where the hospital says, never here.
    state_dir: str = ""


@dataclass(frozen=True)
class FedMetaConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    maml: MamlConfig = field(default_factory=MamlConfig)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        if self.episode.tasks == "one-vs-rest" and self.model.n_way != 2:
            raise ConfigError(
                f"episode.tasks=one-vs-rest makes 2-way tasks but model.n-way={self.model.n_way}; "
                "set model.n-way=2 or episode.tasks=class-subsets"
            )

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> FedMetaConfig:
        """Build from dotted keys (``maml.inner-steps``); unknown keys are an error."""
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            section, _, name = key.rpartition(".")
            target = sections.setdefault(section, {}) if section else top
            target[name.replace("-", "_")] = value
        hints = get_type_hints(cls)
        kwargs = _coerce(cls, top, prefix="")
        for section, values in sections.items():
            if section not in hints or not dataclasses.is_dataclass(hints[section]):
                raise ConfigError(f"unknown config section '{section}' (known: {_section_names()})")
            kwargs[section] = hints[section](**_coerce(hints[section], values, prefix=section + "."))
        return cls(**kwargs)

    def to_flat(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in fields(value):
                    flat[f"{f.name}.{sub.name.replace('_', '-')}"] = getattr(value, sub.name)
            else:
                flat[f.name.replace("_", "-")] = value
        return flat

    def for_round(self, server_round: int) -> FedMetaConfig:
        """The settings a hospital trains round ``server_round`` with: FedAvg-style during pretraining."""
        if server_round > self.server.pretrain_rounds or server_round < 1:
            return self
        return self.supervised()

    def supervised(self) -> FedMetaConfig:
        """Plain supervised gradients on class-balanced batches: MAML with no inner loop, the model's own head and
        fixed labels."""
        return self.replace(maml={"inner_steps": 0, "head_init": "learned"}, episode={"permute_labels": False})

    def replace(self, **sections: Any) -> FedMetaConfig:
        """Copy with some fields of some sections changed: ``cfg.replace(maml={"order": "first"})``."""
        changes = {
            name: dataclasses.replace(getattr(self, name), **values) if isinstance(values, dict) else values
            for name, values in sections.items()
        }
        return dataclasses.replace(self, **changes)


def parse_assignments(pairs: list[str], flag: str) -> dict[str, str]:
    """``["maml.inner-steps=1", ...]`` from the command line; :meth:`FedMetaConfig.from_flat` types the values."""
    assignments = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: write KEY=VALUE, e.g. maml.inner-steps=1")
        assignments[key.strip()] = value.strip()
    return assignments


def _section_names() -> str:
    return ", ".join(f.name for f in fields(FedMetaConfig) if f.name != "seed")


def _coerce(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = prefix + name.replace("_", "-")
        if name not in hints or dataclasses.is_dataclass(hints[name]):
            known = ", ".join(prefix + f.name.replace("_", "-") for f in fields(cls))
            raise ConfigError(f"unknown config key '{key}' (known: {known})")
        out[name] = coerce_value(key, hints[name], value)
    return out


def coerce_value(key: str, hint: Any, value: Any) -> Any:
    choices = get_args(hint)
    if choices and all(isinstance(c, str) for c in choices):
        if value not in choices:
            raise ConfigError(f"config key '{key}'={value!r}: choose one of {', '.join(choices)}")
        return value
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}'={value!r} is not a valid {hint.__name__}") from None
    return value
