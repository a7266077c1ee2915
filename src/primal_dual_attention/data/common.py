"""What every data source shares: the ``../shared/data`` finder and the stratified hold-out split."""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch


def shared_data(relative: str, variable: str, *, folder: bool = False) -> Path | None:
    """``$variable``, else ``../shared/data/<relative>`` from the working directory or from the
    repository root, whichever exists first (a folder when ``folder``, else a file); None when
    there is none."""
    candidates = [Path(p) for p in (os.environ.get(variable),) if p]
    candidates += [base / "shared" / "data" / relative
                   for base in (Path.cwd().parent, Path(__file__).resolve().parents[3].parent)]
    exists = Path.is_dir if folder else Path.is_file
    return next((c for c in candidates if exists(c)), None)


def zip_file(data_dir: str | Path | None, default: Path | None, what: str, variable: str) -> Path:
    """The zip a loader reads: ``data_dir`` when given, else ``default`` (:func:`shared_data`); an
    error that names the path and what was expected when it is not a file."""
    if data_dir is None:
        if default is None:
            raise FileNotFoundError(f"no {what} found: pass --data-dir or set {variable}")
        return default
    path = Path(data_dir)
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} {state}; expected the {what}")
    return path


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, holdout) with ``fraction`` of each class held out (at least one per class
    with two or more members), reproducible from ``seed`` (SPEC.md §4, clean protocol)."""
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    keep, hold = [], []
    for label in np.unique(labels_np):
        members = rng.permutation(np.flatnonzero(labels_np == label))
        count = 0 if len(members) < 2 else max(1, int(math.floor(fraction * len(members) + 0.5)))
        hold.extend(members[:count])
        keep.extend(members[count:])
    if not hold:
        warnings.warn("clean protocol: no class has two members, the validation split is empty",
                      stacklevel=2)
    return np.sort(np.array(keep, dtype=np.int64)), np.sort(np.array(hold, dtype=np.int64))


def imdb_reviews(path: str | Path, split: str) -> list[tuple[str, bytes]]:
    """``(name, text)`` of the ``<split>/{pos,neg}/*.txt`` reviews of the aclImdb zip, in name
    order (the label is the name's folder); read in place, never extracted."""
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist()
                       if n.endswith(".txt") and len(n.split("/")) >= 3
                       and n.split("/")[-3] == split and n.split("/")[-2] in ("pos", "neg"))
        if not names:
            raise ValueError(f"{path} holds no '{split}/pos|neg/*.txt' reviews")
        return [(name, archive.read(name)) for name in names]
