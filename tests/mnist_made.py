"""Data sets made from the MNIST that ships inside the package, so that no test needs a data root, a download or
Fashion-MNIST: subsets, a 5+5-class split, and image folders (PNG, or photo-like RGB JPEGs upscaled from digits).

The fixtures in conftest.py build these once per session; other modules call the makers for their own variants.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainforge.data import DataBundle, ImageSet, balanced_subset


def subset(bundle: DataBundle, n_train: int, n_test: int, seed: int = 0, name: str | None = None) -> DataBundle:
    """Seeded, class-balanced subsets of both splits, with the bundle's normalization."""
    tr = balanced_subset(bundle.train.labels, n_train, seed)
    te = balanced_subset(bundle.test.labels, n_test, seed)
    return DataBundle(name or bundle.name,
                      ImageSet(bundle.train.images[tr], bundle.train.labels[tr], bundle.classes),
                      ImageSet(bundle.test.images[te], bundle.test.labels[te], bundle.classes),
                      bundle.mean, bundle.std)


def class_split(bundle: DataBundle, classes: list[int], name: str) -> DataBundle:
    """The images of `classes` only, relabelled 0..len(classes)-1 in that order (a task of its own)."""
    def part(images: ImageSet) -> ImageSet:
        keep = torch.isin(images.labels, torch.tensor(classes))
        remap = torch.full((len(bundle.classes),), -1, dtype=torch.int64)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        return ImageSet(images.images[keep], remap[images.labels[keep]], [bundle.classes[c] for c in classes])

    return DataBundle(name, part(bundle.train), part(bundle.test), bundle.mean, bundle.std)


def to_photo(image: torch.Tensor, size: int | tuple[int, int]) -> Image.Image:
    """A digit (or any gray image) as an RGB picture of `size` pixels (a side, or (width, height)): upscaled with an
    antialiased resize and tinted per channel, so that decoding a JPEG of it costs what a photo of that size costs.
    The one way to make a photo from a real image: benchmarks/make_photo_folder.py makes its folders with it."""
    width, height = (size, size) if isinstance(size, int) else size
    gray = Image.fromarray(image[0].numpy()).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(gray, dtype=np.float32)
    rgb = np.stack([pixels, 255 - pixels * 0.6, pixels * 0.8 + 30], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def write_folder(root: Path, images: ImageSet, fmt: str = "png", size: int | tuple[int, int] | None = None,
                 quality: int = 90) -> Path:
    """One sub-folder per class of `images` (named by the class), one file per image: PNG of the gray digit as it
    is, or (`fmt="jpeg"`) an RGB JPEG upscaled to `size` pixels (a side, or (width, height))."""
    for i, (image, label) in enumerate(zip(images.images, images.labels.tolist())):
        folder = root / images.classes[label].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "png":
            Image.fromarray(image[0].numpy()).save(folder / f"{i:05d}.png")
        elif fmt == "jpeg":
            to_photo(image, size or image.shape[-1]).save(folder / f"{i:05d}.jpg", quality=quality)
        else:
            raise ValueError(f"fmt must be png or jpeg, not {fmt!r}")
    return root


def write_split_folder(root: Path, bundle: DataBundle, fmt: str = "png",
                       size: int | tuple[int, int] | None = None) -> Path:
    """`root/train/<class>/…` from the bundle's training images and `root/val/<class>/…` from its test images."""
    write_folder(root / "train", bundle.train, fmt, size)
    write_folder(root / "val", bundle.test, fmt, size)
    return root
