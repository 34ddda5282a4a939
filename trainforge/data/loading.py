"""Loading a data set: a built-in IDX set by name or an image folder by path, into a DataBundle."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import DataError
from ..hardware.memory import budget
from .loaders import CachedRows, balanced_subset
from .sources import BUILTIN_DATASETS, ImageSet, load_builtin

if TYPE_CHECKING:
    from .folder import FolderDataset


@dataclasses.dataclass
class DataBundle:
    """A training set, a test set and the facts a model needs about them."""

    name: str
    train: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Set when the training images are too many to hold: rows of the memory-mapped decoded cache gathered batch by
    # batch, or (without a cache) files decoded batch by batch; `train.images` is then an empty [0, C, H, W] tensor
    # that only records the shape.
    stream: "CachedRows | FolderDataset | None" = None
    note: str | None = None  # how an image folder was decoded: a cache hit, the decoding time, or why not cached

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


def channel_stats(images: torch.Tensor, chunk_bytes: int = 2 ** 26) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units, summed in chunks of about `chunk_bytes` of
    float64 so that no float copy of the whole set is ever made."""
    channels = images.shape[1]
    per_image = max(1, images[:1].numel() * 8)
    rows = max(1, chunk_bytes // per_image)
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), rows):
        x = images[start:start + rows].to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square_().sum(dim=(0, 2, 3))
    n = max(1, images.numel() // channels)
    mean = total / n
    var = (squares - total * mean) / max(1, n - 1)
    return tuple(mean.tolist()), tuple(var.clamp_min(0).sqrt().clamp_min(1e-3).tolist())


# Decoded training images may take this share of the memory budget before `loader="auto"` streams them instead.
RESIDENT_SHARE = 0.5
# Images decoded to estimate a streamed folder's mean and std.
STATS_SAMPLE = 512


def load_data(data: str, data_dir: str | None = None, *, subset: int | None = None, seed: int = 0,
              image_size: int | None = None, val_fraction: float = 0.1, loader: str = "auto",
              memory_budget: int | None = None, progress: bool = False,
              exclude: frozenset[Path] = frozenset()) -> DataBundle:
    """Loads a built-in data set by name, or an image folder by path (without the files in `exclude`).

    A folder is decoded once, at `image_size` (default: its first image's width), into the decoded-image cache
    (trainforge.data.cache; a progress bar when `progress`) and read from it by later runs. Built-in sets and
    folders that fit are held in memory as uint8 (a folder's as pages of the memory-mapped cache); with
    `loader="streaming"` (or `"auto"` and a folder whose decoded training images exceed RESIDENT_SHARE of
    `memory_budget`, default: the host's budget) training gathers each batch from the memory-mapped cache, or
    decodes it from the files where no cache could be written.
    """
    if data in BUILTIN_DATASETS:
        train, test = load_builtin(data, data_dir)
        info = BUILTIN_DATASETS[data]
        bundle = DataBundle(data, train, test, (info.mean,), (info.std,))
    elif Path(data).is_dir():
        bundle = _load_folder(data, image_size=image_size, val_fraction=val_fraction, seed=seed, subset=subset,
                              loader=loader, memory_budget=memory_budget, progress=progress, exclude=exclude)
        subset = None
    else:
        raise DataError(f"data {data!r} is neither a built-in data set ({', '.join(BUILTIN_DATASETS)}) "
                        f"nor an existing folder")
    if subset is not None:
        if subset > len(bundle.train.labels):
            raise DataError(f"--subset {subset} exceeds the {len(bundle.train.labels)} training images of {data}")
        idx = balanced_subset(bundle.train.labels, subset, seed)
        bundle.train = ImageSet(bundle.train.images[idx], bundle.train.labels[idx], bundle.train.classes)
    return bundle


def _load_folder(path: str, *, image_size: int | None, val_fraction: float, seed: int, subset: int | None,
                 loader: str, memory_budget: int | None, progress: bool, exclude: frozenset[Path]) -> DataBundle:
    from .cache import decode_folder
    from .folder import estimate_folder_bytes, infer_image_format

    train_files, val_files, classes, listed = _scan(path, exclude)
    train_files, val_files = _splits(path, train_files, val_files, val_fraction, seed, subset)
    channels, size = infer_image_format(train_files, image_size=image_size)
    if image_size is None:
        size = (size[1], size[1])  # a model built on the folder trains at the first image's width, square
    stream = loader == "streaming" or (
        loader == "auto" and estimate_folder_bytes(train_files, size, channels) > RESIDENT_SHARE * (
            memory_budget or budget(None, torch.device("cpu"))[0]))
    decoded = decode_folder(path, listed, size, channels, progress=progress, in_memory=not stream)
    if decoded is None:
        return _decoded_per_batch(path, train_files, val_files, classes, size, channels)
    row = {file: i for i, file in enumerate(listed)}
    train_rows = torch.tensor([row[file] for file, _ in train_files], dtype=torch.int64)
    test = _rows(decoded.images, [row[file] for file, _ in val_files], val_files, classes)
    labels = torch.tensor([label for _, label in train_files], dtype=torch.int64)
    if not stream:
        train = ImageSet(_take(decoded.images, train_rows), labels, classes)
        mean, std = channel_stats(train.images)
        return DataBundle(path, train, test, mean, std, note=decoded.note)
    mean, std = channel_stats(_take(decoded.images, train_rows[::max(1, len(train_rows) // STATS_SAMPLE)]))
    shape_only = torch.empty((0, channels, *size), dtype=torch.uint8)
    return DataBundle(path, ImageSet(shape_only, labels, classes), test, mean, std,
                      stream=CachedRows(decoded.images, train_rows), note=decoded.note)


def folder_splits(path: str, val_fraction: float, seed: int, exclude: frozenset[Path] = frozenset()
                  ) -> tuple[list, list, list[str]]:
    """The (train, val) files with labels, and the class names, that `load_data` makes of the folder at `path`."""
    train_files, val_files, classes, _ = _scan(path, exclude)
    return (*_splits(path, train_files, val_files, val_fraction, seed, None), classes)


def _scan(path: str, exclude: frozenset[Path]) -> tuple[list, list | None, list[str], list[Path]]:
    """The folder's train and val files (val None without val/), its classes, and every file the decoded-image
    cache holds (the whole folder, every split), leaving out `exclude`."""
    from .folder import scan_image_folder

    train_files, val_files, classes = scan_image_folder(path)
    if exclude:
        train_files = [(f, c) for f, c in train_files if f not in exclude]
        val_files = None if val_files is None else [(f, c) for f, c in val_files if f not in exclude]
    return train_files, val_files, classes, [file for file, _ in train_files + (val_files or [])]


def _splits(path: str, train_files: list, val_files: list | None, val_fraction: float, seed: int,
            subset: int | None) -> tuple[list, list]:
    """The folder's (train, val) files: its own val/, else a seeded stratified part; train cut to `subset`."""
    from .folder import split_stratified

    if val_files is None:
        train_files, val_files = split_stratified(train_files, val_fraction, seed)
    if not val_files:
        raise DataError(f"{path}: no images left for evaluation (add a val/ folder or raise --val-fraction)")
    if subset is not None:
        if subset > len(train_files):
            raise DataError(f"--subset {subset} exceeds the {len(train_files)} training images of {path}")
        labels = torch.tensor([label for _, label in train_files])
        train_files = [train_files[i] for i in balanced_subset(labels, subset, seed).tolist()]
    return train_files, val_files


def _take(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """images[rows]: a view when the rows are one ascending run (train/ of a memory-mapped cache, whose pages then
    stay shared and reclaimable), else a copy."""
    if len(rows) and bool((rows == torch.arange(int(rows[0]), int(rows[0]) + len(rows))).all()):
        return images[int(rows[0]):int(rows[0]) + len(rows)]
    return images.index_select(0, rows)


def _rows(images: torch.Tensor, rows: list[int], files: list, classes: list[str]) -> ImageSet:
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(_take(images, torch.tensor(rows, dtype=torch.int64)), labels, classes)


def _decoded_per_batch(path: str, train_files: list, val_files: list, classes: list[str], size: tuple[int, int],
                       channels: int) -> DataBundle:
    """A folder too large for memory and without a decoded cache: training images decoded batch by batch."""
    from .folder import FolderDataset, decode_files

    test = decode_files(val_files, size, channels, classes)
    labels = torch.tensor([label for _, label in train_files], dtype=torch.int64)
    step = max(1, len(train_files) // STATS_SAMPLE)
    mean, std = channel_stats(decode_files(train_files[::step], size, channels, classes).images)
    shape_only = torch.empty((0, channels, *size), dtype=torch.uint8)
    return DataBundle(path, ImageSet(shape_only, labels, classes), test, mean, std,
                      stream=FolderDataset(train_files, size, channels),
                      note="no decoded-image cache: training images are decoded from their files in every epoch")
