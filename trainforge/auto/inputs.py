"""What `auto` takes in: the data checked (classes, images per class, unreadable files) and split once into the part
that trains and is searched on, and the held-out part, saved as a manifest (split.json) and not looked at until the
winner is trained."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .. import runs
from ..choose import search_side
from ..data import BUILTIN_DATASETS, DataBundle, ImageSet, load_data
from ..errors import DataError

SPLIT_FILE = "split.json"
# The held-out share of a folder without val/ (and of a built-in set's training images): per-class figures want
# about 30 images per class (report.stats), and a fifth of a small folder comes nearer that than a tenth, while
# four fifths still train.
HELDOUT_FRACTION = 0.2
# Unreadable files named in the one-line error (the rest are counted).
NAMED_FILES = 3


@dataclasses.dataclass
class Split:
    """The data split once: `search` trains and is searched on (its test part is the held-out one, unused until
    the winner is trained), `heldout` judges the winner; `manifest` is split.json's content."""

    search: DataBundle
    heldout: ImageSet
    manifest: dict[str, Any]
    image_size: int | None  # the side a folder was decoded at (None: its own)
    skipped: list[str]  # unreadable files left out (--skip-bad-images)
    final: DataBundle  # what the winner's final training gets
    final_options: dict[str, Any]  # and the TrainConfig fields that make it split off the held-out part itself

    @property
    def folder(self) -> bool:
        return self.manifest["kind"] != "built-in"


def split_data(data: str, *, data_dir: str | None, seed: int, skip_bad: bool, memory_budget: int | None,
               progress: bool) -> Split:
    """Checks `data` and splits it: a folder's own val/ or a seeded stratified HELDOUT_FRACTION held out (file names
    in the manifest), a built-in set's training images split the same way (the seed and indices)."""
    if data in BUILTIN_DATASETS:
        return _builtin(data, data_dir, seed)
    if not Path(data).is_dir():
        raise DataError(f"DATA {data!r}: neither a built-in data set ({', '.join(BUILTIN_DATASETS)}) nor a folder")
    exclude, skipped = _unreadable(data, skip_bad)
    while True:
        try:
            return _folder(data, seed, exclude, skipped, memory_budget, progress)
        except DataError as exc:  # a file whose header reads but whose pixels do not
            bad = _named_file(exc, data)
            if bad is None:
                raise
            if not skip_bad:
                raise DataError(f"{exc}; pass --skip-bad-images to leave such files out") from None
            exclude, skipped = exclude | {bad}, [*skipped, str(exc)]


def _builtin(data: str, data_dir: str | None, seed: int) -> Split:
    from ..data.loaders import holdout_split, stratified_split

    full = load_data(data, data_dir)
    _, held = stratified_split(full.train.labels, HELDOUT_FRACTION, seed)
    search = holdout_split(full, HELDOUT_FRACTION, seed)
    manifest = {"data": data, "kind": "built-in", "seed": seed, "fraction": HELDOUT_FRACTION,
                "train_images": len(search.train.labels), "heldout_images": len(held),
                "heldout_indices": held.tolist()}
    return Split(search, search.test, manifest, None, [], full, {"holdout": True})


def _folder(data: str, seed: int, exclude: frozenset[Path], skipped: list[str], memory_budget: int | None,
            progress: bool) -> Split:
    from ..data.folder import infer_image_format
    from ..data.loading import folder_splits

    train_files, held_files, classes = folder_splits(data, HELDOUT_FRACTION, seed, exclude)
    _check_classes(data, train_files, classes)
    _, (_, width) = infer_image_format(train_files)
    image_size = search_side(width)
    bundle = load_data(data, seed=seed, val_fraction=HELDOUT_FRACTION, image_size=image_size,
                       memory_budget=memory_budget, progress=progress, exclude=exclude)
    root = Path(data)
    own_val = (root / "val").is_dir() and (root / "train").is_dir()
    manifest = {"data": data, "kind": "val/" if own_val else "stratified", "seed": seed,
                "fraction": None if own_val else HELDOUT_FRACTION, "classes": classes,
                "train_images": len(train_files), "heldout_images": len(held_files),
                "heldout": [[f.relative_to(root).as_posix(), label] for f, label in held_files],
                "train": [[f.relative_to(root).as_posix(), label] for f, label in train_files],
                "skipped": [str(Path(p).relative_to(root)) for p in sorted(exclude)]}
    return Split(bundle, bundle.test, manifest, image_size, skipped, bundle, {})


def _check_classes(data: str, train_files: list, classes: list[str]) -> None:
    """One class, or a class too small to give the search a validation image and keep one to train on."""
    if len(classes) < 2:
        raise DataError(f"{data}: one class ({classes[0]}); a classifier needs at least 2 class folders")
    counts = {c: 0 for c in classes}
    for _, label in train_files:
        counts[classes[label]] += 1
    few = [c for c, n in counts.items() if n < 2]
    if few:
        raise DataError(f"{data}: class {few[0]!r} has {counts[few[0]]} training image(s) after the held-out part; "
                        f"every class needs at least 2 (one to train on, one to validate the search on)"
                        + (f" ({len(few) - 1} more classes too)" if len(few) > 1 else ""))


def _unreadable(data: str, skip_bad: bool) -> tuple[frozenset[Path], list[str]]:
    """Files of the folder whose header cannot be read as an accepted image: an error naming them, or (skip_bad)
    left out."""
    from ..data.folder import scan_image_folder
    from ..data.images import ImageError, open_image

    train_files, val_files, _ = scan_image_folder(data)
    bad = {}
    for path, _ in train_files + (val_files or []):
        try:
            open_image(path).close()
        except ImageError as exc:
            bad[path] = str(exc)
    if bad and not skip_bad:
        named = "; ".join(list(bad.values())[:NAMED_FILES])
        more = f" (and {len(bad) - NAMED_FILES} more)" if len(bad) > NAMED_FILES else ""
        raise DataError(f"{len(bad)} unreadable image(s): {named}{more}; pass --skip-bad-images to leave them out")
    return frozenset(bad), list(bad.values())


def _named_file(exc: DataError, data: str) -> Path | None:
    """The file of the folder a decoding error names at its start, if it names one."""
    name = str(exc).split(": ", 1)[0]
    path = Path(name)
    return path if path.is_file() and Path(data).resolve() in path.resolve().parents else None


def write_manifest(out: Path, split: Split) -> None:
    runs.write_json(out / SPLIT_FILE, split.manifest)


def check_manifest(out: Path, split: Split) -> None:
    """On --resume: the data must split as it did when the run began."""
    import json

    saved = json.loads((out / SPLIT_FILE).read_text())
    if saved != split.manifest:
        raise DataError(f"{out / SPLIT_FILE}: {split.manifest['data']} no longer splits as it did when this run "
                        f"began (files added, removed or renamed); start a new run")
