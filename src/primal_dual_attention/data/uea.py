"""UEA multivariate time-series classification data (``.ts`` files through aeon).

A dataset is read from a local folder (``<data_dir>/<Name>/<Name>_TRAIN.ts`` or
``<data_dir>/<Name>_TRAIN.ts``), else from the copies aeon ships (JapaneseVowels and a few
more), else, on a machine with internet, through aeon's download by name. Series are padded
to the longest *training* length with a padding mask (True = padding, SPEC.md §2); longer test
series are cut to that length and counted. Channels are standardised with statistics of the
valid training time points only; missing values (NaN / ``?``) become 0 after standardisation
(the training mean). The statistics are the whole training file's: the clean protocol's
validation part (held out later) takes part in them, without its labels; the test file never does.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from primal_dual_attention.data.common import shared_data


def default_data_dir() -> Path | None:
    """``$PDA_UEA_DIR``, else ``../shared/data/uea`` (see :func:`.common.shared_data`); None when
    there is none (aeon is used then)."""
    return shared_data("uea", "PDA_UEA_DIR", folder=True)


PAPER_DATASETS = (
    "EthanolConcentration", "FaceDetection", "Handwriting", "Heartbeat", "JapaneseVowels",
    "PEMS-SF", "SelfRegulationSCP1", "SelfRegulationSCP2", "SpokenArabicDigits",
    "UWaveGestureLibrary",
)


class TsFormatError(ValueError):
    """A malformed ``.ts`` file; the message names the file and the line."""


@dataclass
class SeriesSplit:
    """One split as tensors: ``x`` (n, T, C) float32, ``mask`` (n, T) bool, ``y`` (n,) int64."""

    x: torch.Tensor
    mask: torch.Tensor
    y: torch.Tensor
    per_rank: ClassVar[bool] = False  # every rank slices the same global batches

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """Batches of (x, mask, y), shuffled when a ``generator`` is given.

        Each batch is cut to its longest series (padding is trailing, so this is exact) and
        its mask is None when nothing in it is padded, which lets attention skip masking.
        """
        order = (torch.randperm(len(self), generator=generator) if generator is not None
                 else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            mask = self.mask[index]
            length = max(1, int((~mask).sum(1).max()))
            mask = mask[:, :length]
            yield self.x[index, :length], (mask if mask.any() else None), self.y[index]

    def subset(self, index: np.ndarray | torch.Tensor) -> SeriesSplit:
        index = torch.as_tensor(index, dtype=torch.long)
        return SeriesSplit(self.x[index], self.mask[index], self.y[index])


@dataclass
class UEADataset:
    name: str
    train: SeriesSplit
    test: SeriesSplit
    classes: list[str]
    source: str
    truncated_test: int = 0

    @property
    def num_channels(self) -> int:
        return self.train.x.shape[-1]

    @property
    def max_len(self) -> int:
        return self.train.x.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        lengths = (~self.train.mask).sum(1)
        return (f"{self.name}: {len(self.train)} train / {len(self.test)} test, "
                f"{self.num_channels} channels, length {int(lengths.min())}-{self.max_len}, "
                f"{self.num_classes} classes ({self.source}"
                + (f"; {self.truncated_test} test series cut to {self.max_len}" if self.truncated_test
                   else "") + ")")


def find_ts_files(name: str, data_dir: str | Path | None) -> tuple[Path, Path] | None:
    """Locate ``<name>_TRAIN.ts`` / ``_TEST.ts`` under ``data_dir`` (or its ``<name>/``)."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    for folder in (root / name, root):
        train, test = folder / f"{name}_TRAIN.ts", folder / f"{name}_TEST.ts"
        if train.is_file() and test.is_file():
            return train, test
    return None


def available_datasets(data_dir: str | Path | None = None) -> list[str]:
    """Names of the datasets with both splits present under ``data_dir`` (default: the
    :func:`default_data_dir`), sorted."""
    data_dir = data_dir or default_data_dir()
    if data_dir is None or not Path(data_dir).is_dir():
        return []
    names = {p.name[: -len("_TRAIN.ts")] for p in Path(data_dir).rglob("*_TRAIN.ts")}
    return sorted(n for n in names if find_ts_files(n, data_dir))


