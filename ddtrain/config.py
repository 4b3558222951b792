"""Typed run configuration: YAML files + command-line overrides, validated with clear errors.

A config is a YAML mapping of sections (model, optimizer, schedule, data, train, dist,
chaos) to keys. Defaults live in the dataclasses below; a YAML file and then
``--set section.key=value`` overrides change them. Anything unknown, of the wrong
type or out of range is a `ConfigError` (exit 2) that names the key and says what
would be valid ("did you mean ...?").

Every rank resolves the same config; `Config.digest()` is what ranks compare at start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ddtrain import choices
from ddtrain.errors import ConfigError


@dataclass
class ModelConfig:
    layers: list = field(default_factory=lambda: [
        {"type": "flatten"},
        {"type": "linear", "out": 512}, {"type": "relu"},
        {"type": "linear", "out": 512}, {"type": "relu"},
        {"type": "linear", "out": 10},
    ])
    init: str = "pytorch"          # pytorch | he | xavier
    loss: str = "cross_entropy"    # cross_entropy | mse | hinge
    label_smoothing: float = 0.0   # cross_entropy only: torch's CrossEntropyLoss(label_smoothing=)


@dataclass
class OptimizerConfig:
    name: str = "sgd"              # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    name: str = "cosine"           # constant | step | cosine
    warmup_epochs: float = 0.0     # linear warm-up (cosine only)
    step_epochs: float = 1.0       # "step": multiply by gamma every step_epochs
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # or torchvision:NAME
    normalize: str = "standard"     # standard | unit (x/255, PyTorch's ToTensor)
    drop_last: bool = False         # drop the last partial global batch of an epoch
    train_samples: Optional[int] = None  # train on the first N training images
    crop_pad: int = 0               # training images: random crop after padding this many pixels (0: off)
    hflip: bool = False             # training images: random horizontal flip (ddtrain.data.augment)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128          # the GLOBAL batch, whatever the number of ranks
    seed: int = 0
    log_every: int = 50            # steps between step records in metrics.jsonl
    checkpoint_every: int = 0      # steps between checkpoints (0: at the end of each epoch only)
    keep_checkpoints: int = 3
    eval_batch_size: int = 1000
    nonfinite: str = "stop"        # stop | skip: what a non-finite loss or gradient does


@dataclass
class DistConfig:
    bucket_mb: float = 1.0         # gradient bucket size for the overlapped allreduce
    # Allreduce buckets during backward (true), or one call after it (false). true overlaps only
    # where the node has a core none of its ranks' threads occupies (MPICH progresses a
    # nonblocking call only inside MPI calls otherwise: slower, see ddtrain bench) and runs the
    # blocking call elsewhere; always: buckets anyway (an MPI with its own progress thread).
    overlap: Union[bool, Literal["always"]] = False
    deterministic: bool = False    # bitwise identical weights for any number of ranks
    # Reduce and update through each node's shared memory instead of an allreduce (CPU, several
    # ranks on every node and as many on each, not deterministic). auto: wherever it applies, the
    # allreduce elsewhere; true: refuse to start where it cannot apply; false: always the allreduce.
    shared_memory: Union[bool, Literal["auto"]] = "auto"
    micro_shards: int = 8          # fixed micro-shards per global batch (deterministic mode)
    timeout: Optional[float] = None  # seconds a collective may take (None: from step times)
    fingerprint_every: int = 200   # steps between cross-rank weight fingerprint checks (0: off)
    straggler_ratio: float = 1.5   # a rank this much slower than the median is named


@dataclass
class ChaosConfig:
    """Fault injection for tests and drills (`ddtrain chaos` sets these)."""

    rank: Optional[int] = None     # the rank that misbehaves
    step: Optional[int] = None     # at this global step
    action: str = "kill"           # kill (SIGKILL) | stop (SIGSTOP) | raise | nan | diverge (nudge the weights)
    checkpoint_kill_point: Optional[int] = None  # SIGKILL rank 0 at this point of a checkpoint write


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of everything that must agree across ranks (chaos excluded)."""
        d = self.to_dict()
        d.pop("chaos")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


CHOICES = {
    ("model", "init"): choices.INIT_SCHEMES,
    ("model", "loss"): choices.LOSSES,
    ("optimizer", "name"): choices.OPTIMIZERS,
    ("schedule", "name"): choices.SCHEDULES,
    ("data", "normalize"): choices.NORMALIZE,
    ("train", "nonfinite"): choices.NONFINITE,
    ("chaos", "action"): choices.CHAOS_ACTIONS,
}

# (section, key): (lowest allowed, whether the lowest is excluded)
RANGES = {
    ("optimizer", "lr"): (0.0, True),
    ("optimizer", "momentum"): (0.0, False),
    ("optimizer", "weight_decay"): (0.0, False),
    ("optimizer", "eps"): (0.0, True),
    ("optimizer", "beta1"): (0.0, False),
    ("optimizer", "beta2"): (0.0, False),
    ("schedule", "warmup_epochs"): (0.0, False),
    ("schedule", "step_epochs"): (0.0, True),
    ("schedule", "gamma"): (0.0, True),
    ("schedule", "min_lr"): (0.0, False),
    ("data", "train_samples"): (1, False),
    ("data", "crop_pad"): (0, False),
    ("train", "epochs"): (1, False),
    ("train", "batch_size"): (1, False),
    ("train", "seed"): (0, False),
    ("train", "log_every"): (1, False),
    ("train", "checkpoint_every"): (0, False),
    ("train", "keep_checkpoints"): (1, False),
    ("train", "eval_batch_size"): (1, False),
    ("dist", "bucket_mb"): (0.0, True),
    ("dist", "micro_shards"): (1, False),
    ("dist", "timeout"): (0.0, True),
    ("dist", "fingerprint_every"): (0, False),
    ("dist", "straggler_ratio"): (1.0, True),
    ("chaos", "rank"): (0, False),
    ("chaos", "step"): (0, False),
    ("chaos", "checkpoint_kill_point"): (0, False),
}


