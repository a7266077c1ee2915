"""The training engine shared by every task: epochs, protocols, logs and exact resume.

Protocols (SPEC.md §4): ``paper`` evaluates the test split after every epoch and reports the
best test accuracy (what the published UEA tables do; optimistic). ``clean`` holds out a
stratified ``val_fraction`` of the training split, keeps the epoch with the best validation
accuracy (ties: lower validation loss; a language model: the lowest validation loss) in
``best.pt``, and reports that checkpoint's test accuracy; the test split is read once, at the
end, unless ``track_test`` logs its accuracy per epoch for learning curves (it never takes part
in the choice of the epoch).

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(weights_only=True)``; they are written to a temporary file and renamed, so a
crash never leaves a half-written ``last.pt``. Data order comes from a generator seeded by
``(seed, epoch)`` and the global RNG states are saved, so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from primal_dual_attention.training import distributed
from primal_dual_attention.training.compilation import check_compile, maybe_compile
from primal_dual_attention.training.config import TrainConfig
from primal_dual_attention.training.distributed import Context

SINGLE = Context()

Batch = tuple[Tensor, Tensor | None, Tensor]


@runtime_checkable
class Split(Protocol):
    """What the engine reads from a split: ``len`` samples (all ranks together), batches of
    (inputs, mask, labels), shuffled by a ``generator`` when given, ``subset`` by sample indices
    (``steps``, ``max_eval_samples``) and ``per_rank``: False when every rank walks the same
    global batches and keeps its slice, True when ``batches`` yields only this rank's share."""

    per_rank: bool

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]: ...

    def subset(self, index: Tensor) -> Split: ...


@dataclass
class Task:
    """What a task hands the engine: a model and its splits (``val`` None under ``paper``)."""

    model: nn.Module
    train: Split
    test: Split
    val: Split | None
    description: str
    select_by_loss: bool = False  # keep the round with the lowest monitored loss (language models)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float


@dataclass
class RunResult:
    """What a finished run reports (also written to ``summary.json``)."""

    test_accuracy: float
    best_epoch: int
    epochs: int
    params: int
    epoch_seconds: float
    train_samples_per_second: float
    wall_seconds: float
    protocol: str
    run_dir: str  # the run's own folder (``claim_run_dir``)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepSplit:
    """One round of a step-budgeted run: ``samples`` samples from position ``start`` of an endless
    stream of seeded permutations of ``split`` (so a run that stops early has seen no sample
    twice, and the stream depends only on the seed and the position, which keeps resume exact)."""

    split: Split
    start: int
    samples: int
    seed: int

    @property
    def per_rank(self) -> bool:
        return self.split.per_rank

    def __len__(self) -> int:
        return self.samples

    def _indices(self) -> Tensor:
        """This round's samples: indices into ``split``."""
        size = len(self.split)
        start, stop = self.start, self.start + self.samples
        parts = []
        for lap in range(start // size, (stop - 1) // size + 1):
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed * 7919 + lap))
            parts.append(order[max(start - lap * size, 0) : min(stop - lap * size, size)])
        return torch.cat(parts)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        return self.split.subset(self._indices()).batches(batch_size, generator)

    def subset(self, index: Tensor) -> Split:
        return self.split.subset(self._indices()[torch.as_tensor(index, dtype=torch.long)])


