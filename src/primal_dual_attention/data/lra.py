"""Long Range Arena data without TensorFlow or downloads (issue 8).

Every task is a :class:`TokenSplit` — a ``torch.utils.data.Dataset`` of integer token sequences
with lengths and labels that also serves the engine's batches (trimmed to the longest sequence
of the batch, with a padding mask). Generated and decoded data is cached on disk as ``.npz``
(arrays ``tokens`` (N, L) padded with 0, ``lengths`` (N,), ``labels`` (N,)) under
``$PDA_CACHE_DIR`` or ``~/.cache/primal_dual_attention/lra``, named by the task, the split, the
seed and every generator parameter, so a second run reads it instead of generating again.

- ListOps (Nangia & Bowman 2018, as generated for LRA): random trees of ``[MIN``, ``[MAX``,
  ``[MED`` and ``[SM`` (sum modulo 10) over digits, 2-10 arguments, operator probability 0.25,
  depth <= 10, kept when 500 < length < 2000 tokens, deduplicated; 10 classes. Token ids:
  0 padding, 1-10 digits 0-9, 11-14 the operators, 15 the closing bracket ``]``. Also reads
  LRA's released ``basic_{train,val,test}.tsv`` (columns ``Source``, ``Target``).
- Text: byte-level IMDb sentiment from the ``aclImdb`` zip (25k/25k), ids = byte + 1, truncated
  to ``max_len`` (4096) bytes.
- Image: CIFAR-10 as 1024-pixel grayscale sequences (ITU-R 601 luma, as
  ``tf.image.rgb_to_grayscale``), ids = intensity 0-255 (no padding: every sequence is full).
- Pathfinder: 32x32 images of curved contours made of short segments, two circle markers on the
  ends of one contour (label 1) or of two different contours (label 0), distractor contours;
  the hard setting has contours of 14 segments (Linsley et al. 2018; LRA's Pathfinder-32).
- Retrieval (AAN): not obtainable here; :func:`read_aan_tsv` reads LRA's released
  ``new_aan_pairs.{train,eval,test}.tsv`` (``label``, ``id1``, ``id2``, ``text1``, ``text2``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from primal_dual_attention.data.common import imdb_reviews, shared_data, stratified_split, zip_file

# ----------------------------------------------------------------------------------- splits


class TokenSplit(Dataset):
    """Padded token sequences (``tokens[i, :lengths[i]]`` valid), labels; engine batches.

    ``pair`` holds a second sequence per sample (Retrieval); its batches then carry both,
    concatenated along the token axis, and the model splits them at ``max_len``.
    """

    per_rank = False  # every rank slices the same global batches

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> None:
        if not (len(tokens) == len(lengths) == len(labels)):
            raise ValueError(f"tokens, lengths and labels differ in length: {len(tokens)}, "
                             f"{len(lengths)}, {len(labels)}")
        self.tokens = torch.as_tensor(np.ascontiguousarray(tokens))
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    @classmethod
    def from_sequences(cls, sequences: list[np.ndarray], labels: list[int] | np.ndarray, width: int,
                       dtype: type[np.integer] = np.uint8) -> TokenSplit:
        """Variable-length token sequences (cut to ``width``) padded with 0, and their labels."""
        tokens, lengths = _pad(sequences, width, dtype)
        return cls(tokens, lengths, np.asarray(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.tokens[index, : self.lengths[index]].long(), int(self.labels[index])

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    def subset(self, index) -> TokenSplit:
        index = torch.as_tensor(index, dtype=torch.long)
        return TokenSplit(self.tokens[index].numpy(), self.lengths[index].numpy(),
                          self.labels[index].numpy())

    def head(self, count: int | None) -> TokenSplit:
        """The first ``count`` samples (all when None)."""
        return self if count is None or count >= len(self) else self.subset(torch.arange(count))

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """``(tokens (B, T) long, padding mask (B, T) or None, labels)``, T = longest in batch."""
        order = (torch.randperm(len(self), generator=generator) if generator is not None
                 else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            lengths = self.lengths[index]
            width = int(lengths.max())
            tokens = self.tokens[index, :width].long()
            mask = torch.arange(width) >= lengths[:, None]
            yield tokens, (mask if bool(mask.any()) else None), self.labels[index]


@dataclass
class LRAData:
    train: TokenSplit
    val: TokenSplit
    test: TokenSplit
    vocab_size: int
    num_classes: int
    max_len: int
    description: str


def cache_dir() -> Path:
    return Path(os.environ.get("PDA_CACHE_DIR", Path.home() / ".cache" / "primal_dual_attention")) / "lra"


def _cached(name: str, params: dict, build) -> TokenSplit:
    """Load ``name`` from the cache or ``build()`` it (tokens, lengths, labels) and store it."""
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return TokenSplit(data["tokens"], data["lengths"], data["labels"])
    tokens, lengths, labels = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(temporary, tokens=tokens, lengths=lengths, labels=labels)
    os.replace(temporary, path)
    return TokenSplit(tokens, lengths, labels)


def _pad(sequences: list[np.ndarray], width: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(sequences), width), dtype=dtype)
    lengths = np.zeros(len(sequences), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        sequence = sequence[:width]
        tokens[row, : len(sequence)] = sequence
        lengths[row] = len(sequence)
    return tokens, lengths


# ---------------------------------------------------------------------------------- ListOps

LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_VOCAB = {**{str(d): d + 1 for d in range(10)},
                 **{op: 11 + i for i, op in enumerate(LISTOPS_OPERATORS)}, "]": 15}
LISTOPS_VOCAB_SIZE = 16


def _apply(operator: int, values: list[int]) -> int:
    if operator == 0:
        return min(values)
    if operator == 1:
        return max(values)
    if operator == 2:
        return int(np.median(values))  # LRA's evaluator: int() of numpy's median
    return sum(values) % 10


def listops_tree(rng: random.Random, max_depth: int = 10, max_args: int = 10,
                 operator_p: float = 0.25, give_up_at: int | None = None) -> tuple[list[int], int] | None:
    """One random ListOps expression as token ids, and its value.

    Built iteratively (an explicit stack instead of recursion): a node at depth < ``max_depth``
    is an operator with probability ``operator_p`` and then has 2..``max_args`` children; other
    nodes are digits. The root is at depth 1, as in LRA's generator. Returns None as soon as the
    expression reaches ``give_up_at`` tokens (it would be rejected anyway).
    """
    tokens: list[int] = []
    # stack of [operator, remaining children, collected values, depth]
    stack: list[list] = []
    depth = 1
    while give_up_at is None or len(tokens) < give_up_at:
        if depth < max_depth and rng.random() < operator_p:
            operator = rng.randrange(4)
            tokens.append(11 + operator)
            stack.append([operator, rng.randint(2, max_args), [], depth])
            depth += 1
            continue
        value = rng.randrange(10)
        tokens.append(value + 1)
        while True:  # close every operator whose children are complete
            if not stack:
                return tokens, value
            frame = stack[-1]
            frame[2].append(value)
            frame[1] -= 1
            if frame[1] > 0:
                depth = frame[3] + 1
                break
            tokens.append(15)
            value = _apply(frame[0], frame[2])
            stack.pop()
    return None


LISTOPS_MIN_LEN, LISTOPS_MAX_LEN = 500, 2000  # LRA's expressions: 500 < length < 2000 tokens
#: the shortest max_len the generator takes: below it too few distinct expressions fit
LISTOPS_SHORTEST_MAX_LEN = 16


def check_generated_listops_length(max_len: int) -> None:
    """Generated expressions need room: ``max_len`` of at least :data:`LISTOPS_SHORTEST_MAX_LEN`."""
    if max_len < LISTOPS_SHORTEST_MAX_LEN:
        raise ValueError(f"max_len={max_len} is too short for generated ListOps expressions (the generator "
                         "would search forever for enough distinct ones); use at least "
                         f"{LISTOPS_SHORTEST_MAX_LEN}")


def generate_listops(count: int, seed: int, *, min_len: int = LISTOPS_MIN_LEN, max_len: int = LISTOPS_MAX_LEN,
                     bounded: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
    """``count`` distinct expressions with ``min_len < length < max_len`` tokens, and labels
    (splits are consecutive slices of one call, so they never share an expression). Python's
    ``random.Random`` draws the scalars: about 10x faster per draw than numpy's generators.

    ``bounded=False`` is the cache's version 1 (LRA's length, the data of every committed ListOps
    result): the generator gives up at ``max_len`` tokens but keeps an expression whose closing
    brackets reach or run past it (:func:`load_listops`)."""
    check_generated_listops_length(max_len)
    rng = random.Random(seed)
    seen: set[bytes] = set()
    sequences, labels = [], []
    while len(sequences) < count:
        tree = listops_tree(rng, give_up_at=max_len)
        if tree is None or len(tree[0]) <= min_len or (bounded and len(tree[0]) >= max_len):
            continue
        tokens, value = tree
        array = np.asarray(tokens, dtype=np.uint8)
        digest = hashlib.blake2b(array.tobytes(), digest_size=16).digest()
        if digest in seen:
            continue
        seen.add(digest)
        sequences.append(array)
        labels.append(value)
    return sequences, np.asarray(labels, dtype=np.int64)


def evaluate_listops(tokens: list[int] | np.ndarray) -> int:
    """Value of a ListOps token sequence, by a left-to-right stack machine (independent of the
    generator; the tests use it as the reference for the labels)."""
    stack: list[list[int]] = [[]]
    operators: list[int] = []
    for token in (int(t) for t in tokens):
        if 1 <= token <= 10:
            stack[-1].append(token - 1)
        elif 11 <= token <= 14:
            operators.append(token - 11)
            stack.append([])
        elif token == 15:
            values = stack.pop()
            stack[-1].append(_apply(operators.pop(), values))
        else:
            raise ValueError(f"not a ListOps token id: {token}")
    if operators or len(stack) != 1 or len(stack[0]) != 1:
        raise ValueError("unbalanced ListOps expression")
    return stack[0][0]


def tokenize_listops(source: str) -> np.ndarray:
    """LRA's ``Source`` text (parentheses are layout only and dropped) to token ids."""
    words = source.replace("(", " ").replace(")", " ").split()
    try:
        return np.asarray([LISTOPS_VOCAB[w] for w in words], dtype=np.uint8)
    except KeyError as error:
        raise ValueError(f"unknown ListOps token {error.args[0]!r} in {source[:60]!r}") from None