_did_you_mean = choices.did_you_mean


def _check_value(where: str, value: Any, annotation: Any) -> Any:
    """`value` converted to the annotated type, or a ConfigError naming `where`."""
    hint = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:  # Optional[X], or X | Literal["word", ...]
        words = [w for a in hint if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        if value is None and type(None) in hint or value in words and isinstance(value, str):
            return value
        others = [a for a in hint if a is not type(None) and typing.get_origin(a) is not Literal]
        if words:
            if isinstance(value, others[0]):
                return value
            raise ConfigError(f"{where}: expected {others[0].__name__} or {' or '.join(map(repr, words))}, "
                              f"got {type(value).__name__} {value!r}")
        annotation = others[0]
    kind = {"int": int, "float": float, "bool": bool, "str": str, "list": list}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""), annotation)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(cfg: Config, data: Any, source: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, optimizer, ...), "
                          f"got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for sec_name, sec_values in data.items():
        if sec_name not in sections:
            raise ConfigError(f"{source}: unknown section {sec_name!r}{_did_you_mean(str(sec_name), sections)}; "
                              f"valid sections: {', '.join(sections)}")
        section = getattr(cfg, sec_name)
        if not isinstance(sec_values, dict):
            raise ConfigError(f"{source}: section {sec_name!r} must be a mapping of keys, "
                              f"got {type(sec_values).__name__}")
        for key, value in sec_values.items():
            _set(section, sec_name, str(key), value, source)


def _set(section, sec_name: str, key: str, value: Any, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {sec_name}.{key}{_did_you_mean(key, fields)}; "
                          f"valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(type(section))
    setattr(section, key, _check_value(f"{source}: {sec_name}.{key}", value, hints[key]))


def _validate(cfg: Config) -> None:
    for (sec, key), choices in CHOICES.items():
        v = getattr(getattr(cfg, sec), key)
        if v not in choices:
            raise ConfigError(f"{sec}.{key} must be one of {', '.join(choices)}, not {v!r}"
                              f"{_did_you_mean(str(v), choices)}")
    for (sec, key), (low, exclusive) in RANGES.items():
        v = getattr(getattr(cfg, sec), key)
        if v is None:
            continue
        if v < low or (exclusive and v == low):
            op = ">" if exclusive else ">="
            raise ConfigError(f"{sec}.{key} must be {op} {low}, got {v}")
    if not 0.0 <= cfg.model.label_smoothing < 1.0:
        raise ConfigError(f"model.label_smoothing must be in [0, 1), got {cfg.model.label_smoothing}")
    if cfg.model.label_smoothing and cfg.model.loss != "cross_entropy":
        raise ConfigError(f"model.label_smoothing applies to loss cross_entropy only, not {cfg.model.loss!r}:"
                          " remove it or set model.loss: cross_entropy")
    if not isinstance(cfg.model.layers, list) or not cfg.model.layers:
        raise ConfigError("model.layers must be a non-empty list of layer specs like {type: linear, out: 10}")
    from ddtrain.data.registry import resolve  # the one place dataset names are known
    try:
        resolve(cfg.data.dataset)
    except ConfigError as e:
        raise ConfigError(f"data.dataset: {e}") from None


def bundled_configs() -> dict[str, Path]:
    """The configs shipped with ddtrain by name: the repository's configs/ in a source checkout,
    the package ddtrain.configs in an installed wheel."""
    here = Path(__file__).resolve().parent
    dirs = [here.parent / "configs", here / "configs"]
    found: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            found.setdefault(f.stem, f)
    return found


def config_path(name_or_path: str) -> Path:
    """A config file: an existing path, or a bundled config's name (mlp, quickstart, tanh, tiny, cnn, cnn-small)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    bundled = bundled_configs()
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    if stem in bundled:
        return bundled[stem]
    names = sorted(bundled)
    raise ConfigError(f"config {name_or_path!r} not found: give a YAML file path or one of "
                      f"{', '.join(names)}{_did_you_mean(stem, names)}")


def load_config(name_or_path: str | None = "mlp", overrides: dict | None = None,
                sets: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `overrides` {"train.epochs": 3}, then `--set k=v` strings."""
    cfg = Config()
    if name_or_path:
        path = config_path(name_or_path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
        _merge(cfg, data, str(path))
    for dotted, value in (overrides or {}).items():
        _apply_dotted(cfg, dotted, value, "option")
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set optimizer.lr=0.1")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        _apply_dotted(cfg, dotted.strip(), value, "--set")
    _validate(cfg)
    return cfg


def _apply_dotted(cfg: Config, dotted: str, value: Any, source: str) -> None:
    if "." not in dotted:
        raise ConfigError(f"{source} {dotted!r}: expected section.key, e.g. optimizer.lr")
    sec_name, key = dotted.split(".", 1)
    sections = {f.name for f in dataclasses.fields(cfg)}
    if sec_name not in sections:
        raise ConfigError(f"{source}: unknown section {sec_name!r}{_did_you_mean(sec_name, sections)}; "
                          f"valid sections: {', '.join(sorted(sections))}")
    _set(getattr(cfg, sec_name), sec_name, key, value, source)


def config_from_dict(data: dict) -> Config:
    """A Config from a resolved dict (e.g. the one stored in a checkpoint)."""
    cfg = Config()
    _merge(cfg, data, "checkpoint config")
    _validate(cfg)
    return cfg