def bucket_width(width: int, per_octave: int, cap: int) -> int:
    """``width`` rounded up to one of ``per_octave`` (a power of two) evenly spaced lengths of its
    octave [2^e, 2^(e+1)), at most ``cap`` (at most 1/per_octave of padding); a width above
    ``cap`` stays as it is."""
    if per_octave < 1 or width <= per_octave:
        return width
    step = max(1, (1 << (width.bit_length() - 1)) // per_octave)
    return max(width, min(cap, -(-width // step) * step))


@dataclass
class BucketedSplit:
    """``split`` whose sequence batches — inputs ``(B, T)`` or ``(B, T, C)`` with one label per
    sample and a bool padding mask or none — are padded further to :func:`bucket_width` (zeros,
    masked as padding: SPEC §2, padding never reaches valid outputs). Per-token targets (language
    models) and batches wider than ``cap`` (pairs of sequences) pass unchanged.

    Why: trimming each batch to its longest sequence gives nearly every step a new shape, and on
    a GPU an attention call of a new shape pays a one-off set-up (ListOps on an H200: 0.14-1.9 s
    per softmax step against 10 ms at a fixed shape, ``results/lra_gpu/NOTES.md``)."""

    split: Split
    per_octave: int
    cap: int

    @property
    def per_rank(self) -> bool:
        return self.split.per_rank

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        for inputs, mask, labels in self.split.batches(batch_size, generator):
            per_sample = inputs.dim() in (2, 3) and labels.shape == inputs.shape[:1]
            width = inputs.shape[1] if per_sample else 0
            target = bucket_width(width, self.per_octave, self.cap)
            if target == width:
                yield inputs, mask, labels
                continue
            if mask is None:
                mask = torch.zeros(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
            elif mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be bool (True = padding), got {mask.dtype}")
            extra = target - width
            inputs = F.pad(inputs, (0, 0, 0, extra) if inputs.dim() == 3 else (0, extra))
            yield inputs, F.pad(mask, (0, extra), value=True), labels

    def subset(self, index: Tensor) -> Split:
        return BucketedSplit(self.split.subset(index), self.per_octave, self.cap)


def length_buckets(cfg: TrainConfig, model: nn.Module, device: torch.device) -> int:
    """Buckets per octave for ``model``'s batches: ``cfg.length_buckets``, or 8 on CUDA and 0
    elsewhere; 0 for models without a ``max_len`` (images: no sequence dimension to pad)."""
    if getattr(model, "max_len", None) is None:
        return 0
    if cfg.length_buckets is not None:
        return cfg.length_buckets
    return 8 if device.type == "cuda" else 0


def limit(split: Split | None, count: int | None) -> Split | None:
    """``count`` samples of ``split`` drawn by a fixed seed (all when None): ``max_eval_samples``.
    Random, not the first ones: files are often sorted by class."""
    if count is None or split is None or len(split) <= count:
        return split
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:count]
    return split.subset(chosen.sort().values)


def run_splits(cfg: TrainConfig, task: Task, model: nn.Module, device: torch.device,
               ) -> tuple[int, Split, Split | None, Split | None]:
    """The splits as a run of ``cfg`` sees them: validation and test limited to
    ``max_eval_samples`` (the same draw), every split in length buckets where the run uses them;
    returns ``(buckets per octave, train, val, test)``. ``pda eval`` takes the same, so that it
    reproduces the run's numbers."""
    splits = task.train, limit(task.val, cfg.max_eval_samples), limit(task.test, cfg.max_eval_samples)
    per_octave = length_buckets(cfg, model, device)
    if per_octave:
        splits = tuple(None if s is None else BucketedSplit(s, per_octave, model.max_len) for s in splits)
    return (per_octave, *splits)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a torchrun rank's own random stream (dropout, augmentation); far apart, so
    that no rank of one seed draws another seed's stream."""
    return seed + 1_000_003 * rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states (the CUDA one of ``device`` too): dropout and sampling
    continue after a resume as if the run had not stopped."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None], what: str) -> None:
    """``write`` into a temporary file in the same folder, then rename it over ``path``.

    On any failure (disk full, read-only folder) the previous file is left intact and the
    error names the path.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"could not write {what} {path}: {error.strerror}") from error
        raise


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` that leaves either the old file or the whole new one (:func:`_atomic_write`)."""
    _atomic_write(path, lambda stream: torch.save(obj, stream), "checkpoint")


def atomic_write_text(path: Path, text: str) -> None:
    """A text file written whole or not at all (a crash leaves no half ``config.yaml``)."""
    _atomic_write(path, lambda stream: stream.write(text.encode()), "file")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a clear error if it is not ours."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.pt"))
        raise ValueError(f"checkpoint {str(path)!r} is a folder; name a checkpoint file in it "
                         f"({', '.join(found) if found else 'it holds no .pt file'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle with arbitrary objects, ...
        raise ValueError(f"{path} is not a readable primal-dual-attention checkpoint: "
                         f"{_unreadable(error)}") from None
    if not isinstance(state, dict) or not {"model", "config", "epoch"} <= set(state):
        raise ValueError(f"{path} is not a primal-dual-attention checkpoint "
                         "(expected keys 'model', 'config', 'epoch')")
    return state


def _unreadable(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line and without torch's advice to
    retry with ``weights_only=False`` (which would run whatever code the file holds)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if found:
        return f"it holds a Python object ({found.group(1)}), which is never unpickled here"
    if "zip archive" in str(error) or "central directory" in str(error):
        return "a truncated or damaged file (its zip archive cannot be read)"
    return "its bytes are not a file that torch.save wrote"


def load_weights(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """``model.load_state_dict(state["model"])``; a checkpoint of another shape (a model built
    for other data) is a one-line error naming the first parameter that differs."""
    own = model.state_dict()
    for name, tensor in state["model"].items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(
                f"{path} does not fit this data: {name} has shape {tuple(tensor.shape)} in the "
                f"checkpoint but {tuple(own[name].shape)} for the data now loaded (another dataset "
                "or data folder than the one it was trained on?)")
    missing, unexpected = own.keys() - state["model"].keys(), state["model"].keys() - own.keys()
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(state["model"])


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.effective_lr())
    return torch.optim.RAdam(groups, lr=cfg.effective_lr(), decoupled_weight_decay=True)


def round_steps(total: int, rounds: int, index: int) -> tuple[int, int]:
    """(first step, steps) of round ``index`` when ``total`` optimizer steps are spread over
    ``rounds`` evaluation rounds: exactly ``total`` in all, the first ``total % rounds`` rounds
    one step longer."""
    base, extra = divmod(total, rounds)
    return index * base + min(index, extra), base + (index < extra)


def round_of_step(total: int, rounds: int, step: int) -> int:
    """The round that optimizer ``step`` falls in (the inverse of :func:`round_steps`)."""
    base, extra = divmod(total, rounds)
    longer = extra * (base + 1)  # the steps of the first ``extra`` rounds, one step longer
    return step // (base + 1) if step < longer else extra + (step - longer) // base


def _lr_lambda(cfg: TrainConfig, total: int):
    """The schedule's factor per optimizer step over the run's ``total`` steps in ``cfg.epochs``
    rounds: warm-up epochs end and step decays start where a round starts (:func:`round_steps`)."""
    if cfg.steps is not None and cfg.warmup_steps is not None:
        warmup = round(cfg.warmup_steps * cfg.budget)
    else:
        warmup = round_steps(total, cfg.epochs, cfg.warmup_epochs)[0]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return 1.0 - progress
        if cfg.schedule == "step":
            return cfg.gamma ** (round_of_step(total, cfg.epochs, step) // cfg.step_size)
        return 1.0

    return factor


def _check_finite(tensor: Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"non-finite values (NaN/inf) in {what}; check the input data or lower the learning rate")


def autocast(device: torch.device, precision: str):
    """Autocast to bf16/fp16 (fp32: no-op). Attention-BN statistics and the explicit softmax
    stay in fp32 inside the attention functions."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def evaluate(model: nn.Module, split: Split, batch_size: int, ctx: Context = SINGLE,
             precision: str = "fp32") -> EpochStats:
    """Mean cross-entropy and accuracy over a split, in inference mode (summed over ranks)."""
    model.eval()
    start = time.perf_counter()
    total_loss, correct, count = 0.0, 0.0, 0.0
    with torch.inference_mode():
        for batch in split.batches(batch_size):
            x, mask, y = _place(split, ctx, batch)
            with autocast(ctx.device, precision):
                logits = model(x, mask)
            total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            count += len(y)
    total_loss, correct, count = ctx.sum(total_loss, correct, count)
    if count == 0:
        raise ValueError("cannot evaluate on an empty split")
    return EpochStats(total_loss / count, correct / count, int(count), time.perf_counter() - start)


@dataclass
class RoundProgress:
    """How far a round got: its optimizer steps and its running training sums (every rank's
    together, so a resume on any number of ranks ends with the same totals)."""

    epoch: int
    step: int = 0
    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0


def _train_epoch(model, split: Split, cfg: TrainConfig, optimizer, scheduler, scaler, epoch: int,
                 ctx: Context, progress: RoundProgress | None = None,
                 checkpoint: Callable[[RoundProgress], None] | None = None) -> EpochStats:
    """One epoch. Every rank walks the same global batches (same seeded order) and trains on its
    slice; the loss is scaled so that DDP's gradient average equals the global batch mean.
    ``progress``: where a mid-round checkpoint stopped (its batches are skipped, its sums kept);
    ``checkpoint`` is called every ``cfg.checkpoint_every`` steps on every rank."""
    model.train()
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    progress = progress or RoundProgress(epoch)
    carried = (progress.loss, progress.correct, progress.count)  # every rank's sums: rank 0 carries them
    total_loss, correct, count = carried if ctx.rank == 0 else (0.0, 0.0, 0.0)
    start = time.perf_counter() - progress.seconds
    bar = tqdm(split.batches(cfg.batch_size, generator), total=math.ceil(len(split) / cfg.batch_size),
               desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not ctx.is_main or cfg.progress is False or (
                   cfg.progress is None and not sys.stderr.isatty()))
    for step, batch in enumerate(bar):
        if step < progress.step:  # trained before the checkpoint: the same seeded batch order
            continue
        _check_finite(batch[0], f"the inputs of epoch {epoch + 1}, batch {step}")
        x, mask, y = _place(split, ctx, batch)
        global_count = len(y) * ctx.world_size if split.per_rank else len(batch[2])
        with autocast(ctx.device, cfg.precision):
            logits = model(x, mask)
        # soft targets (mixup) already hold their label smoothing
        smoothing = 0.0 if y.is_floating_point() else cfg.label_smoothing
        loss_sum = F.cross_entropy(logits.float(), y, label_smoothing=smoothing, reduction="sum")
        if y.is_floating_point():
            y = y.argmax(-1)  # accuracy against the dominant class of the mixed target
        _check_finite(loss_sum, f"the loss of epoch {epoch + 1}, batch {step}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss_sum * (ctx.world_size / global_count)).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += loss_sum.item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += len(y)
        bar.set_postfix(loss=f"{total_loss / max(count, 1):.3f}", acc=f"{correct / max(count, 1):.3f}")
        if checkpoint is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            checkpoint(RoundProgress(epoch, step + 1, *ctx.sum(total_loss, correct, count),
                                     time.perf_counter() - start))
    total_loss, correct, count = ctx.sum(total_loss, correct, count)
    return EpochStats(total_loss / max(count, 1), correct / max(count, 1), int(count),
                      time.perf_counter() - start)


RUNNING_OPTIONS = {"resume", "overwrite", "run_name", "progress", "out_dir", "threads", "device", "data_dir",
                   "num_workers", "compile", "compile_backend", "length_buckets", "checkpoint_every"}
#: what a run writes in its folder (``--overwrite`` removes these and nothing else)
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "log.csv", "summary.json")


def changed_options(saved: dict[str, Any], cfg: TrainConfig) -> str:
    """The options that change the result and differ from a saved run's, as ``name: old -> new``
    ('' for the same run: only running options such as threads may differ)."""
    # tuples as lists on both sides: config.yaml gives lists back, last.pt's config keeps tuples
    current, saved = _plain(cfg.to_dict()), _plain(saved)
    changed = sorted(k for k in current if k not in RUNNING_OPTIONS and k in saved and saved[k] != current[k])
    return ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (YAML gives lists back: ``head_scales=(1, 2)`` is ``[1, 2]``)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _saved_run(folder: Path) -> dict[str, Any] | None:
    """The config of the run in ``folder`` (``config.yaml``, else ``last.pt``); None when free."""
    if (folder / "config.yaml").is_file():
        return yaml.safe_load((folder / "config.yaml").read_text()) or {}
    if (folder / "last.pt").is_file():
        return load_checkpoint(folder / "last.pt")["config"]
    return None


def _run_state(folder: Path, saved: dict[str, Any]) -> str:
    if (folder / "summary.json").is_file():
        return f"finished, {saved['epochs']}/{saved['epochs']} epochs"
    if (folder / "last.pt").is_file():
        state = load_checkpoint(folder / "last.pt")
        round_ = state.get("round")
        inside = f", at step {round_['step']} of epoch {state['epoch'] + 2}" if round_ else ""
        return f"stopped after epoch {state['epoch'] + 1}/{saved['epochs']}{inside}"
    return "started, no epoch finished"


def claim_run_dir(cfg: TrainConfig, say=print) -> tuple[TrainConfig, bool]:
    """The run's folder, never another run's (issue 15): ``cfg`` with ``run_name`` set, and
    whether to clear the folder first (``overwrite``). Reads only; ``say`` gets the notices.

    The folder holding a run with the same options is this run's: ``resume`` continues it,
    ``overwrite`` starts it again, else it is an error saying so. Otherwise the run goes to the
    first free folder of ``seed<k>``, ``seed<k>-2``, ...; with ``overwrite`` it replaces the
    run in the first of them. An explicit ``run_name`` is the only candidate.
    """
    names = [cfg.run_name] if cfg.run_name else [f"seed{cfg.seed}"] + [
        f"seed{cfg.seed}-{i}" for i in range(2, 1000)]
    folders = [cfg.run_dir().parent / name for name in names]
    others, free = [], None  # (folder, changed options) of the other runs; the first free folder
    for folder in folders:
        saved = _saved_run(folder)
        if saved is None:
            free = free or folder
            continue
        changes = changed_options(saved, cfg)
        if changes:
            others.append((folder, changes))
            continue
        if cfg.overwrite:
            say(f"overwriting {folder} (the same run, {_run_state(folder, saved)})")
        elif not cfg.resume:
            raise ValueError(f"{folder} already holds this run ({_run_state(folder, saved)}); pass "
                             "--resume to continue it or --overwrite to start it again")
        return replace(cfg, run_name=folder.name), cfg.overwrite
    if not others:
        return replace(cfg, run_name=folders[0].name), False
    first, changes = others[0]
    if cfg.overwrite:
        say(f"overwriting {first} (a run with other options: {changes})")
        return replace(cfg, run_name=first.name), True
    if free is None:
        raise ValueError(f"{first} holds a run with other options ({changes}); pass --overwrite to "
                         "replace it or another --run-name")
    say(f"{first} holds a run with other options ({changes}); this run goes to {free}")
    return replace(cfg, run_name=free.name), False


def _place(split: Split, ctx: Context, batch: Batch) -> tuple[Tensor, Tensor | None, Tensor]:
    """This rank's part of a batch on its device: a slice of a global batch, or the whole batch
    of a ``per_rank`` split (each rank loaded its own share)."""
    if split.per_rank:
        return tuple(None if t is None else t.to(ctx.device, non_blocking=True) for t in batch)
    inputs, mask, labels = batch
    rows = inputs.shape[0]
    if ctx.distributed and labels.shape[0] != rows:  # per-token targets (B*T,): shard them by row
        inputs, mask, labels = ctx.shard(inputs, mask, labels.view(rows, -1))
        return inputs, mask, labels.reshape(-1)
    return ctx.shard(inputs, mask, labels)


def _is_better(candidate: tuple[float, float], best: tuple[float, float] | None) -> bool:
    """Higher accuracy wins; on a tie, lower loss."""
    return best is None or candidate[0] > best[0] or (candidate[0] == best[0] and candidate[1] < best[1])


@dataclass
class _Run:
    """A run's moving parts: built by :func:`_prepare`, advanced one epoch at a time by :func:`fit`."""

    cfg: TrainConfig
    ctx: Context
    model: nn.Module  # evaluated and checkpointed
    train_model: nn.Module  # trained: ``model``, wrapped in DDP and compiled when asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train: Split
    val: Split | None
    test: Split
    select_by_loss: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    best: tuple[float, float] | None = None
    start_epoch: int = 0
    progress: RoundProgress | None = None  # a round a mid-round checkpoint stopped in
    wall_before: float = 0.0  # seconds spent before a resume
    wall_start: float = 0.0
    writer: Any = None  # a TensorBoard writer on the main rank, when TensorBoard is installed

    @property
    def last_path(self) -> Path:
        return self.cfg.run_dir() / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.cfg.run_dir() / "best.pt"

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall_start


def fit(cfg: TrainConfig, task: Task) -> RunResult:
    """Train ``task.model`` under ``cfg`` in ``cfg.run_dir()``; resume from ``last.pt`` if asked.
    Under ``torchrun`` it joins the process group for the run and leaves it at the end
    (:func:`distributed.session`)."""
    with distributed.session(cfg.device) as ctx:
        return _fit(cfg, task, ctx)


def _fit(cfg: TrainConfig, task: Task, ctx: Context) -> RunResult:
    run = _prepare(cfg, task, ctx)
    cfg = run.cfg  # with the run's own folder
    if cfg.resume and run.last_path.is_file():
        _resume(run)
    elif ctx.distributed:  # each rank its own dropout and augmentation (the data order has its own seed)
        seed_everything(rank_seed(cfg.seed, ctx.rank))
    # a finished run is only reported; one that stopped after its last epoch (before its summary)
    # is finished now
    unfinished = run.start_epoch < cfg.epochs or not (cfg.run_dir() / "summary.json").is_file()
    writes = run.ctx.is_main and unfinished
    if writes:
        atomic_write_text(cfg.run_dir() / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run.wall_start = time.perf_counter()
    run.writer = _tensorboard(cfg.run_dir()) if writes else None
    for epoch in range(run.start_epoch, cfg.epochs):
        row, score = _train_and_evaluate(run, run.train, epoch)
        improved = _is_better(score, run.best)
        if improved:
            run.best = score
            row["best"] = True
        run.history.append(row)
        _save_epoch(run, epoch, row, improved)
    return _finish(run, writes)


def _prepare(cfg: TrainConfig, task: Task, ctx: Context) -> _Run:
    """Threads, run folder, the model on its device, optimizer, schedule, scaler
    and the evaluation splits (``max_eval_samples``)."""
    if len(task.train) == 0:
        raise ValueError("the training split is empty")
    cfg.check_step_budget()  # also for a config handed to fit() without validate()
    check_compile(cfg.compile, cfg.compile_backend, ctx.device)  # before the run folder is made
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, clear = claim_run_dir(cfg, print if ctx.is_main else lambda _: None)
    ctx.barrier()  # every rank has read the folders before the main rank writes
    if ctx.is_main:
        cfg.run_dir().mkdir(parents=True, exist_ok=True)
        if clear:  # the old run's files, its TensorBoard events too (they would mix with the new run's)
            for name in RUN_FILES:
                (cfg.run_dir() / name).unlink(missing_ok=True)
            shutil.rmtree(cfg.run_dir() / "tensorboard", ignore_errors=True)
    model = task.model.to(ctx.device)
    train_model: nn.Module = model
    if ctx.distributed:
        train_model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                              else None)
    train_model = maybe_compile(train_model, cfg.compile, ctx.device, cfg.compile_backend)
    optimizer = _optimizer(cfg, model)
    total_steps = cfg.total_steps()
    if total_steps is None:
        # per-rank loaders drop a last partial batch and count their own (repeated augmentation)
        counted = getattr(task.train, "batches_per_epoch", None)
        total_steps = cfg.epochs * (counted(cfg.batch_size) if counted
                                    else math.ceil(len(task.train) / cfg.batch_size))
    per_octave, train, val, test = run_splits(cfg, task, model, ctx.device)
    cfg = replace(cfg, length_buckets=per_octave)  # config.yaml records what the run used
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")
    return _Run(cfg, ctx, model, train_model, optimizer, scheduler, scaler, train, val, test,
                task.select_by_loss)


def _resume(run: _Run) -> None:
    """Continue from ``last.pt``: weights, optimizer, schedule, scaler, RNG states and history."""
    state = load_checkpoint(run.last_path)  # of this run: claim_run_dir compared the options
    load_weights(run.model, state, run.last_path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # absent in checkpoints written before mixed precision
        run.scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks")  # each rank draws its own dropout: its own state, when as many ranks
    if ranks is not None and len(ranks) == run.ctx.world_size:
        _set_rng_state(ranks[run.ctx.rank], run.ctx.device)
    elif run.ctx.rank == 0:
        _set_rng_state(state["rng"], run.ctx.device)
    else:  # more ranks than saved: a stream of its own, not rank 0's again
        seed_everything(rank_seed(run.cfg.seed, run.ctx.rank) + state["epoch"] + 1)
    run.history, run.start_epoch = list(state["history"]), state["epoch"] + 1
    run.progress = RoundProgress(**state["round"]) if state.get("round") else None
    run.best = None if state["best"] is None else tuple(state["best"])
    run.wall_before = state["wall_seconds"]
    if run.ctx.is_main:
        where = (f"at epoch {run.start_epoch + 1}/{run.cfg.epochs}" if run.start_epoch < run.cfg.epochs
                 else f"with all {run.cfg.epochs} epochs done (nothing to train)")
        inside = f", step {run.progress.step} of epoch {run.start_epoch + 1}" if run.progress else ""
        print(f"resuming {run.cfg.run_dir()} {where} (last.pt holds epoch {run.start_epoch}{inside})")


def _train_and_evaluate(run: _Run, train: Split, epoch: int) -> tuple[dict[str, Any], tuple[float, float]]:
    """One epoch's training and evaluation: its log row and the score that selects the epoch
    (validation under ``clean``, test under ``paper``)."""
    cfg = run.cfg
    if cfg.total_steps() is not None:
        first, steps = round_steps(cfg.total_steps(), cfg.epochs, epoch)
        train = StepSplit(train, first * cfg.batch_size, steps * cfg.batch_size, cfg.seed)
    progress, run.progress = run.progress, None  # only the first round after a resume
    train_stats = _train_epoch(run.train_model, train, cfg, run.optimizer, run.scheduler, run.scaler,
                               epoch, run.ctx, progress, lambda done: _save_round(run, done))
    row: dict[str, Any] = {
        "epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": train_stats.loss, "train_acc": train_stats.accuracy,
        "epoch_seconds": train_stats.seconds,
        "train_samples_per_s": train_stats.samples / max(train_stats.seconds, 1e-9),
    }
    monitored = run.val if cfg.protocol == "clean" else run.test
    prefix = "val" if cfg.protocol == "clean" else "test"
    if monitored is not None and len(monitored):
        stats = evaluate(run.model, monitored, cfg.eval_batch_size, run.ctx, cfg.precision)
        if not math.isfinite(stats.loss):  # a diverged model must not become the selected one
            raise FloatingPointError(f"non-finite {prefix} loss ({stats.loss}) after epoch {epoch + 1} of "
                                     f"{cfg.run_dir()}: the model diverged; lower the learning rate")
        row[f"{prefix}_loss"], row[f"{prefix}_acc"] = stats.loss, stats.accuracy
        score = (-stats.loss, -stats.accuracy) if run.select_by_loss else (stats.accuracy, stats.loss)
    else:  # clean protocol without validation data: keep the last epoch
        score = (float(epoch), 0.0)
    if cfg.track_test and prefix == "val":  # for learning curves only, never for selection
        stats = evaluate(run.model, run.test, cfg.eval_batch_size, run.ctx, cfg.precision)
        row["test_loss"], row["test_acc"] = stats.loss, stats.accuracy
    return row, score


def _training_state(run: _Run, epoch: int) -> dict[str, Any]:
    """What ``last.pt`` holds after round ``epoch`` (every rank must call it: it gathers the
    random states)."""
    ranks = run.ctx.gather(_rng_state(run.ctx.device))  # every rank's, in rank order
    return {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
        "best": run.best,
        "history": run.history, "rng": ranks[0], "rng_ranks": ranks, "config": run.cfg.to_dict(),
        "wall_seconds": run.wall_seconds(),
    }


def _save_epoch(run: _Run, epoch: int, row: dict[str, Any], improved: bool) -> None:
    """TensorBoard scalars, ``last.pt`` (and ``best.pt`` when ``improved``), ``log.csv``; the
    main rank writes, every rank waits for it."""
    if run.writer is not None:
        for key, value in row.items():
            if isinstance(value, float):
                run.writer.add_scalar(key, value, epoch + 1)
    state = _training_state(run, epoch)
    if run.ctx.is_main:
        if improved:
            atomic_save(state, run.best_path)
        atomic_save(state, run.last_path)
        _write_csv(run.cfg.run_dir() / "log.csv", run.history)  # rewritten whole: always matches last.pt
    run.ctx.barrier()


def _save_round(run: _Run, progress: RoundProgress) -> None:
    """``last.pt`` inside a round (``checkpoint_every``): the rounds before it, and how far this
    one got (``round``); log and ``best.pt`` stay those of the last whole round."""
    state = _training_state(run, progress.epoch - 1) | {"round": dataclasses.asdict(progress)}
    if run.ctx.is_main:
        atomic_save(state, run.last_path)
    run.ctx.barrier()


def _finish(run: _Run, write_summary: bool) -> RunResult:
    """The run's result: the selected epoch and its test accuracy by the protocol (``best.pt``
    under ``clean``), medians of the epoch timings; ``summary.json`` when ``write_summary``."""
    cfg, history = run.cfg, run.history
    best_epoch = max(r["epoch"] for r in history if r.get("best"))
    if cfg.protocol == "paper":  # the selected epoch's (highest accuracy, or lowest loss for LMs)
        test_accuracy = next(r["test_acc"] for r in history if r["epoch"] == best_epoch)
    else:
        run.model.load_state_dict(load_checkpoint(run.best_path)["model"])
        test_accuracy = evaluate(run.model, run.test, cfg.eval_batch_size, run.ctx, cfg.precision).accuracy
    result = RunResult(
        test_accuracy=test_accuracy, best_epoch=best_epoch, epochs=len(history),
        params=sum(p.numel() for p in run.model.parameters()),
        epoch_seconds=float(np.median([r["epoch_seconds"] for r in history])),
        train_samples_per_second=float(np.median([r["train_samples_per_s"] for r in history])),
        wall_seconds=run.wall_seconds(), protocol=cfg.protocol, run_dir=str(cfg.run_dir()), history=history,
    )
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    if write_summary:
        _write_csv(cfg.run_dir() / "log.csv", history)
        record = summary | {"config": cfg.to_dict()}
        atomic_write_text(cfg.run_dir() / "summary.json", json.dumps(record, indent=2))
    if run.writer is not None:
        run.writer.close()
    return result


def _write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    columns = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
               "test_acc", "epoch_seconds", "train_samples_per_s", "best"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in columns} for row in history)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
