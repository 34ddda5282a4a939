"""Image folders: one sub-folder per class holding image files, loaded fully into memory or streamed.

Images are decoded by the shared decoder (trainforge.data.images: PNG, JPEG, BMP, WebP, 8-bit TIFF, GIF; each checked
against the per-image pixel cap from its header before decoding; a large JPEG decoded by draft) and resized to the
training size by the model's own resize (trainforge.models.registry.resize_images), rounded to uint8. A whole folder
is decoded by processes over all cores, each writing its images into one shared array (see decode_into); the
decoded-image cache (trainforge.data.cache) keeps that array for later runs.

Layout: <root>/<class>/<image>, or <root>/train/<class>/<image> with <root>/val/<class>/<image> beside it.
"""

import concurrent.futures
import math
import mmap
import multiprocessing
import os
import pathlib
import re
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from trainforge.data.images import FORMAT_NAMES, IMAGE_SUFFIXES, is_grayscale, open_image, read_image
from trainforge.data.loaders import stratified_split
from trainforge.data.sources import ImageSet
from trainforge.errors import ConfigError, DataError
from trainforge.models.registry import resize_images

__all__ = [
    "FolderDataset",
    "StreamingLoader",
    "decode_files",
    "decode_into",
    "estimate_folder_bytes",
    "infer_image_format",
    "load_image_folder",
    "scan_image_folder",
    "split_stratified",
    "streaming_loader",
]

# How many image headers infer_image_format reads to choose grayscale or RGB: enough to catch a folder of color
# images, few enough that inspecting a large folder costs little next to loading it.
_CHANNEL_SAMPLE = 32

LabelledFiles = list[tuple[pathlib.Path, int]]


