"""Data sets (built-in IDX sets and image folders) and the loaders that feed training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..errors import DataError
from .loaders import DeviceLoader, balanced_subset, eval_batches
from .sources import BUILTIN_DATASETS, ImageSet, data_root, load_builtin


@dataclasses.dataclass
class DataBundle:
    """A training set, a test set and the facts a model needs about them."""

    name: str
    train: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def load_data(data: str, data_dir: str | None = None, *, subset: int | None = None, seed: int = 0,
              image_size: int | None = None, val_fraction: float = 0.1) -> DataBundle:
    """Loads a built-in data set by name, or an image folder by path, fully into memory as uint8."""
    if data in BUILTIN_DATASETS:
        train, test = load_builtin(data, data_dir)
        info = BUILTIN_DATASETS[data]
        mean, std = (info.mean,), (info.std,)
    elif Path(data).exists():
        from .folder import load_image_folder
        train, test = load_image_folder(data, image_size=image_size, val_fraction=val_fraction, seed=seed)
        mean, std = channel_stats(train.images)
    else:
        raise DataError(f"data {data!r} is neither a built-in data set ({', '.join(BUILTIN_DATASETS)}) "
                        f"nor an existing folder")
    if subset is not None:
        idx = balanced_subset(train.labels, subset, seed)
        train = ImageSet(train.images[idx], train.labels[idx], train.classes)
    return DataBundle(data, train, test, mean, std)


__all__ = ["DataBundle", "DeviceLoader", "ImageSet", "balanced_subset", "channel_stats", "data_root", "eval_batches",
           "load_builtin", "load_data", "BUILTIN_DATASETS"]
