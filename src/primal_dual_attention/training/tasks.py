"""Task builders: turn a :class:`TrainConfig` into a model and its splits.

Each task is one small registered function, so the CLI, the sweep and the tests share them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection

from primal_dual_attention.models.vision import CIFAR, DEIT
from primal_dual_attention.training.config import TrainConfig
from primal_dual_attention.training.engine import Task

TASKS: dict[str, Callable[[TrainConfig], Task]] = {}
#: Per task: how many attention heads its model has under a config (None: known only once built).
TASK_HEADS: dict[str, Callable[[TrainConfig], int | None]] = {}
#: Options that only some tasks read (the model's shape, the data's split and augmentation).
TASK_SPECIFIC_OPTIONS = ("dim", "depth", "heads", "mlp_dim", "norm", "pooling", "val_fraction", "max_len",
                         "max_train_samples", "data_file", "model", "img_size", "drop_path", "auto_augment",
                         "random_erase", "mixup", "cutmix", "repeated_aug", "num_workers")
#: Per task: which of :data:`TASK_SPECIFIC_OPTIONS` it reads under a config.
TASK_READS: dict[str, Callable[[TrainConfig], frozenset[str]]] = {}
#: Per task: its own checks of the config that need no data (e.g. the dataset name).
TASK_CHECKS: dict[str, Callable[[TrainConfig], None]] = {}


def register_task(name: str, heads: Callable[[TrainConfig], int | None] = lambda cfg: cfg.heads,
                  reads: Collection[str] | Callable[[TrainConfig], Collection[str]] = (),
                  check: Callable[[TrainConfig], None] = lambda cfg: None):
    """Register a task builder; ``reads`` names the task-specific options it uses (a callable
    when that depends on the config, e.g. the LRA dataset), so that the others are refused;
    ``check`` raises on anything else the task can tell before data loads."""
    unknown = set() if callable(reads) else set(reads) - set(TASK_SPECIFIC_OPTIONS)
    if unknown:
        raise ValueError(f"reads names options that are not task-specific: {sorted(unknown)}")
    read = (lambda cfg: frozenset(reads(cfg))) if callable(reads) else (lambda cfg: frozenset(reads))

    def add(builder: Callable[[TrainConfig], Task]) -> Callable[[TrainConfig], Task]:
        TASKS[name], TASK_HEADS[name], TASK_READS[name], TASK_CHECKS[name] = builder, heads, read, check
        return builder

    return add


def task_names() -> list[str]:
    """Every name ``--task`` takes: the registered tasks and the ``lra-<dataset>`` aliases."""
    return sorted(TASKS) + [f"lra-{name}" for name in LRA_DATASET_READS]


def check_task(cfg: TrainConfig) -> None:
    """Check that the task exists, that it reads every task-specific option set away from its
    default (an option it ignores would silently change nothing), and that its attention fits its
    model's heads: called by :meth:`TrainConfig.validate`, so these mistakes are reported before
    data loads."""
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {task_names()}, got {cfg.task!r}")
    TASK_CHECKS[cfg.task](cfg)
    defaults, reads = TrainConfig(), TASK_READS[cfg.task](cfg)
    ignored = [f"{name}={getattr(cfg, name)!r}" for name in TASK_SPECIFIC_OPTIONS
               if name not in reads and getattr(cfg, name) != getattr(defaults, name)]
    if ignored:
        where = f"task {cfg.task!r}" + (f" on dataset {cfg.dataset!r}" if cfg.task == "lra" else "")
        raise ValueError(f"{where} does not use {', '.join(ignored)} (it would change nothing); leave "
                         f"{'it' if len(ignored) == 1 else 'them'} at the default. Of the task-specific "
                         f"options it reads {sorted(reads) or 'none'}")
    attention = cfg.attention()
    heads = TASK_HEADS[cfg.task](cfg)
    if heads is not None:
        attention.for_heads(heads)


def warn_long_scales(cfg: TrainConfig, length: int) -> None:
    """Warn (once: Python shows a warning once per message) when an SH scale exceeds the
    sequence: such a head pools every key into one (SPEC.md §2, Attention-SH)."""
    too_long = [s for s in cfg.head_scales or () if s > length]
    if too_long:
        warnings.warn(f"head_scales {too_long} exceed the sequence length {length}: such a head pools every "
                      "key into one", stacklevel=2)


def build_task(cfg: TrainConfig) -> Task:
    check_task(cfg)
    return TASKS[cfg.task](cfg)


@register_task("uea", reads=("dim", "depth", "heads", "mlp_dim", "norm", "pooling", "val_fraction"))
def build_uea_task(cfg: TrainConfig) -> Task:
    """UEA classification: padded series, the time-series transformer, protocol splits."""
    from primal_dual_attention.data.common import stratified_split
    from primal_dual_attention.data.uea import load_uea
    from primal_dual_attention.models.timeseries import TimeSeriesTransformer

    data = load_uea(cfg.dataset, cfg.data_dir)
    warn_long_scales(cfg, data.max_len)
    train, val = data.train, None
    if cfg.protocol == "clean":
        keep, hold = stratified_split(data.train.y, cfg.val_fraction, cfg.seed)
        train, val = data.train.subset(keep), data.train.subset(hold)
    model = TimeSeriesTransformer(
        data.num_channels, data.num_classes, data.max_len, dim=cfg.dim, depth=cfg.depth,
        num_heads=cfg.heads, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout, attention=cfg.attention(),
        norm=cfg.norm, pooling=cfg.pooling,
    )
    return Task(model=model, train=train, test=data.test, val=val, description=data.summary())


def check_no_length_buckets(cfg: TrainConfig) -> None:
    """Images have no sequence axis to pad, so length buckets would change nothing (0, what a
    run records for them, is accepted)."""
    if cfg.length_buckets:
        raise ValueError(f"task {cfg.task!r} does not use length_buckets={cfg.length_buckets} (its images "
                         "have no sequence length to bucket); leave it at the default")


@register_task("image", heads=lambda cfg: CIFAR["num_heads"], reads=("val_fraction",),
               check=check_no_length_buckets)
def build_image_task(cfg: TrainConfig) -> Task:
    """CIFAR-10 with a registered ``vit_cifar_<variant>`` timm model (``--dataset CIFAR10``)."""
    import timm

    import primal_dual_attention.timm  # noqa: F401  (registers the models)
    from primal_dual_attention.data.common import stratified_split
    from primal_dual_attention.data.images import load_cifar10

    if cfg.dataset.lower() not in ("cifar10", "cifar-10"):
        raise ValueError(f"task 'image' supports dataset 'CIFAR10', got {cfg.dataset!r}")
    name = f"vit_cifar_{cfg.variant}"
    if name not in timm.list_models("vit_cifar_*"):
        choices = [m.removeprefix("vit_cifar_") for m in timm.list_models("vit_cifar_*")]
        raise ValueError(f"variant {cfg.variant!r} has no registered CIFAR model (it needs a 2-D grid); "
                         f"choose from {choices}")
    train, test, classes = load_cifar10(cfg.data_dir)
    val = None
    if cfg.protocol == "clean":
        keep, hold = stratified_split(train.labels, cfg.val_fraction, cfg.seed)
        train, val = train.subset(keep), train.subset(hold)
        val.augment = False
    model = timm.create_model(name, num_classes=len(classes), drop_rate=cfg.dropout,
                              attention=cfg.attention())
    return Task(model=model, train=train, test=test, val=val,
                description=f"CIFAR-10: {len(train)} train / {len(test)} test images, {name}")


LRA_DEFAULT_LENGTHS = {"listops": 2000, "text": 4096, "image": 1024, "pathfinder": 1024, "retrieval": 4000}
LRA_GENERATED_SIZES = {"listops": (96_000, 2_000, 2_000), "pathfinder": (160_000, 20_000, 20_000)}
#: LRA's task-specific options beyond the model's shape, per dataset: ListOps and Pathfinder keep
#: ``max_train_samples`` (generated: make that many; read from files: the first ones), the token
#: tasks cut at ``max_len``; Image and Pathfinder have a fixed
#: length, which ``max_len`` may only repeat (:func:`check_lra`)
LRA_DATASET_READS = {"listops": ("max_len", "max_train_samples"), "text": ("max_len",),
                     "retrieval": ("max_len",), "image": ("max_len",),
                     "pathfinder": ("max_len", "max_train_samples")}
LRA_FIXED_LENGTH = ("image", "pathfinder")


def check_lra(cfg: TrainConfig) -> None:
    """The LRA dataset exists, and a fixed-length one is not given another ``max_len``."""
    if cfg.dataset not in LRA_DATASET_READS:
        raise ValueError(f"LRA dataset must be one of {sorted(LRA_DATASET_READS)}, got {cfg.dataset!r}")
    length = LRA_DEFAULT_LENGTHS[cfg.dataset]
    if cfg.dataset in LRA_FIXED_LENGTH and cfg.max_len not in (None, length):
        raise ValueError(f"max_len of LRA {cfg.dataset} is fixed at {length} pixels, got {cfg.max_len}")
    if cfg.dataset == "listops" and cfg.data_dir is None and cfg.max_len is not None:
        from primal_dual_attention.data.lra import check_generated_listops_length

        check_generated_listops_length(cfg.max_len)


@register_task("lra", reads=lambda cfg: ("dim", "depth", "heads", "mlp_dim", *LRA_DATASET_READS[cfg.dataset]),
               check=check_lra)
def build_lra_task(cfg: TrainConfig) -> Task:
    """Long Range Arena (``--dataset listops|text|image|pathfinder|retrieval``, or the task
    aliases ``lra-<name>``) with the standard LRA encoder. Generated tasks make only the samples
    a run can use: ``steps x budget x batch_size`` training samples (none is seen twice), at most
    ``max_train_samples`` of them (the step stream then repeats them in laps), and at most
    ``max_eval_samples`` validation and test samples."""
    from primal_dual_attention.data.lra import LOADERS
    from primal_dual_attention.models.lra import LRAClassifier

    name = cfg.dataset
    max_len = cfg.max_len or LRA_DEFAULT_LENGTHS[name]
    kwargs: dict = {}
    if name in LRA_GENERATED_SIZES:
        train, val, test = LRA_GENERATED_SIZES[name]
        if cfg.total_steps() is not None:
            train = min(train, cfg.total_steps() * cfg.batch_size)
        if cfg.max_train_samples is not None:
            train = min(train, cfg.max_train_samples)
        if cfg.max_eval_samples is not None:
            val, test = min(val, cfg.max_eval_samples), min(test, cfg.max_eval_samples)
        kwargs["sizes"] = (train, val, test)
    if name not in LRA_FIXED_LENGTH:
        kwargs["max_len"] = max_len
    data = LOADERS[name](cfg.data_dir, **kwargs)
    data.train = data.train.head(cfg.max_train_samples)  # LRA's files: their first ones
    warn_long_scales(cfg, data.max_len)
    model = LRAClassifier(data.vocab_size, data.num_classes, data.max_len, dim=cfg.dim, depth=cfg.depth,
                          num_heads=cfg.heads, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout,
                          attention=cfg.attention(), dual=name == "retrieval")
    val = data.val if cfg.protocol == "clean" else None
    return Task(model=model, train=data.train, test=data.test, val=val, description=data.description)


def imagenet_model_name(cfg: TrainConfig) -> str:
    """The timm model an ImageNet run builds: ``cfg.model``, default ``deit_tiny_patch16_224``
    (timm's own, softmax) or ``deit_tiny_patch16_224_<variant>``."""
    return cfg.model or ("deit_tiny_patch16_224" if cfg.variant == "softmax"
                         else f"deit_tiny_patch16_224_{cfg.variant}")


def check_imagenet_model(cfg: TrainConfig) -> None:
    """The model exists in timm and is built with ``cfg.variant`` (timm's own models: softmax);
    no mid-round checkpoints: the loader's augmentation draws from the global random state, so
    skipping a round's first batches on resume would not repeat them."""
    import timm

    check_no_length_buckets(cfg)
    if cfg.checkpoint_every:
        raise ValueError(f"checkpoint_every={cfg.checkpoint_every}: task 'imagenet' resumes at round "
                         "boundaries only (its loader's augmentation could not be replayed exactly)")

    from primal_dual_attention.timm import REGISTERED

    name = imagenet_model_name(cfg)
    if not timm.list_models(name):
        raise ValueError(f"model {name!r} is not a timm model (after importing primal_dual_attention.timm)")
    built_with = REGISTERED.get(name, "softmax")
    if built_with != cfg.variant:
        raise ValueError(f"model {name!r} is built with variant {built_with!r}, got variant={cfg.variant!r}; "
                         f"use a model built with it, e.g. deit_tiny_patch16_224_{cfg.variant} "
                         "(primal_dual_attention.timm.REGISTERED lists them)")


@register_task("imagenet", heads=lambda cfg: DEIT["tiny"]["num_heads"] if cfg.model is None else None,
               reads=("model", "img_size", "drop_path", "auto_augment", "random_erase", "mixup", "cutmix",
                      "repeated_aug", "num_workers"), check=check_imagenet_model)
def build_imagenet_task(cfg: TrainConfig) -> Task:
    """An ImageFolder tree (``--data-dir`` with ``train/`` and ``val/``) and a timm model
    (:func:`imagenet_model_name`). Each rank loads its own share of every batch; the
    ``val`` folder is the reported split (``paper`` protocol, as DeiT reports ImageNet)."""
    import os

    import timm

    from primal_dual_attention.data.imagefolder import imagefolder_splits
    from primal_dual_attention.timm import REGISTERED  # importing it registers the models

    name = imagenet_model_name(cfg)
    train, val = imagefolder_splits(
        cfg.data_dir, img_size=cfg.img_size, auto_augment=cfg.auto_augment,
        random_erase=cfg.random_erase, mixup=cfg.mixup, cutmix=cfg.cutmix,
        label_smoothing=cfg.label_smoothing, repeated_aug=cfg.repeated_aug, num_workers=cfg.num_workers,
        seed=cfg.seed, rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")))
    extra = {"attention": cfg.attention()} if name in REGISTERED else {}
    model = timm.create_model(name, num_classes=len(train.classes), img_size=cfg.img_size,
                              drop_path_rate=cfg.drop_path, drop_rate=cfg.dropout, **extra)
    selection = ("no validation split: the last epoch is kept" if cfg.protocol == "clean"
                 else "the epoch chosen on the val folder")
    return Task(model=model, train=train, test=val, val=None,
                description=f"ImageFolder {cfg.data_dir}: {len(train)} train / {len(val)} val images, "
                            f"{len(train.classes)} classes, {name}; {selection}")


LM_DEFAULT_LENGTH = 256


@register_task("lm", reads=("dim", "depth", "heads", "mlp_dim", "max_len", "data_file"))
def build_lm_task(cfg: TrainConfig) -> Task:
    """Byte-level language model (``--dataset imdb``: the IMDb review text; ``--data-file``: any
    UTF-8 file) with :class:`~primal_dual_attention.models.decoder.DecoderLM` over windows of
    ``max_len`` bytes (default 256). Validation loss picks the checkpoint; loss is nats per byte."""
    from primal_dual_attention.data.text import VOCAB_SIZE, load_imdb_text, load_text_file
    from primal_dual_attention.models.decoder import NextTokenLM

    length = cfg.max_len or LM_DEFAULT_LENGTH
    if cfg.data_file is not None:
        data = load_text_file(cfg.data_file, length)
    elif cfg.dataset.lower() == "imdb":
        data = load_imdb_text(cfg.data_dir, length)
    else:
        raise ValueError(f"task 'lm' reads dataset 'imdb' or a --data-file, got dataset {cfg.dataset!r}")
    model = NextTokenLM(VOCAB_SIZE, length, dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
                        mlp_dim=cfg.mlp_dim, dropout=cfg.dropout, attention=cfg.attention())
    val = data.val if cfg.protocol == "clean" else None
    return Task(model=model, train=data.train, test=data.test, val=val, description=data.description,
                select_by_loss=True)