def _scan_classes(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Class name -> sorted image files, for the class folders directly under `root` (hidden ones skipped)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())
        hint = "; images found directly in it, move them into one sub-folder per class" if loose else ""
        raise DataError(f"{root}: no class folders (expected one sub-folder of images per class{hint})")
    classes = {}
    for d in class_dirs:
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{d}: empty class folder (expected {FORMAT_NAMES} files: "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        classes[d.name] = files
    return classes


def scan_image_folder(
    path: str | os.PathLike,
) -> tuple[LabelledFiles, LabelledFiles | None, list[str]]:
    """Lists an image folder as (train files with labels, val files with labels or None, class names).

    Uses <path>/train and <path>/val when both exist (their class names must agree; classes come from train/),
    else <path> itself with val None; labels index the sorted class names. Raises DataError when the path is
    missing or not a folder, has no class folders, a class folder holds no images, or val/ classes differ.
    """
    root = pathlib.Path(path)
    if not root.exists():
        raise DataError(f"{root}: image folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a folder with one sub-folder of images per class)")
    split = (root / "train").is_dir() and (root / "val").is_dir()
    train = _scan_classes(root / "train" if split else root)
    classes = list(train)
    index = {c: i for i, c in enumerate(classes)}
    train_files = [(f, index[c]) for c, files in train.items() for f in files]
    if not split:
        return train_files, None, classes
    val = _scan_classes(root / "val")
    if set(val) != set(train):
        problems = []
        if extra := sorted(set(val) - set(train)):
            problems.append(f"only in val/: {', '.join(extra)}")
        if absent := sorted(set(train) - set(val)):
            problems.append(f"only in train/: {', '.join(absent)}")
        raise DataError(f"{root}: train/ and val/ have different class folders ({'; '.join(problems)})")
    val_files = [(f, index[c]) for c, files in val.items() for f in files]
    return train_files, val_files, classes


def split_stratified(files: LabelledFiles, val_fraction: float, seed: int) -> tuple[LabelledFiles, LabelledFiles]:
    """Splits files into (train, val), the same for the same seed: each class gives round(n * val_fraction) of its
    n files to val, but at least 1 when n >= 2 and val_fraction > 0, and never its last one. Both keep input order."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or not files:
        return list(files), []
    kept, held = stratified_split(torch.tensor([label for _, label in files]), val_fraction, seed)
    return [files[i] for i in kept.tolist()], [files[i] for i in held.tolist()]


def _size_pair(image_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return channels


def infer_image_format(
    files: Sequence[tuple[pathlib.Path, int]],
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
) -> tuple[int, tuple[int, int]]:
    """Returns (channels, (height, width)) that loading `files` will produce, filling in what is not given.

    Default size: the first file's. Default channels: 1 if every sampled file (up to 32, spread over the list)
    is grayscale (with or without alpha, or a palette of grays), else 3; both read from headers only.
    """
    if not files:
        raise DataError("no image files to load")
    size = None if image_size is None else _size_pair(image_size)
    if channels is not None:
        _check_channels(channels)
    if size is None:
        with open_image(files[0][0]) as image:
            size = (image.height, image.width)
    if channels is None:
        step = math.ceil(len(files) / _CHANNEL_SAMPLE)
        channels = 1 if all(_header_is_gray(f) for f, _ in files[::step]) else 3
    return channels, size  # type: ignore[return-value]


def _header_is_gray(path: pathlib.Path) -> bool:
    with open_image(path) as image:
        return is_grayscale(image)


def _load(path: pathlib.Path, size: tuple[int, int], channels: int) -> torch.Tensor:
    image = torch.from_numpy(read_image(path, channels, size=size))
    if tuple(image.shape[-2:]) != size:
        resized = resize_images(image[None].float(), size)[0]
        image = resized.round_().clamp_(0, 255).to(torch.uint8)
    return image


def shared_array(n: int, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A zeroed uint8 [n, channels, *size] array in anonymous shared memory, which forked processes write into."""
    nbytes = n * channels * size[0] * size[1]
    return np.frombuffer(mmap.mmap(-1, max(1, nbytes)), np.uint8, nbytes).reshape(n, channels, *size)


def decode_files(files: LabelledFiles, size: tuple[int, int], channels: int, classes: list[str], *,
                 workers: int | None = None, progress: bool = False) -> ImageSet:
    """Decodes `files` into one in-memory uint8 ImageSet of `channels` x size (see decode_into)."""
    _check_channels(channels)
    images = shared_array(len(files), channels, size)
    decode_into([path for path, _ in files], size, channels, images, workers=workers, progress=progress)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(images=torch.from_numpy(images), labels=labels, classes=classes)


# Images per task handed to a decoding process: enough that handing it over costs little next to decoding them, few
# enough that the progress bar moves and the processes finish together.
DECODE_CHUNK = 32
# What forked decoding processes inherit: (paths, size, channels, output array).
_JOB: tuple | None = None


def decode_into(paths: Sequence[pathlib.Path], size: tuple[int, int], channels: int, out: np.ndarray, *,
                workers: int | None = None, progress: bool = False) -> float:
    """Decodes paths[i] into out[i] (uint8 [N, channels, *size]) in `workers` processes (default: the cores this
    process may use), with a progress bar (images/s, time left) when `progress`; returns the seconds it took.

    `out` is written by forked processes, so it must be a shared mapping: a memory-mapped file or `shared_array`.
    Raises DataError naming a bad file (the first in order of those met before decoding stopped)."""
    from ..train.progress import Bar

    global _JOB
    started = time.perf_counter()
    chunks = [(i, min(i + DECODE_CHUNK, len(paths))) for i in range(0, len(paths), DECODE_CHUNK)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(chunks))
    _JOB = (list(paths), size, channels, out)
    bar = Bar(progress and bool(paths), "decode", len(paths), fields=("rate",), clock="remaining")
    done, errors, finished, first = 0, [], 0, 0.0
    try:
        for (start, stop), chunk_errors in _decoded_chunks(chunks, workers):
            errors.extend(chunk_errors)
            if errors:
                break
            finished += 1
            now = time.perf_counter()
            first = first or now
            if finished == min(workers + 1, len(chunks)):
                bar.print(f"decoding {len(paths):,} images to {size[1]}x{size[0]}x{channels} in {workers} "
                          f"process{'es' if workers > 1 else ''}: about "
                          f"{_decode_estimate(now - started, now - first, finished, len(chunks), workers):.0f} s")
            done += stop - start
            bar.update(completed=done, rate=f"{done / (time.perf_counter() - started):,.0f} images/s")
    finally:
        _JOB = None
        bar.close()
    if errors:
        raise DataError(min(errors)[1])
    return time.perf_counter() - started


def _decode_estimate(elapsed: float, round_seconds: float, finished: int, chunks: int, workers: int) -> float:
    """Seconds a decode will take in all, `finished` of its `chunks` done in `elapsed`: from the first chunk's end
    to the (workers+1)-th's, one round of `workers` chunks was decoded (the processes' start-up is not in it)."""
    if finished <= workers:  # too few chunks for a round: as long again for each round
        return elapsed * math.ceil(chunks / workers)
    return elapsed + round_seconds * math.ceil((chunks - finished) / workers)


def _decoded_chunks(chunks: list[tuple[int, int]], workers: int) -> Iterator[tuple[tuple[int, int], list]]:
    """(chunk, its errors) as chunks finish: in this process for one worker, else in forked processes."""
    if workers <= 1:
        threads = torch.get_num_threads()
        # One small image at a time: intra-op threads only contend (13x slower on a loaded 2-core machine).
        torch.set_num_threads(1)
        try:
            for chunk in chunks:
                yield chunk, _decode_chunk(*chunk)
        finally:
            torch.set_num_threads(threads)
        return
    # Forked, as DataLoader workers are: they inherit the job and the shared output without pickling either.
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                                  initializer=torch.set_num_threads, initargs=(1,))
    try:
        futures = {pool.submit(_decode_chunk, *chunk): chunk for chunk in chunks}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()
    except concurrent.futures.process.BrokenProcessPool:
        raise DataError("a process decoding images died (out of memory?); free memory or pass --loader streaming"
                        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_chunk(start: int, stop: int) -> list[tuple[int, str]]:
    paths, size, channels, out = _JOB
    errors = []
    for i in range(start, stop):
        try:
            out[i] = _load(paths[i], size, channels).numpy()
        except DataError as exc:
            errors.append((i, str(exc)))
    return errors


def load_image_folder(
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[ImageSet, ImageSet]:
    """Decodes a whole image folder into memory as (train, val) uint8 [N, C, H, W] sets.

    Uses the folder's own train/ and val/ when present, else a seeded stratified split (see split_stratified;
    val may then be empty). Every image is converted to `channels` and resized to image_size x image_size
    (by the models' resize, rounded); defaults come from infer_image_format. Raises DataError naming any file that cannot be
    decoded, and for the layout problems scan_image_folder reports.
    """
    train_files, val_files, classes = scan_image_folder(path)
    if val_files is None:
        train_files, val_files = split_stratified(train_files, val_fraction, seed)
    channels, size = infer_image_format(train_files, image_size=image_size, channels=channels)
    return decode_files(train_files, size, channels, classes), decode_files(val_files, size, channels, classes)


def estimate_folder_bytes(files: Sequence[object], image_size: int | tuple[int, int], channels: int) -> int:
    """Bytes that `files` take once decoded to uint8 channels x image_size: what device residency would cost."""
    height, width = _size_pair(image_size)
    return len(files) * channels * height * width


class FolderDataset(torch.utils.data.Dataset):
    """Decodes images on demand: item i is (uint8 [channels, H, W] tensor, int label) of files[i].

    Raises DataError naming the file when an image cannot be decoded.
    """

    def __init__(self, files: LabelledFiles, image_size: int | tuple[int, int], channels: int) -> None:
        self.files = list(files)
        self.size = _size_pair(image_size)
        self.channels = _check_channels(channels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        return _load(path, self.size, self.channels), label


class _ShardedBatches(torch.utils.data.Sampler[list[int]]):
    """This rank's share of every global batch of one epoch; the epoch's order depends only on (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int,
                 world_size: int) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        # A last batch smaller than the number of ranks would leave some rank with nothing to do in a step the
        # others take, so it is dropped; every rank then runs the same number of steps.
        keep_rest = not self.drop_last and rest >= self.world_size
        return full + 1 if keep_rest else full

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        for step in range(len(self)):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield batch[self.rank :: self.world_size].tolist()


class StreamingLoader:
    """Batches of (uint8 images, int64 labels) on the target device, decoded by worker processes.

    Iterating runs one epoch; each iteration starts the next epoch (a fresh permutation when shuffling) unless
    set_epoch chose it. The order of epoch e depends only on (seed, e). With world_size > 1, rank r gets positions
    r::world_size of each global batch of batch_size, so N ranks together follow the one-process schedule (a last
    global batch smaller than world_size is dropped so that all ranks run the same number of steps).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, *, batch_size: int, shuffle: bool, seed: int,
                 device: str | torch.device, num_workers: int = 2, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        if batch_size < world_size:
            raise ConfigError(f"batch_size ({batch_size}) must be at least world_size ({world_size})")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        self.device = torch.device(device)
        self._batches = _ShardedBatches(len(dataset), batch_size, shuffle, seed, drop_last, rank, world_size)
        self._epoch = 0
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self._batches,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iteration run epoch `epoch` (for resuming)."""
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._batches.epoch = self._epoch
        self._epoch += 1
        try:
            for images, labels in self._loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        except DataError as e:
            message = str(e)
            if not message.startswith("Caught "):
                raise
            # The re-raised worker error's traceback is in a reference cycle with it, which would keep the
            # DataLoader's iterator alive until a garbage collection, whose finalizer then waits seconds for
            # the workers; dropping the traceback lets the iterator shut its workers down promptly.
            e.__traceback__ = None
            # A worker's error arrives wrapped in its traceback text; keep the one line a user needs.
            raise DataError(re.sub(r"^[\w.]*Error: ", "", message.rstrip().splitlines()[-1])) from None


def streaming_loader(dataset: torch.utils.data.Dataset, *, batch_size: int, shuffle: bool, seed: int,
                     device: str | torch.device, num_workers: int = 2, drop_last: bool = False, rank: int = 0,
                     world_size: int = 1) -> StreamingLoader:
    """A StreamingLoader over `dataset` (see there for the promises)."""
    return StreamingLoader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device,
                           num_workers=num_workers, drop_last=drop_last, rank=rank, world_size=world_size)
