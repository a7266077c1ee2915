"""Run configuration: one dataclass, settable from YAML files and from the command line."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from primal_dual_attention.training.compilation import COMPILE_CHOICES

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from primal_dual_attention.attention import AttentionConfig

PROTOCOLS = ("paper", "clean")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "radam")
SCHEDULES = ("cosine", "linear", "step", "none")


#: the options that take one of a few names (``task`` and ``variant``: their registries)
CHOICES: dict[str, tuple[str, ...]] = {
    "protocol": PROTOCOLS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS,
    "norm": ("pre", "post"), "compile": COMPILE_CHOICES, "pooling": ("flatten", "mean")}


@dataclass(frozen=True)
class NumberRule:
    """What a numeric option allows, said in words for the error (``text``)."""

    text: str
    holds: Callable[[float], bool]
    allows_none: bool = False


#: every numeric option of :class:`TrainConfig` and its allowed range, checked before data loads
NUMBER_RULES: dict[NumberRule, tuple[str, ...]] = {
    NumberRule(">= 1", lambda v: v >= 1): (
        "epochs", "batch_size", "eval_batch_size", "dim", "depth", "heads", "mlp_dim", "img_size",
        "step_size"),
    NumberRule(">= 1 or None", lambda v: v >= 1, allows_none=True): (
        "steps", "max_len", "max_eval_samples", "max_train_samples", "lr_base_batch", "checkpoint_every"),
    NumberRule(">= 0", lambda v: v >= 0): ("seed", "num_workers", "repeated_aug", "warmup_epochs"),
    NumberRule(">= 0 or None (0 and None: torch's default)", lambda v: v >= 0,
               allows_none=True): ("threads",),
    NumberRule(">= 0 or None", lambda v: v >= 0, allows_none=True): ("warmup_steps",),
    NumberRule("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0): (
        "weight_decay", "mixup", "cutmix"),
    NumberRule("a finite number > 0", lambda v: math.isfinite(v) and v > 0): ("lr", "budget", "gamma"),
    NumberRule("a finite number >= 0 or None (0 and None: no clipping)",
               lambda v: math.isfinite(v) and v >= 0, allows_none=True): ("grad_clip",),
    NumberRule("in [0, 1)", lambda v: 0.0 <= v < 1.0): ("dropout", "drop_path", "random_erase"),
    NumberRule("in [0, 1]", lambda v: 0.0 <= v <= 1.0): ("label_smoothing",),
    NumberRule("in (0, 1)", lambda v: 0.0 < v < 1.0): ("val_fraction",),
}


def check_device_name(device: str) -> str:
    """``auto`` or a torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``); whether the
    device exists is checked when the run starts (``training.distributed.resolve_device``)."""
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:<index> or another torch device, "
                             f"got {device!r}") from None
    return device


@dataclass
class TrainConfig:
    """Every option of ``pda train``; a YAML config may set any of them (SPEC.md §4)."""

    # what to run
    task: str = "uea"
    dataset: str = "JapaneseVowels"
    data_dir: str | None = None
    variant: str = "softmax"
    head_scales: list[int] | None = None
    window: int | None = None
    # any other AttentionConfig field for every layer, e.g. {eps: 1.0e-3, pack_heads: true}: a new
    # attention switch reaches training, sweeps and benchmarks with no change here
    attention_options: dict[str, Any] | None = None
    seed: int = 0
    protocol: str = "clean"  # SPEC.md §4; "paper" picks the epoch on the test split (optimistic)
    val_fraction: float = 0.2
    track_test: bool = False  # clean protocol: also log test accuracy per epoch (plots only)
    max_len: int | None = None  # LRA: sequence length (default: the task's published one)
    max_eval_samples: int | None = None  # evaluate on n validation/test samples (fixed random draw)
    max_train_samples: int | None = None  # LRA ListOps/Pathfinder: train on at most n (laps repeat them)
    data_file: str | None = None  # task lm: a UTF-8 text file instead of the IMDb reviews
    # images (ImageNet recipe; timm does the augmentation)
    model: str | None = None  # a timm model name (task imagenet); default deit_tiny_patch16_224[_<variant>]
    img_size: int = 224
    drop_path: float = 0.0
    auto_augment: str | None = None  # timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1
    random_erase: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    repeated_aug: int = 0  # > 1: timm's RepeatAugSampler with this many repeats
    num_workers: int = 4
    # model
    dim: int = 128
    depth: int = 3
    heads: int = 8
    mlp_dim: int = 256
    dropout: float = 0.1
    norm: str = "post"
    pooling: str = "flatten"
    # optimisation
    epochs: int = 100
    batch_size: int = 16
    eval_batch_size: int = 256
    lr: float = 1e-3
    lr_base_batch: int | None = None  # linear scaling: the lr used is lr * batch_size / lr_base_batch
    weight_decay: float = 0.0
    optimizer: str = "radam"
    schedule: str = "cosine"
    warmup_epochs: int = 0
    steps: int | None = None  # train this many steps (LRA); epochs then counts evaluation rounds
    warmup_steps: int | None = None  # with steps: warm-up in steps instead of epochs
    budget: float = 1.0  # fraction of steps and warmup_steps actually run (CPU budgets)
    step_size: int = 30
    gamma: float = 0.1
    grad_clip: float | None = 4.0
    label_smoothing: float = 0.0
    precision: str = "fp32"
    compile: str = "auto"  # auto (CUDA: on, CPU: off), on, off, cudagraphs
    compile_backend: str = "inductor"  # torch.compile backend (e.g. aot_eager to debug)
    # padded sequence batches: widths rounded up to one of this many lengths per octave (few
    # distinct shapes); 0 = trimmed to the longest sequence; None = 8 on CUDA, 0 elsewhere
    length_buckets: int | None = None
    # running
    device: str = "auto"
    out_dir: str = "runs"
    run_name: str | None = None  # the run's folder under <variant>/ (default: seed<k>, seed<k>-2, ...)
    resume: bool = False
    # also write last.pt every n optimizer steps inside a round, so that a crash or a stop loses
    # at most n steps (--resume continues from that step exactly); None: after each round only
    checkpoint_every: int | None = None
    overwrite: bool = False  # replace the run in the folder instead of refusing or moving on
    threads: int | None = None
    progress: bool | None = None  # progress bars: None = only on a terminal, True = always

    def check_here(self) -> TrainConfig:
        """The checks that depend on this machine, made before data loads by ``pda train`` and
        ``pda sweep`` (not by :meth:`validate`: ``pda eval`` reads configs of other machines): the
        device exists, ``compile`` fits it, ``compile_backend`` is one torch knows."""
        from primal_dual_attention.training.compilation import check_compile
        from primal_dual_attention.training.distributed import resolve_device

        device = resolve_device(self.device, int(os.environ.get("LOCAL_RANK", 0)),
                                int(os.environ.get("WORLD_SIZE", 1)))
        check_compile(self.compile, self.compile_backend, device)
        return self

    def validate(self) -> TrainConfig:
        """Check values with a clear error naming the option, the value and what is allowed."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for rule, names in NUMBER_RULES.items():
            for name in names:
                value = getattr(self, name)
                if not (value is None and rule.allows_none or value is not None and rule.holds(value)):
                    raise ValueError(f"{name} must be {rule.text}, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads (each head takes dim / heads features), got "
                             f"dim={self.dim}, heads={self.heads}")
        if self.steps is None and (self.budget != 1.0 or self.warmup_steps is not None):
            raise ValueError(f"budget and warmup_steps count optimizer steps, so they need steps; got "
                             f"budget={self.budget}, warmup_steps={self.warmup_steps}, steps=None")
        self.check_step_budget()
        self.warn_long_warmup()
        if self.compile == "cudagraphs" and self.compile_backend != "inductor":
            raise ValueError(f"compile='cudagraphs' is a mode of the inductor backend, got "
                             f"compile_backend={self.compile_backend!r} (it would run without CUDA graphs)")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: --resume continues a run, "
                             "--overwrite starts it again")
        if self.run_name is not None and (not self.run_name or Path(self.run_name).name != self.run_name
                                          or self.run_name in (".", "..")):
            raise ValueError(f"run_name must be a plain folder name, got {self.run_name!r}")
        buckets = self.length_buckets
        if buckets is not None and (buckets < 0 or buckets & (buckets - 1)):
            raise ValueError(f"length_buckets must be 0 (no buckets), a power of two or None (8 on CUDA), "
                             f"got {buckets}")
        check_device_name(self.device)
        self.task, self.dataset = canonical_task(self.task, self.dataset)
        if self.task == "lm" and self.data_file is not None and self.dataset in (TrainConfig.dataset, "imdb"):
            # the run folder names the text, not the UEA default nor the built-in IMDb a recipe names
            self.dataset = Path(self.data_file).stem
        from primal_dual_attention.training.tasks import check_task

        try:
            check_task(self)
        except TypeError as error:  # an ill-typed attention option, e.g. head_scales of strings
            raise ValueError(str(error)) from None
        return self

    def check_step_budget(self) -> None:
        """A step-budgeted run takes at least one optimizer step per evaluation round."""
        steps = self.total_steps()
        if steps is not None and steps < self.epochs:
            advice = f"set epochs <= {steps} or more steps" if steps else "raise steps or budget"
            raise ValueError(f"steps x budget = {self.steps} x {self.budget} = {steps} optimizer steps, "
                             f"fewer than epochs = {self.epochs} evaluation rounds (each round takes at "
                             f"least one step); {advice}")

    def warn_long_warmup(self) -> None:
        """Warn when the warm-up lasts the whole run: the learning rate then never reaches its peak
        and never decays (e.g. a recipe's ``warmup_steps`` kept with fewer ``--steps``)."""
        total = self.total_steps()
        if total is not None and self.warmup_steps is not None:
            warmup, unit, length = round(self.warmup_steps * self.budget), "steps", total
        else:
            warmup, unit, length = self.warmup_epochs, "epochs", self.epochs
        if warmup and warmup >= length:
            warnings.warn(f"the warm-up ({warmup} {unit}) lasts the whole run ({length} {unit}): the "
                          "learning rate never reaches lr nor decays; lower warmup_steps / "
                          "warmup_epochs", stacklevel=2)

    def attention(self) -> AttentionConfig:
        """The run's attention as one value (SPEC.md §2), handed to the task's model."""
        from primal_dual_attention.attention import AttentionConfig, attention_config

        hints = typing.get_type_hints(AttentionConfig)  # ``eps: 1e-3`` reads as a string in YAML
        extra = {name: _as_float(hints[name], value) if name in hints else value
                 for name, value in (self.attention_options or {}).items()}
        own = sorted(set(extra) & {"variant", "head_scales", "window"})
        if own:
            raise ValueError(f"attention_options {own}: these are options of their own (variant, "
                             "head_scales, window); set them there")
        head_scales = None if self.head_scales is None else tuple(self.head_scales)
        return attention_config(AttentionConfig(variant=self.variant, head_scales=head_scales,
                                                window=self.window), **extra)

    def effective_lr(self) -> float:
        """``lr``, linearly scaled by ``batch_size / lr_base_batch`` when that is set."""
        return self.lr if self.lr_base_batch is None else self.lr * self.batch_size / self.lr_base_batch

    def total_steps(self) -> int | None:
        """Optimizer steps of a step-budgeted run: ``steps x budget`` (validation refuses fewer
        than one per evaluation round)."""
        return None if self.steps is None else round(self.steps * self.budget)

    def run_dir(self) -> Path:
        """``out_dir/<task>/<dataset>/<protocol>/<variant>/<run_name or seed<k>>``; the engine
        sets ``run_name`` when that folder holds another run (``training.engine.claim_run_dir``)."""
        return (Path(self.out_dir) / self.task / self.dataset / self.protocol / self.variant
                / (self.run_name or f"seed{self.seed}"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _type_name(annotation: Any) -> str:
    """``int``, ``float | None``, ``list[int]``: an annotation as it reads in the source."""
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _accepts(annotation: Any, value: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if origin in (list, dict):
        if not isinstance(value, origin):
            return False
        if origin is list:
            (item,) = typing.get_args(annotation)
            return all(_accepts(item, v) for v in value)
        return True
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


#: a decimal number: PyYAML (YAML 1.1) reads ``1e-3`` (no dot) as this string
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _as_float(annotation: Any, value: Any) -> Any:
    """``value`` as a float where the option takes a float and the value is a number written as
    a string (``lr: 1e-3`` in YAML); anything else unchanged, for the type check to judge."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()) and _accepts(annotation, 0.5):
        return float(value)
    return value


def config_from_mapping(values: dict[str, Any], where: str, base: TrainConfig | None = None) -> TrainConfig:
    """Overlay ``values`` on ``base``; reject unknown keys and wrong types, naming them."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of option: value, got {type(values).__name__}")
    if isinstance(values.get("compile"), bool):  # checkpoints written when compile was a switch
        values = values | {"compile": "on" if values["compile"] else "off"}
    types_ = _field_types()
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; valid options: {sorted(types_)}")
    values = {key: _as_float(types_[key], value) for key, value in values.items()}
    for key, value in values.items():
        if not _accepts(types_[key], value):
            raise ValueError(
                f"{where}: option {key!r} must be of type {_type_name(types_[key])}, "
                f"got {type(value).__name__} {value!r}")
    current = dataclasses.asdict(base) if base is not None else {}
    return TrainConfig(**{**current, **values})


def saved_config(values: dict[str, Any], where: str) -> TrainConfig:
    """The validated config of a finished or saved run (a checkpoint's, a ``config.yaml``), read
    as a new one would be, except for what earlier versions accepted and a new run refuses: a
    task-specific option the task does not read goes back to its default (it changed nothing),
    and a step budget below one step per round becomes what such a run took, one step per round."""
    from primal_dual_attention.training.tasks import TASK_READS, TASK_SPECIFIC_OPTIONS

    cfg = config_from_mapping(values, where)
    if cfg.total_steps() is not None and cfg.total_steps() < cfg.epochs:
        cfg = dataclasses.replace(cfg, steps=cfg.epochs, budget=1.0)
    task, dataset = canonical_task(cfg.task, cfg.dataset)
    try:
        reads = TASK_READS[task](dataclasses.replace(cfg, task=task, dataset=dataset))
    except KeyError:  # an unknown task or LRA dataset: validate() names it
        return cfg.validate()
    defaults = TrainConfig()
    return dataclasses.replace(cfg, **{name: getattr(defaults, name) for name in TASK_SPECIFIC_OPTIONS
                                       if name not in reads}).validate()


def load_yaml_config(path: str | os.PathLike | Traversable, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML config file (a path or a bundled resource) over ``base`` (defaults when None)."""
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {error.start}: {error.reason})") from None
    except yaml.YAMLError as error:  # one line: where, and PyYAML's reason without its excerpt
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    return config_from_mapping(values, str(path), base)


def dataset_config_path(task: str, dataset: str) -> Traversable:
    """The per-dataset recipe bundled in the package, ``configs/<task>/<dataset>.yaml``."""
    return resources.files("primal_dual_attention") / "configs" / task / f"{dataset}.yaml"


def canonical_task(task: str, dataset: str) -> tuple[str, str]:
    """Task aliases: ``lra-<name>`` is task ``lra`` on dataset ``<name>``."""
    return ("lra", task.removeprefix("lra-")) if task.startswith("lra-") else (task, dataset)


def bundled_config(task: str, dataset: str, base: TrainConfig) -> TrainConfig:
    """``base`` overlaid with the bundled ``configs/<task>/<dataset>.yaml`` when there is one
    (task ``lra-<name>`` reads ``configs/lra/<name>.yaml``)."""
    path = dataset_config_path(*canonical_task(task, dataset))
    return load_yaml_config(path, base) if path.is_file() else base


def config_fields() -> list[dataclasses.Field]:
    return list(fields(TrainConfig))