def read_listops_tsv(path: str | Path, max_len: int = 2000) -> TokenSplit:
    """One of LRA's released ``basic_*.tsv`` files (header ``Source<TAB>Target``)."""
    csv.field_size_limit(sys.maxsize)
    sequences, labels = [], []
    with open(path, newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["Source", "Target"]:
            raise ValueError(f"{path}: expected a 'Source<TAB>Target' header, got {header}")
        for line, row in enumerate(reader, start=2):
            if len(row) < 2:
                raise ValueError(f"{path}:{line}: expected 2 columns, got {len(row)}")
            sequences.append(tokenize_listops(row[0]))
            labels.append(_label(row[1], 10, f"{path}:{line}"))
    longer = sum(len(sequence) > max_len for sequence in sequences)
    if longer:  # a cut expression keeps the label of the whole one
        raise ValueError(f"{path}: {longer} expressions are longer than max_len={max_len}, and a ListOps "
                         "label needs the whole expression; raise max_len (LRA's is 2000)")
    return TokenSplit.from_sequences(sequences, labels, max_len, np.uint8)


def _label(text: str, classes: int, where: str) -> int:
    """A class label of an LRA TSV row, ``0 <= label < classes`` (LRA writes them as ``1`` or ``1.0``)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: label {text!r} is not a number") from None
    if not value.is_integer() or not 0 <= value < classes:
        raise ValueError(f"{where}: label {text!r} is not a class 0..{classes - 1}")
    return int(value)


def load_listops(data_dir: str | Path | None = None, *, seed: int = 0, sizes=(96_000, 2_000, 2_000),
                 max_len: int = 2000) -> LRAData:
    """LRA's TSV files from ``data_dir`` when given (``sizes`` applies to generated data only),
    else the generator (cached). Below LRA's ``max_len`` of 2000 the generator draws shorter
    expressions (more than ``max_len / 4`` tokens, fewer than ``max_len``), never cut, since a
    label needs the whole expression. At 2000 and up it keeps the cache's version 1, the data of
    every committed ListOps result: of its first 100,000 expressions at seed 0, 51 have 2000
    tokens or more, and 31 end 1-3 closing brackets past 2000, which ``max_len`` 2000 cuts (no
    value changes: the lost brackets close the outermost operators, after the last digit).
    Generated splits are consecutive slices of one stream (train, validation, test), so training
    sets of other sizes have other validation and test expressions (kept: the committed results
    were made so)."""
    if data_dir is not None:
        folder = Path(data_dir)
        splits = [read_listops_tsv(folder / f"basic_{s}.tsv", max_len) for s in ("train", "val", "test")]
        source = f"LRA TSV files in {folder}"
    else:
        check_generated_listops_length(max_len)  # before a cached set is read, too
        # version 2 drew shorter expressions below 2000 but could run past max_len; version 3 never does
        version = 1 if max_len >= LISTOPS_MAX_LEN else 3

        def build():
            shortest = min(LISTOPS_MIN_LEN, max_len // 4)
            sequences, labels = generate_listops(sum(sizes), seed, min_len=shortest,
                                                 max_len=min(max_len, LISTOPS_MAX_LEN), bounded=version != 1)
            return (*_pad(sequences, max_len, np.uint8), labels)

        params = {"sizes": list(sizes), "seed": seed, "max_len": max_len, "version": version}
        everything = _cached("listops", params, build)
        bounds = np.cumsum([0, *sizes])
        splits = [everything.subset(torch.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        source = f"generated (seed {seed})"
    train, val, test = splits
    return LRAData(train, val, test, LISTOPS_VOCAB_SIZE, 10, max_len,
                   f"ListOps ({source}): {len(train)}/{len(val)}/{len(test)}, length <= {max_len}")


# ------------------------------------------------------------------------------------- Text


def default_imdb_zip() -> Path | None:
    """``$PDA_IMDB_ZIP``, else the shared copy beside the working directory or the repository."""
    return shared_data("imdb/aclImdb/aclImdb.zip", "PDA_IMDB_ZIP")


def read_imdb_zip(path: str | Path, split: str, max_len: int = 4096) -> TokenSplit:
    """``<root>/<split>/{pos,neg}/*.txt`` of the aclImdb zip as byte ids (byte + 1), pos = 1."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    sequences, labels = [], []
    for name, text in imdb_reviews(path, split):
        sequences.append(np.frombuffer(text[:max_len], dtype=np.uint8).astype(np.int16) + 1)
        labels.append(1 if name.split("/")[-2] == "pos" else 0)
    return TokenSplit.from_sequences(sequences, labels, max_len, np.int16)


def load_text(data_dir: str | Path | None = None, *, seed: int = 0, val_fraction: float = 0.1,
              max_len: int = 4096) -> LRAData:
    path = zip_file(data_dir, default_imdb_zip(), "aclImdb zip", "PDA_IMDB_ZIP")
    stat = path.stat()
    params = {"path": str(path.resolve()), "size": stat.st_size, "max_len": max_len, "version": 1}
    full_train = _cached("text-train", params, lambda: _arrays(read_imdb_zip(path, "train", max_len)))
    test = _cached("text-test", params, lambda: _arrays(read_imdb_zip(path, "test", max_len)))
    keep, hold = stratified_split(full_train.labels, val_fraction, seed)
    train, val = full_train.subset(keep), full_train.subset(hold)
    return LRAData(train, val, test, 257, 2, max_len,
                   f"IMDb bytes ({path.name}): {len(train)}/{len(val)}/{len(test)}, length <= {max_len}")


def _arrays(split: TokenSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return split.tokens.numpy(), split.lengths.numpy(), split.labels.numpy()


# ------------------------------------------------------------------------------------ Image


def grayscale_tokens(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` uint8 -> ``(N, H*W)`` uint8 luma (0.2989 R + 0.5870 G + 0.1140 B)."""
    weights = torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
    luma = (images.float() * weights).sum(1).round().clamp(0, 255)
    return luma.flatten(1).to(torch.uint8).numpy()


def load_image(data_dir: str | Path | None = None, *, seed: int = 0, val_fraction: float = 0.1) -> LRAData:
    from primal_dual_attention.data.images import load_cifar10

    train_split, test_split, _ = load_cifar10(data_dir)
    splits = []
    for split in (train_split, test_split):
        tokens = grayscale_tokens(split.images).astype(np.int16) + 1  # 0 stays the padding id
        splits.append(TokenSplit(tokens, np.full(len(tokens), tokens.shape[1]), split.labels.numpy()))
    full_train, test = splits
    keep, hold = stratified_split(full_train.labels, val_fraction, seed)
    train, val = full_train.subset(keep), full_train.subset(hold)
    return LRAData(train, val, test, 257, 10, 1024,
                   f"CIFAR-10 grayscale pixels: {len(train)}/{len(val)}/{len(test)}, length 1024")


# ------------------------------------------------------------------------------- Pathfinder


@dataclass(frozen=True)
class PathfinderStyle:
    """Drawing parameters; ``contour_length`` 14 is LRA's hard Pathfinder-32 setting. Each
    segment is drawn over its first ``dash`` fraction, so contours are dashed as in Linsley et al."""

    size: int = 32
    contour_length: int = 14
    segment_length: float = 1.8
    dash: float = 0.7
    max_turn: float = math.pi / 5
    distractors: int = 2
    marker_radius: float = 1.6
    intensity: int = 255


def _snake(rng: np.random.Generator, style: PathfinderStyle, blocked: np.ndarray) -> np.ndarray | None:
    """Vertices of one smooth contour (a walk whose heading turns by a bounded random amount
    around a constant curvature) that stays inside the image and off ``blocked`` pixels; None
    if none of 64 candidates, drawn at once, fits."""
    count, margin, length = 64, 2.0, style.contour_length
    starts = rng.uniform(margin, style.size - 1 - margin, size=(count, 1, 2))
    curvature = rng.uniform(-style.max_turn, style.max_turn, size=(count, 1)) / 2
    turns = curvature + rng.uniform(-style.max_turn, style.max_turn, size=(count, length)) / 2
    headings = rng.uniform(0, 2 * math.pi, size=(count, 1)) + np.cumsum(turns, axis=1)
    steps = style.segment_length * np.stack([np.cos(headings), np.sin(headings)], axis=-1)
    paths = np.concatenate([starts, starts + np.cumsum(steps, axis=1)], axis=1)
    inside = ((paths >= margin - 1) & (paths <= style.size - margin)).all(axis=(1, 2))
    for path in paths[inside]:
        pixels = _rasterise(path, style.size)
        if not blocked[pixels[:, 0], pixels[:, 1]].any():
            return path
    return None


_DASH_SAMPLES = 8


def _rasterise(path: np.ndarray, size: int, dash: float = 1.0) -> np.ndarray:
    """Integer pixels covered by the first ``dash`` fraction of every segment of a polyline."""
    starts, deltas = path[:-1], path[1:] - path[:-1]
    t = np.linspace(0.0, dash, _DASH_SAMPLES)
    samples = starts[:, None, :] + t[None, :, None] * deltas[:, None, :]
    return np.clip(np.rint(samples.reshape(-1, 2)).astype(int), 0, size - 1)


@functools.cache
def _disc_offsets(radius: float) -> np.ndarray:
    reach = int(math.ceil(radius))
    rows, cols = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    return np.argwhere(rows**2 + cols**2 <= radius**2) - reach


def pathfinder_image(rng: np.random.Generator, connected: bool,
                     style: PathfinderStyle = PathfinderStyle()) -> np.ndarray:
    """One ``(size, size)`` uint8 image: two circle markers on the two ends of one contour
    (``connected``) or on one end each of two different contours, plus distractor contours.
    Contours never touch each other, and a drawing whose markers would join or split the wrong
    contours is redrawn, so the label is right by construction (checked on the undashed
    drawing with 8-connectivity)."""
    while True:
        occupied = np.zeros((style.size, style.size), dtype=bool)
        paths = []
        for _ in range(2 + style.distractors):
            path = _snake(rng, style, _dilate(occupied))
            if path is None:
                break
            paths.append(path)
            pixels = _rasterise(path, style.size)
            occupied[pixels[:, 0], pixels[:, 1]] = True
        if len(paths) < 2 + style.distractors:
            continue
        first = paths[0]
        ends = (first[0], first[-1]) if connected else (first[0], paths[1][-int(rng.integers(2))])
        discs = [np.clip(np.rint(end).astype(int) + _disc_offsets(style.marker_radius), 0, style.size - 1)
                 for end in ends]
        solid = occupied.copy()
        for disc in discs:
            solid[disc[:, 0], disc[:, 1]] = True
        if not _markers_fit(solid, discs[0][0], discs[1][0], len(paths), connected):
            continue  # a marker touched another contour: draw again
        image = np.zeros((style.size, style.size), dtype=np.uint8)
        for path in paths:
            pixels = _rasterise(path, style.size, style.dash)
            image[pixels[:, 0], pixels[:, 1]] = style.intensity
        for disc in discs:
            image[disc[:, 0], disc[:, 1]] = style.intensity
        return image


def _markers_fit(mask: np.ndarray, a: np.ndarray, b: np.ndarray, contours: int, connected: bool) -> bool:
    """On the undashed drawing (8-connectivity): the markers join no contours (one component
    per contour) and pixels ``a`` and ``b`` are on the same one exactly when ``connected``."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return count == contours and bool(labels[a[0], a[1]] == labels[b[0], b[1]]) == connected


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Pixels within one step of ``mask``, diagonals included (so contours never touch)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    rows = grown.copy()
    grown[:, 1:] |= rows[:, :-1]
    grown[:, :-1] |= rows[:, 1:]
    return grown


def generate_pathfinder(count: int, seed: int, style: PathfinderStyle = PathfinderStyle()
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images (N, size*size) uint8 and balanced labels (half 1, half 0, shuffled)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    rng.shuffle(labels)
    images = np.stack([pathfinder_image(rng, bool(label), style).reshape(-1) for label in labels])
    return images, labels.astype(np.int64)


def load_pathfinder(data_dir: str | Path | None = None, *, seed: int = 0,
                    sizes=(160_000, 20_000, 20_000), style: PathfinderStyle = PathfinderStyle()) -> LRAData:
    if data_dir is not None:
        raise ValueError("pathfinder is generated here; data_dir must be None (LRA's PNG release "
                         "is not read), got " + repr(str(data_dir)))
    splits = []
    for index, (name, count) in enumerate(zip(("train", "val", "test"), sizes, strict=True)):
        def build(count=count, index=index):
            images, labels = generate_pathfinder(count, seed * 10 + index + 1000, style)
            tokens = images.astype(np.int16) + 1
            return tokens, np.full(count, tokens.shape[1]), labels
        params = {"count": count, "seed": seed, "style": style.__dict__, "version": 1}
        splits.append(_cached(f"pathfinder-{name}", params, build))
    train, val, test = splits
    length = style.size**2
    return LRAData(train, val, test, 257, 2, length,
                   f"Pathfinder-{style.size} (generated, contour length {style.contour_length}, seed "
                   f"{seed}): {len(train)}/{len(val)}/{len(test)}, length {length}")


# -------------------------------------------------------------------------------- Retrieval


def read_aan_tsv(path: str | Path, max_len: int = 4000) -> TokenSplit:
    """LRA's ``new_aan_pairs.*.tsv`` (label, id1, id2, text1, text2) as byte ids (byte + 1) of
    both texts side by side: ``tokens[:, :max_len]`` the first document, ``[:, max_len:]`` the
    second (a :class:`PairSplit`)."""
    csv.field_size_limit(sys.maxsize)
    firsts, seconds, labels = [], [], []
    with open(path, newline="", encoding="utf-8") as handle:
        # LRA's files quote nothing: a '"' is text (csv's default quoting would join rows at one)
        for line, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if len(row) != 5:
                raise ValueError(f"{path}:{line}: expected 5 tab-separated columns "
                                 f"(label, id1, id2, text1, text2), got {len(row)}")
            labels.append(_label(row[0], 2, f"{path}:{line}"))
            for texts, text in ((firsts, row[3]), (seconds, row[4])):
                texts.append(np.frombuffer(text.encode("utf-8")[:max_len], np.uint8).astype(np.int16) + 1)
    first, first_len = _pad(firsts, max_len, np.int16)
    second, second_len = _pad(seconds, max_len, np.int16)
    return PairSplit(np.concatenate([first, second], 1), first_len, second_len, np.asarray(labels))


class PairSplit(TokenSplit):
    """Two documents per sample (Retrieval); batches give ``(B, 2 * max_len)`` tokens and a mask
    over both halves, so the model can encode each half on its own."""

    def __init__(self, tokens: np.ndarray, first_lengths: np.ndarray, second_lengths: np.ndarray,
                 labels: np.ndarray) -> None:
        super().__init__(tokens, first_lengths, labels)  # an empty document is all padding, either half
        self.second_lengths = torch.as_tensor(second_lengths, dtype=torch.long)

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1] // 2

    def subset(self, index) -> PairSplit:
        index = torch.as_tensor(index, dtype=torch.long)
        return PairSplit(self.tokens[index].numpy(), self.lengths[index].numpy(),
                         self.second_lengths[index].numpy(), self.labels[index].numpy())

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        order = (torch.randperm(len(self), generator=generator) if generator is not None
                 else torch.arange(len(self)))
        half = self.max_len
        positions = torch.arange(half)
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            mask = torch.cat([positions >= self.lengths[index, None],
                              positions >= self.second_lengths[index, None]], dim=1)
            yield self.tokens[index].long(), mask, self.labels[index]


def load_retrieval(data_dir: str | Path | None = None, *, max_len: int = 4000, **_) -> LRAData:
    if data_dir is None:
        raise FileNotFoundError(
            "Retrieval (AAN) data is not bundled and cannot be generated: pass --data-dir, a folder "
            "with LRA's new_aan_pairs.train.tsv, new_aan_pairs.eval.tsv and new_aan_pairs.test.tsv")
    folder = Path(data_dir)
    train, val, test = (read_aan_tsv(folder / f"new_aan_pairs.{s}.tsv", max_len)
                        for s in ("train", "eval", "test"))
    return LRAData(train, val, test, 257, 2, max_len,
                   f"AAN retrieval ({folder}): {len(train)}/{len(val)}/{len(test)} pairs, "
                   f"{max_len} bytes each")


LOADERS = {"listops": load_listops, "text": load_text, "image": load_image,
           "pathfinder": load_pathfinder, "retrieval": load_retrieval}
