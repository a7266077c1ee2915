"""Small helpers every layer may use: the machine's description, the command line, device sync,
a lock between processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch


def machine_description() -> str:
    """CPU model, cores, torch version and threads, Python version and GPU, on one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}; {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads; Python {platform.python_version()}{gpu}")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The ``pda`` command as typed (``argv``, default this process's), shell-quoted (for reports
    to name it)."""
    return "pda " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so wall-clock timings are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def exclusive(lock_file: str | Path | None) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if missing) for the block, waiting for any
    other process that holds it; no lock at all when ``lock_file`` is None."""
    if lock_file is None:
        yield
        return
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
