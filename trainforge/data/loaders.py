"""Batches for training and evaluation.

The device-resident loader keeps a whole data set on the device as uint8 and does shuffling and augmentation there,
batch by batch, with no per-sample Python (MNIST is 47 MB as uint8). Normalization happens inside the model
(`models.Preprocess`), so every loader yields raw uint8 images.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from .folder import FolderDataset
    from .loading import DataBundle


@dataclasses.dataclass
class CachedRows:
    """Training images too large to hold: rows `rows` of `images`, a memory-mapped decoded-image cache whose pages
    the kernel reads in as batches need them and may drop again (they are file-backed)."""

    images: torch.Tensor
    rows: torch.Tensor


def augment_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one batch's augmentation draws: a function of (seed, epoch, step) only, so that a resumed epoch
    sees the same draws; wrapped to 64 bits, the widest seed a generator takes."""
    return ((seed * 1_000_003 + epoch) * 100_003 + step) % 2 ** 64


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a seeded subset of `n` samples with the classes as equally represented as they allow."""
    classes = torch.unique(labels)
    gen = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=gen)] for idx in per_class]
    quota = [0] * len(per_class)
    remaining = min(n, len(labels))
    # Round-robin fill: each class gets n / k unless it runs out, and the others absorb what it lacked.
    while remaining > 0:
        open_classes = [i for i, idx in enumerate(per_class) if quota[i] < len(idx)]
        share = max(1, remaining // len(open_classes))
        for i in open_classes:
            take = min(share, len(per_class[i]) - quota[i], remaining)
            quota[i] += take
            remaining -= take
            if remaining == 0:
                break
    chosen = torch.cat([idx[:q] for idx, q in zip(per_class, quota)])
    return chosen.sort().values


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (kept, held-out) indices, the same for the same seed: each class of n samples gives round(n * fraction)
    of them, at least one and never its last, to the held-out part."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        n_held = min(max(round(len(members) * fraction), 1), len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=gen)[:n_held]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[torch.cat(held)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def holdout_split(bundle: "DataBundle", fraction: float, seed: int) -> "DataBundle":
    """`bundle` with a stratified `fraction` of its training images moved into `test`; its test set is dropped.

    Validation on this part instead of the test set keeps the test set unseen while choosing hyperparameters.
    """
    from ..errors import ConfigError
    from .sources import ImageSet

    if bundle.stream is not None:
        raise ConfigError(f"--holdout needs the training images of {bundle.name} in memory; use --loader device")
    if not 0 < fraction < 1:
        raise ConfigError(f"--holdout needs --val-fraction between 0 and 1 (exclusive), got {fraction}")
    train = bundle.train
    counts = torch.bincount(train.labels)
    if int(counts[counts > 0].min()) < 2:
        raise ConfigError(f"--holdout needs at least 2 training images of every class of {bundle.name}")
    kept, held = stratified_split(train.labels, fraction, seed)
    return dataclasses.replace(
        bundle, train=ImageSet(train.images[kept], train.labels[kept], train.classes),
        test=ImageSet(train.images[held], train.labels[held], train.classes))


def augment_batch(images: torch.Tensor, mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """Random flips and/or translations by up to 2 pixels, per sample, as whole-batch tensor ops."""
    if mode == "none":
        return images
    n, _, h, w = images.shape
    dev = images.device
    if "flip" in mode:
        flip = torch.rand(n, device=dev, generator=generator) < 0.5
        images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    if "translate" in mode:
        pad = 2
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
        rows = (dy + torch.arange(h, device=dev)).view(n, 1, h, 1)
        cols = (dx + torch.arange(w, device=dev)).view(n, 1, 1, w)
        batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
        chan = torch.arange(images.shape[1], device=dev).view(1, -1, 1, 1)
        images = padded[batch, chan, rows, cols]
    return images


class DeviceLoader:
    """Shuffled uint8 batches of a data set that lives on the device.

    Epoch `e` uses the permutation drawn from a generator seeded with (seed, e), so any epoch, and any step within
    it, can be reproduced after a restart without replaying the ones before. With `world_size > 1` each rank takes
    positions `rank::world_size` of every global batch, so N processes follow the schedule of one.

    With `rows`, the images are rows `rows` of `images` (a memory-mapped decoded cache), which stay on the host:
    each batch is gathered there and moved to the device.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, device: torch.device,
                 shuffle: bool = True, seed: int = 0, augment: str = "none", drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, rows: torch.Tensor | None = None):
        self.rows = rows
        self.images = images if rows is not None else images.to(device, non_blocking=True).contiguous()
        self.labels = labels.to(device, non_blocking=True)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_step = 0
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        full, rest = divmod(len(self.labels), self.batch_size)
        # A last global batch smaller than the number of ranks would leave some rank with nothing to do in a step
        # the others take, so it is dropped (as the streaming loader does); every rank runs the same steps.
        return full + (1 if rest and not self.drop_last and rest >= self.world_size else 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Selects the epoch to iterate next, starting at `start_step` (to resume mid-epoch)."""
        self.epoch = epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        self.generator.manual_seed((self.seed * 1_000_003 + self.epoch) % 2 ** 64)
        if self.shuffle:
            order = torch.randperm(n, device=self.device, generator=self.generator)
        else:
            order = torch.arange(n, device=self.device)
        # Augmentation draws depend only on (seed, epoch, step), so a resumed epoch sees the same ones.
        aug_gen = torch.Generator(device=self.device)
        for step in range(self.start_step, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            if self.world_size > 1:
                idx = idx[self.rank::self.world_size]
            # index_select is an order of magnitude faster than advanced indexing for a row gather on the CPU.
            if self.rows is None:
                images = self.images.index_select(0, idx)
            else:
                images = self.images.index_select(0, self.rows[idx.cpu()]).to(self.device, non_blocking=True)
            if self.augment != "none":
                aug_gen.manual_seed(augment_seed(self.seed, self.epoch, step))
                images = augment_batch(images, self.augment, aug_gen)
            yield images, self.labels.index_select(0, idx)


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-order batches of at most `batch_size` of this rank's shard of an evaluation set (already on the device).

    Every rank yields the same number of batches, as a sharded (FSDP) model needs all ranks in each forward pass.
    """
    if world_size > 1:
        per_rank = math.ceil(len(labels) / world_size)
        images, labels = images[rank::world_size], labels[rank::world_size]
        chunks = max(1, math.ceil(per_rank / batch_size))
        yield from zip(torch.tensor_split(images, chunks), torch.tensor_split(labels, chunks))
        return
    for start in range(0, len(labels), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


class _StreamingTrainLoader:
    """The streaming loader with the DeviceLoader's interface: resumable epochs and on-device augmentation."""

    def __init__(self, dataset: "FolderDataset", batch_size: int, *, device: torch.device, seed: int, augment: str,
                 workers: int, rank: int, world_size: int):
        from .folder import streaming_loader

        self.loader = streaming_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed, device=device,
                                       num_workers=workers, rank=rank, world_size=world_size)
        self.seed, self.augment, self.device = seed, augment, device
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.set_epoch(self.epoch)
        generator = torch.Generator(device=self.device)
        # Batches before a resume point are decoded and dropped: the order must match the interrupted epoch's.
        for step, (images, labels) in enumerate(itertools.islice(self.loader, self.start_step, None),
                                                start=self.start_step):
            if self.augment != "none":
                generator.manual_seed(augment_seed(self.seed, self.epoch, step))
                images = augment_batch(images, self.augment, generator)
            yield images, labels


def make_train_loader(bundle: DataBundle, batch_size: int, *, device: torch.device, seed: int, augment: str,
                      workers: int = 2, rank: int = 0, world_size: int = 1):
    """The training batches of `bundle`: device-resident when it is in memory, gathered from the memory-mapped
    decoded cache or decoded from disk otherwise."""
    if isinstance(bundle.stream, CachedRows):
        return DeviceLoader(bundle.stream.images, bundle.train.labels, batch_size, device=device, shuffle=True,
                            seed=seed, augment=augment, rank=rank, world_size=world_size, rows=bundle.stream.rows)
    if bundle.stream is not None:
        return _StreamingTrainLoader(bundle.stream, batch_size, device=device, seed=seed, augment=augment,
                                     workers=workers, rank=rank, world_size=world_size)
    return DeviceLoader(bundle.train.images, bundle.train.labels, batch_size, device=device, shuffle=True,
                        seed=seed, augment=augment, rank=rank, world_size=world_size)