def _locate_ts_error(path: Path) -> tuple[int, str]:
    """Scan a ``.ts`` file for the first line that cannot be read; return (line, reason)."""
    class_values: list[str] | None = None
    channels: int | None = None
    in_data = False
    line_no = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                tokens = line.split()
                tag = tokens[0].lower()
                if tag == "@classlabel" and len(tokens) > 2 and tokens[1].lower() == "true":
                    class_values = tokens[2:]
                elif tag == "@dimensions" and len(tokens) == 2 and tokens[1].isdigit():
                    channels = int(tokens[1])
                elif tag == "@data":
                    in_data = True
                elif not tag.startswith("@"):
                    return line_no, "data before the @data tag"
                continue
            parts = line.split(":")
            labelled = class_values is not None
            if channels is None:
                channels = len(parts) - labelled
            if len(parts) != channels + labelled:
                return line_no, (f"{len(parts)} ':'-separated fields, expected {channels} channels"
                                 + (" and a label" if labelled else "") + " (truncated line?)")
            if labelled:
                label = parts.pop().strip()
                if label not in class_values:
                    return line_no, f"class label {label!r} is not among {class_values}"
            lengths = set()
            for part in parts:
                values = part.split(",")
                lengths.add(len(values))
                for value in values:
                    if value.strip() not in ("?", "NaN", "nan"):
                        try:
                            float(value)
                        except ValueError:
                            return line_no, f"cannot read {value.strip()!r} as a number"
            if len(lengths) > 1:
                return line_no, f"channels of one case have different lengths {sorted(lengths)}"
    if not in_data:
        return line_no, "no @data section"
    return line_no, "no cases after @data"


