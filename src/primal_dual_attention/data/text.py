"""Byte-level language-model data: the IMDb review text, or any UTF-8 file (issue 14).

A split is a :class:`ByteWindows`: windows of ``length + 1`` bytes of one byte stream; the engine
gets the first ``length`` bytes as inputs and the next byte at every position as the targets
(flattened, so the engine's per-sample loss and accuracy are per byte: its loss in nats per byte
is the bits per byte times ln 2).

- IMDb: the reviews of the aclImdb zip in ``../shared/data/imdb`` (read in place, as
  :mod:`.lra` does), one review per line. ``train/{pos,neg}`` reviews train, except a fixed 2 %
  held out for validation (the same for every seed, so validation curves compare); the
  ``test/{pos,neg}`` reviews are the test text. The unlabelled ``train/unsup`` reviews are unused.
- A file: its bytes; the first 90 % train, the next 5 % validate, the last 5 % test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from primal_dual_attention.data.common import imdb_reviews, zip_file
from primal_dual_attention.data.lra import default_imdb_zip

VOCAB_SIZE = 256  # bytes
IMDB_VAL_FRACTION = 0.02
FILE_SPLITS = (0.9, 0.05, 0.05)


class ByteWindows:
    """Windows ``stream[s : s + length + 1]`` for the start offsets ``starts`` (default: every
    ``length`` bytes, non-overlapping). Batches are ``(inputs (B, length), None, targets (B * length,))``."""

    per_rank: ClassVar[bool] = False  # every rank slices the same global batches

    def __init__(self, stream: torch.Tensor, length: int, starts: torch.Tensor | None = None) -> None:
        if len(stream) < length + 1:
            raise ValueError(f"a stream of {len(stream)} bytes holds no window of {length} + 1 bytes")
        self.stream, self.length = stream, length
        self.starts = torch.arange(0, len(stream) - length, length) if starts is None else starts

    def __len__(self) -> int:
        return len(self.starts)

    def subset(self, index: torch.Tensor) -> ByteWindows:
        return ByteWindows(self.stream, self.length, self.starts[torch.as_tensor(index, dtype=torch.long)])

    def window(self, index: int) -> bytes:
        start = int(self.starts[index])
        return bytes(self.stream[start : start + self.length + 1].tolist())

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, None, torch.Tensor]]:
        order = (torch.randperm(len(self), generator=generator) if generator is not None
                 else torch.arange(len(self)))
        offsets = torch.arange(self.length + 1)
        for begin in range(0, len(self), batch_size):
            windows = self.stream[self.starts[order[begin : begin + batch_size]][:, None] + offsets].long()
            yield windows[:, :-1], None, windows[:, 1:].reshape(-1)


@dataclass
class TextData:
    train: ByteWindows
    val: ByteWindows
    test: ByteWindows
    description: str


def _stream(texts: list[bytes]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(b"\n".join(texts) + b"\n", dtype=np.uint8).copy())


def load_imdb_text(data_dir: str | Path | None, length: int) -> TextData:
    """IMDb reviews as byte streams (see the module docstring for the splits)."""
    path = zip_file(data_dir, default_imdb_zip(), "aclImdb zip", "PDA_IMDB_ZIP")
    train = [text for _, text in imdb_reviews(path, "train")]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    held = round(IMDB_VAL_FRACTION * len(train))
    test = [text for _, text in imdb_reviews(path, "test")]
    streams = (_stream([train[i] for i in sorted(order[held:])]),
               _stream([train[i] for i in sorted(order[:held])]), _stream(test))
    splits = [ByteWindows(s, length) for s in streams]
    sizes = "/".join(f"{len(s) / 1e6:.2f}" for s in streams)
    return TextData(*splits, f"IMDb review bytes ({path.name}): {sizes} MB train/val/test, "
                             f"windows of {length} bytes")


def load_text_file(data_file: str | Path, length: int) -> TextData:
    """A UTF-8 file's bytes: 90 % train, then 5 % validation, then the last 5 % test."""
    path = Path(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"data_file {str(data_file)!r} is not a file")
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"data_file {str(data_file)!r} is not UTF-8 text (byte {error.start}: "
                         f"{error.reason})") from None
    stream = _stream([raw])[:-1]
    cut1 = int(FILE_SPLITS[0] * len(stream))
    cut2 = cut1 + int(FILE_SPLITS[1] * len(stream))
    parts = {"train": stream[:cut1], "validation": stream[cut1:cut2], "test": stream[cut2:]}
    short = [f"{name} {len(part)}" for name, part in parts.items() if len(part) < length + 1]
    if short:
        raise ValueError(f"data_file {str(data_file)!r} ({len(stream)} bytes, split 90/5/5 %) is too short "
                         f"for windows of max_len={length} + 1 bytes: bytes per split {', '.join(short)}; "
                         f"use a longer file or a smaller max_len")
    splits = [ByteWindows(p, length) for p in parts.values()]
    return TextData(*splits, f"{Path(data_file).name}: {len(stream)} bytes, 90/5/5 % train/val/test, "
                             f"windows of {length} bytes")
