"""``--compile``: which runs go through ``torch.compile``, and how.

``auto`` (the default) compiles on CUDA, where a small model is bound by kernel launches and
Python dispatch and compiling removes both; on the CPU it stays eager, where compiling measured
no faster for this project's models once its compile time is counted (``results/speed``).
``on`` compiles anywhere, ``cudagraphs`` compiles with CUDA graphs (``mode="reduce-overhead"``:
one replay per step, for small models on a GPU), ``off`` never compiles. Shapes are dynamic
after the first change (PyTorch's automatic dynamic shapes), so the per-batch trimmed sequence
lengths of a padded dataset cost a bounded number of recompilations, not one per length.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

COMPILE_CHOICES = ("auto", "on", "off", "cudagraphs")


def compile_mode(choice: str, device: torch.device) -> str | None:
    """The ``torch.compile`` mode for ``choice`` on ``device``, or None to stay eager."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {list(COMPILE_CHOICES)}, got {choice!r}")
    if choice == "cudagraphs":
        if device.type != "cuda":
            raise ValueError(f"compile='cudagraphs' needs a CUDA device, got device {device}")
        return "reduce-overhead"
    if choice == "on" or (choice == "auto" and device.type == "cuda"):
        return "default"
    return None


def check_compile(choice: str, backend: str, device: torch.device) -> str | None:
    """:func:`compile_mode`, with ``backend`` checked against the backends torch knows when it
    compiles, and a warning when a backend is named but the run stays eager (it would be
    silently unused)."""
    mode = compile_mode(choice, device)
    if mode is None:
        if backend != "inductor":
            # stacklevel 1: one location, so the checks before data loads and at the run's start
            # print it once
            warnings.warn(f"compile_backend={backend!r} is unused: compile={choice!r} runs eagerly on "
                          f"{device.type} (compile 'on' compiles here)", stacklevel=1)
        return None
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"compile_backend must be one of {known}, got {backend!r}")
    return mode


def maybe_compile(model: nn.Module, choice: str, device: torch.device,
                  backend: str = "inductor") -> nn.Module:
    """``model`` compiled as ``choice`` asks on ``device`` (the same module when eager). The
    compiled wrapper shares the parameters, so checkpoints keep the plain module's names.
    Dynamo's caches are reset first: the models of a task share one ``forward``, of which Dynamo
    keeps 8 versions, so a process's later runs (``pda demo``, a sweep worker) would otherwise
    train eagerly once earlier runs used them up. Other code compiled in the same process
    compiles again on its next call (its graphs are dropped too)."""
    mode = check_compile(choice, backend, device)
    if mode is None:
        return model
    if isinstance(model, DistributedDataParallel) and torch.__version__ < "2.6":
        # torch 2.5's DDP graph splitter refuses graphs with higher-order ops, which BN's and the
        # linear kernel's autograd Functions become (pytorch#138787 lifted it): one bucket instead
        torch._dynamo.config.optimize_ddp = False
    torch.compiler.reset()
    return torch.compile(model, mode=None if backend != "inductor" else mode, backend=backend)
