"""The fine-tuning job's YAML config, checked whole before anything starts: every unknown field, wrong type or
value out of range is named by its path (`lora.r`, `train.lr`), so a bad config never reaches a worker."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATA_FORMATS = ("text", "chat", "completion")
LORA_TARGETS = ("routed_experts", "shared_experts", "attention")
EXPERT_SELECTIONS = ("all", "esft_gate", "esft_token")


def _positive_int(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path} must be an integer >= 1, got {value!r}")
    return value


def _number(path: str, value: Any, *, low: float, high: float = float("inf"), low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path} must be a number, got {value!r}")
    if (value <= low if low_open else value < low) or value > high:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{path} must be in {bounds}, got {value!r}")
    return float(value)


def _choice(path: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{path} must be one of {list(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class DataConfig:
    path: str
    format: str = "text"  # text: {"text"}; chat: {"messages"}; completion: {"prompt", "completion"}
    max_seq_len: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.path must be a file path, got {self.path!r}")
        _choice("data.format", self.format, DATA_FORMATS)
        _positive_int("data.max_seq_len", self.max_seq_len)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        _positive_int("lora.r", self.r)
        _number("lora.alpha", self.alpha, low=0, low_open=True)
        _number("lora.dropout", self.dropout, low=0, high=1)
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"lora.targets must be a non-empty list of {list(LORA_TARGETS)}, got {targets!r}")
        for i, t in enumerate(targets):
            _choice(f"lora.targets[{i}]", t, LORA_TARGETS)
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))


@dataclass(frozen=True)
class ExpertsConfig:
    select: str = "all"  # all | esft_gate (share of gate scores) | esft_token (share of routed tokens)
    threshold: float = 0.2  # per layer, experts highest first until their share reaches this

    def __post_init__(self) -> None:
        _choice("experts.select", self.select, EXPERT_SELECTIONS)
        _number("experts.threshold", self.threshold, low=0, high=1, low_open=True)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 50
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 10
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            _positive_int(f"train.{name}", getattr(self, name))
        _number("train.lr", self.lr, low=0, high=1, low_open=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"train.seed must be an integer, got {self.seed!r}")
        _number("train.weight_decay", self.weight_decay, low=0)


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False

    def __post_init__(self) -> None:
        _positive_int("scaling.num_workers", self.num_workers)
        if not isinstance(self.use_gpu, bool):
            raise ValueError(f"scaling.use_gpu must be true or false, got {self.use_gpu!r}")


def _levels(path: str, value: Any, *, rising: bool, low: float, high: float = float("inf")) -> tuple:
    """Three thresholds (warn, lower the learning rate, stop), each stricter than the one before."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{path} must be three numbers (warn, lower_lr, stop), got {value!r}")
    levels = tuple(_number(f"{path}[{i}]", v, low=low, high=high) for i, v in enumerate(value))
    ordered = levels[0] < levels[1] < levels[2] if rising else levels[0] > levels[1] > levels[2]
    if not ordered:
        raise ValueError(f"{path} must {'rise' if rising else 'fall'} from warn to stop, got {list(value)}")
    return levels