def read_ts(path: str | Path) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Read one ``.ts`` file with aeon: per-case ``(C, T_i)`` arrays, labels, class values.

    Raises :class:`TsFormatError` naming the file and the offending line.
    """
    from aeon.datasets import load_from_ts_file

    path = Path(path)
    try:
        data, labels, meta = load_from_ts_file(str(path), return_meta_data=True)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, IndexError) as error:
        line, reason = _locate_ts_error(path)
        raise TsFormatError(f"{path}:{line}: {reason} ({error})") from error
    class_values = [str(c) for c in meta.get("class_values") or []]
    if not len(data) or (class_values and not set(map(str, labels)) <= set(class_values)):
        line, reason = _locate_ts_error(path)  # aeon read it, but it is still inconsistent
        raise TsFormatError(f"{path}:{line}: {reason}")
    class_values = class_values or sorted(set(map(str, labels)))
    return [np.asarray(case, dtype=np.float64) for case in data], labels, class_values


def _aeon_names() -> set[str]:
    """The classification datasets aeon ships or can download by name."""
    import aeon.datasets
    from aeon.datasets.tsc_datasets import tsc_zenodo

    shipped = Path(aeon.datasets.__file__).parent / "data"
    return set(tsc_zenodo) | {p.name for p in shipped.iterdir() if p.is_dir()}


def _not_found(name: str, data_dir: str | Path | None, reason: str) -> FileNotFoundError:
    """Where a dataset was looked for, why aeon did not give it, and the closest names."""
    local = (f"{data_dir}/{name}/ and {data_dir}/" if data_dir is not None
             else "no local UEA folder ($PDA_UEA_DIR or ../shared/data/uea exists)")
    names = set(available_datasets(data_dir)) | _aeon_names()
    close = [] if name in names else difflib.get_close_matches(name, sorted(names), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return FileNotFoundError(
        f"UEA dataset {name!r} not found: looked in {local} for {name}_TRAIN.ts / {name}_TEST.ts, "
        f"then in aeon, which {reason}{hint} (--data-dir FOLDER reads FOLDER/{name}/)")


def _aeon_split(name: str, split: str,
                data_dir: str | Path | None) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """A split from aeon: its shipped copy, else its download (needs internet); a dataset it
    does not have is a :func:`_not_found` error."""
    from aeon.datasets import load_classification

    if name not in _aeon_names():
        raise _not_found(name, data_dir, "neither ships nor downloads a dataset of that name")
    try:
        data, labels, meta = load_classification(name, split=split, return_metadata=True,
                                                 load_equal_length=False)
    except (OSError, ValueError) as error:  # no internet, a failed download
        raise _not_found(name, data_dir, f"could not download it ({str(error).splitlines()[0]})") from None
    class_values = list(meta.get("class_values") or sorted(set(labels.tolist())))
    return [np.asarray(case, dtype=np.float64) for case in data], labels, class_values


def _to_tensors(cases: list[np.ndarray], labels: np.ndarray, classes: list[str], max_len: int,
                mean: np.ndarray, std: np.ndarray, where: str) -> tuple[SeriesSplit, int]:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(label) for label in labels} - set(index))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} are not among the training classes {classes}")
    n, channels = len(cases), cases[0].shape[0]
    x = np.zeros((n, max_len, channels), dtype=np.float32)
    mask = np.ones((n, max_len), dtype=bool)
    truncated = 0
    for i, case in enumerate(cases):
        length = min(case.shape[1], max_len)
        truncated += case.shape[1] > max_len
        values = (case[:, :length].T - mean) / std
        x[i, :length] = np.nan_to_num(values, nan=0.0)
        mask[i, :length] = False
    y = np.array([index[str(label)] for label in labels], dtype=np.int64)
    return SeriesSplit(torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(y)), truncated


def load_uea(name: str, data_dir: str | Path | None = None) -> UEADataset:
    """Load a UEA dataset as padded, standardised tensors (see the module docstring).

    ``data_dir`` None means :func:`default_data_dir`, falling back to aeon when the dataset
    is not there; an explicit ``data_dir`` must hold the files.
    """
    explicit = data_dir is not None
    data_dir = data_dir if explicit else default_data_dir()
    files = find_ts_files(name, data_dir)
    if files is not None:
        (train_cases, train_y, classes), (test_cases, test_y, _) = map(read_ts, files)
        source = str(files[0].parent)
    else:
        if explicit:
            raise FileNotFoundError(
                f"data_dir={str(data_dir)!r} holds no {name}_TRAIN.ts / {name}_TEST.ts "
                f"(looked in {data_dir}/{name}/ and {data_dir}/)")
        train_cases, train_y, classes = _aeon_split(name, "train", data_dir)
        test_cases, test_y, _ = _aeon_split(name, "test", data_dir)
        source = "aeon"
    if not train_cases:
        raise ValueError(f"{name}: the training split is empty")
    if not test_cases:
        raise ValueError(f"{name}: the test split is empty")
    classes = [str(c) for c in classes]
    if len(set(str(label) for label in train_y)) < 2:
        raise ValueError(f"{name}: the training split has a single class; nothing to classify")
    channels = train_cases[0].shape[0]
    for cases, split in ((train_cases, "train"), (test_cases, "test")):
        odd = next((i for i, case in enumerate(cases) if case.shape[0] != channels), None)
        if odd is not None:
            raise ValueError(f"{name} {split}: case {odd} has {cases[odd].shape[0]} channels, but the "
                             f"training split's first case has {channels} (source: {source})")
    max_len = max(case.shape[1] for case in train_cases)
    stacked = np.concatenate([case.T for case in train_cases])  # (sum T_i, C)
    mean = np.nanmean(stacked, axis=0)
    std = np.nanstd(stacked, axis=0)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    mean = np.nan_to_num(mean)
    train, _ = _to_tensors(train_cases, train_y, classes, max_len, mean, std, f"{name} train")
    test, truncated = _to_tensors(test_cases, test_y, classes, max_len, mean, std, f"{name} test")
    return UEADataset(name, train, test, classes, source, truncated)