@dataclass(frozen=True)
class GuardConfig:
    """When the imbalance guard acts, per MoE layer. Thresholds are (warn, lower_lr, stop)."""

    max_over_mean: tuple = (1.5, 2.0, 3.0)  # busiest expert's load over the mean, as multiples of the base's
    entropy: tuple = (0.9, 0.8, 0.7)  # routing entropy, as fractions of the base's
    overlap: tuple = (0.5, 0.35, 0.2)  # top-k overlap with the base model's routing on the probe batch
    lr_factor: float = 0.5  # what lower_lr multiplies the learning rate by
    max_lr_drops: int = 2  # a lower_lr due after this many stops the run instead
    cooldown_steps: int = 10  # steps after a lower_lr before another (the new rate needs time to tell)
    aux_loss_coef: float = 0.0  # sequence-wise balance loss (DeepSeek-V3); 0: off
    probe_examples: int = 8  # training examples whose routing is compared with the base model's; 0: no probe
    probe_every: int = 1  # steps between two probes

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_over_mean", _levels("guard.max_over_mean", self.max_over_mean, rising=True,
                                                          low=1))
        object.__setattr__(self, "entropy", _levels("guard.entropy", self.entropy, rising=False, low=0, high=1))
        object.__setattr__(self, "overlap", _levels("guard.overlap", self.overlap, rising=False, low=0, high=1))
        _number("guard.lr_factor", self.lr_factor, low=0, high=1, low_open=True)
        if isinstance(self.max_lr_drops, bool) or not isinstance(self.max_lr_drops, int) or self.max_lr_drops < 0:
            raise ValueError(f"guard.max_lr_drops must be an integer >= 0, got {self.max_lr_drops!r}")
        _positive_int("guard.cooldown_steps", self.cooldown_steps)
        _number("guard.aux_loss_coef", self.aux_loss_coef, low=0)
        if isinstance(self.probe_examples, bool) or not isinstance(self.probe_examples, int) or self.probe_examples < 0:
            raise ValueError(f"guard.probe_examples must be an integer >= 0, got {self.probe_examples!r}")
        _positive_int("guard.probe_every", self.probe_every)


_SECTIONS = {"data": DataConfig, "lora": LoraConfig, "experts": ExpertsConfig, "train": TrainConfig,
             "scaling": ScalingConfig, "guard": GuardConfig}


@dataclass(frozen=True)
class FinetuneConfig:
    model: str
    data: DataConfig
    output_dir: str
    lora: LoraConfig = field(default_factory=LoraConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    deployment: Any = None  # None: the model in each worker; else the serving deployment (file or mapping)

    @classmethod
    def from_dict(cls, raw: Any, *, base_dir: str | Path | None = None) -> FinetuneConfig:
        """Checks and builds the config; relative paths (model, data.path, output_dir) are taken from
        `base_dir` (the config file's directory) when given."""
        if not isinstance(raw, dict):
            raise ValueError(f"the fine-tuning config must be a mapping, got {type(raw).__name__}")
        _no_unknown_fields(cls, raw, "")
        for name in ("model", "data", "output_dir"):
            if raw.get(name) is None:
                raise ValueError(f"the config needs {name!r}")
        kwargs: dict[str, Any] = {}
        for name, section in _SECTIONS.items():
            if name in raw:
                kwargs[name] = _section(name, section, raw[name])
        for name in ("model", "output_dir"):
            if not isinstance(raw[name], str) or not raw[name]:
                raise ValueError(f"{name} must be a path, got {raw[name]!r}")
            kwargs[name] = _resolve(raw[name], base_dir)
        kwargs["data"] = dataclasses.replace(kwargs["data"], path=_resolve(kwargs["data"].path, base_dir))
        deployment = raw.get("deployment")
        if deployment is not None and not isinstance(deployment, (str, dict)):
            raise ValueError(f"deployment must be a file path or a mapping, got {deployment!r}")
        if isinstance(deployment, str):
            deployment = _resolve(deployment, base_dir)
        return cls(**kwargs, deployment=deployment)

    @classmethod
    def load(cls, path: str | Path) -> FinetuneConfig:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        return cls.from_dict(raw, base_dir=path.parent)


def _section(name: str, cls: type, raw: Any):
    if raw is None:
        return cls() if name != "data" else _section(name, cls, {})
    if not isinstance(raw, dict):
        raise ValueError(f"{name} must be a mapping, got {raw!r}")
    _no_unknown_fields(cls, raw, f"{name}.")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw]
    if missing:
        raise ValueError(f"{name}.{missing[0]} is required")
    return cls(**raw)


def _no_unknown_fields(cls: type, raw: dict, prefix: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown config field '{prefix}{unknown[0]}'; known: {known}")


def _resolve(path: str, base_dir: str | Path | None) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return str(p)
