"""Built-in data sets: where they live, how they are fetched, and how we know they are the real thing.

The authority on a file's identity is the SHA-256 of its decompressed bytes: mirrors (and the project's shared
data) recompress files, so compressed bytes may differ while the content is the same.

Where a set is read from: an explicit root (`--data-dir` or $TRAINFORGE_DATA) is the only place looked at, and
missing files are downloaded into it. Without one, the first complete copy among the user cache
(~/.cache/trainforge), the system's data sets (/usr/share/datasets, where Debian's `dataset-*` packages put them)
and the copy shipped inside this package (MNIST) is read in place; failing all, files are downloaded into the cache.
"""

import dataclasses
import hashlib
import http.client
import os
import pathlib
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from trainforge.data.idx import parse_idx, read_idx_bytes
from trainforge.errors import DataError

__all__ = ["BUILTIN_DATASETS", "BuiltinInfo", "ImageSet", "Located", "data_root", "load_builtin", "locate_builtin"]


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """A labelled image set held in memory."""

    images: torch.Tensor  # uint8 [N, C, H, W], CPU, contiguous
    labels: torch.Tensor  # int64 [N]
    classes: list[str]


@dataclasses.dataclass(frozen=True)
class BuiltinInfo:
    """What identifies a built-in data set and where it can be fetched from."""

    train_images: str
    train_labels: str
    test_images: str
    test_labels: str
    sha256: dict[str, str]  # file name (without .gz) -> SHA-256 of the decompressed bytes
    md5: dict[str, str]  # file name (with .gz) -> MD5 of the compressed file as the canonical mirrors publish it
    mirrors: tuple[str, ...]  # base URLs; a file's URL is base + name + ".gz"
    classes: tuple[str, ...]
    mean: float  # of the training pixels, in [0, 1] units
    std: float
    apt_package: str | None = None  # the Debian/Ubuntu package that installs it under SYSTEM_ROOT

    @property
    def files(self) -> tuple[str, str, str, str]:
        return self.train_images, self.train_labels, self.test_images, self.test_labels


_IDX_FILES = dict(
    train_images="train-images-idx3-ubyte",
    train_labels="train-labels-idx1-ubyte",
    test_images="t10k-images-idx3-ubyte",
    test_labels="t10k-labels-idx1-ubyte",
)

BUILTIN_DATASETS: dict[str, BuiltinInfo] = {
    "mnist": BuiltinInfo(
        **_IDX_FILES,
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        classes=tuple(str(d) for d in range(10)),
        mean=0.1307,
        std=0.3081,
    ),
    "fashion-mnist": BuiltinInfo(
        **_IDX_FILES,
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        # As published with the data set (and used by torchvision).
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        # Mean and (population) std over all 60000*28*28 training pixels divided by 255, computed in float64 with
        # numpy from the real train-images-idx3-ubyte: 0.28604060, 0.35302424.
        mean=0.2860,
        std=0.3530,
        apt_package="dataset-fashion-mnist",
    ),
}

_DOWNLOAD_ATTEMPTS = 3  # per mirror, for transient network errors
_BACKOFF_S = 1.0  # first wait between attempts; doubles each time
_TIMEOUT_S = 30.0
_CHUNK = 1 << 20

# Files whose decompressed SHA-256 already matched, keyed by (path, mtime_ns, size, expected SHA-256): a second
# load skips hashing. Kept in memory, not beside the data, because data roots may be read-only and shared.
_verified: set[tuple[str, int, int, str]] = set()


SYSTEM_ROOT = pathlib.Path("/usr/share/datasets")
# MNIST ships inside the package (CC BY-SA 3.0, see embedded/README.md) so that the first command works offline.
EMBEDDED_ROOT = pathlib.Path(__file__).resolve().parent / "embedded"


def explicit_root(data_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The root the user named: `data_dir`, else $TRAINFORGE_DATA, else None."""
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get("TRAINFORGE_DATA")
    return pathlib.Path(env).expanduser() if env else None


def data_root(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The root that missing files are downloaded into: the explicit root, else ~/.cache/trainforge."""
    return explicit_root(data_dir) or pathlib.Path.home() / ".cache" / "trainforge"


def candidate_roots(data_dir: str | os.PathLike | None = None) -> list[tuple[str, pathlib.Path]]:
    """(kind, root) pairs in the order they are searched; the first is where downloads go."""
    explicit = explicit_root(data_dir)
    if explicit is not None:
        return [("explicit", explicit)]
    return [("cache", data_root()), ("system", SYSTEM_ROOT), ("embedded", EMBEDDED_ROOT)]


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a built-in set's four files were found."""

    kind: str  # explicit, cache, system, embedded or downloaded
    folder: pathlib.Path
    paths: dict[str, pathlib.Path]  # file name (without .gz) -> path

    @property
    def remedy(self) -> str:
        """What to do about a corrupt file here."""
        if self.kind == "embedded":
            return "the installed trainforge package is damaged: reinstall it"
        if self.kind == "system":
            return "the system package's files are damaged: reinstall that package"
        return "delete it to download it again"


def _find(folder: pathlib.Path, name: str) -> pathlib.Path | None:
    """The raw file if present (no decompression needed), else the .gz, else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _md5_file(path: pathlib.Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _BadContent(Exception):
    """A mirror served bytes that are not the expected file: retrying the same mirror will not help."""


def _fetch(url: str, dest: pathlib.Path, md5: str | None, sha256: str) -> None:
    """Downloads `url` to `dest` atomically: the file appears only once its checksums have matched."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = pathlib.Path(tmp_name)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a data cache may be shared
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "trainforge"})
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
        if md5 is not None and (got := _md5_file(tmp)) != md5:
            raise _BadContent(f"MD5 {got}, expected {md5}")
        try:
            content = read_idx_bytes(tmp)
        except DataError as e:
            # The temporary file is gone by the time anyone reads this, so don't name it.
            raise _BadContent(str(e).replace(str(tmp), "download")) from None
        if (got := hashlib.sha256(content).hexdigest()) != sha256:
            raise _BadContent(f"decompressed SHA-256 {got}, expected {sha256}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download(info: BuiltinInfo, name: str, dest: pathlib.Path, unreachable: set[str]) -> str | None:
    """Tries every mirror for `name` (retrying transient errors with exponential backoff); returns None on
    success, else a summary of what went wrong.

    Mirrors in `unreachable` are skipped, and a mirror that fails every attempt with a network error is added to
    it, so that offline the backoff is waited out once per mirror rather than once per file.
    """
    failures = []
    for base in info.mirrors:
        url = f"{base}{name}.gz"
        if base in unreachable:
            failures.append(f"{url}: skipped, unreachable for an earlier file")
            continue
        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            if attempt > 1:
                time.sleep(_BACKOFF_S * 2 ** (attempt - 2))
            try:
                _fetch(url, dest, info.md5.get(f"{name}.gz"), info.sha256[name])
                return None
            except _BadContent as e:
                why = f"wrong content ({e})"
                break
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code} {e.reason}"
                if e.code < 500:  # the server answered definitively; only server errors may be transient
                    break
            except (OSError, http.client.HTTPException, ValueError) as e:
                # URLError and timeouts are OSErrors; ValueError covers malformed URLs.
                why = str(getattr(e, "reason", None) or e)
        else:
            unreachable.add(base)
        failures.append(f"{url}: {why}" + (f" ({attempt} attempts)" if attempt > 1 else ""))
    return "; ".join(failures)


def _missing_error(name: str, info: BuiltinInfo, folder: pathlib.Path, missing: list[str], why: str,
                   searched: list[pathlib.Path]) -> DataError:
    paths = ", ".join(str(folder / f"{m}.gz") for m in missing)
    also = "".join(f"; also looked in {root / name}" for root in searched if root != folder.parent)
    apt = f"; on Debian/Ubuntu, `apt-get install {info.apt_package}` installs it" if info.apt_package else ""
    return DataError(
        f"{name}: missing {paths} ({why}{also}). Put the files there (or uncompressed, without the .gz suffix), or "
        f"choose another data root with TRAINFORGE_DATA or --data-dir (now {folder.parent}){apt}"
    )


def _complete(folder: pathlib.Path, info: BuiltinInfo) -> dict[str, pathlib.Path] | None:
    found = {f: _find(folder, f) for f in info.files}
    return found if all(found.values()) else None  # type: ignore[return-value]


def locate_builtin(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Located:
    """Where the files of built-in set `name` are: the first complete copy among `candidate_roots`, else
    downloaded into the first of them. Raises DataError naming every expected path when they cannot be had."""
    info = BUILTIN_DATASETS.get(name)
    if info is None:
        raise DataError(f"unknown data set {name!r} (known: {', '.join(BUILTIN_DATASETS)})")
    roots = candidate_roots(data_dir)
    for kind, root in roots:
        if (found := _complete(root / name, info)) is not None:
            return Located(kind, root / name, found)
    kind, target = roots[0]
    folder = target / name
    found = {f: _find(folder, f) for f in info.files}
    missing = [f for f, p in found.items() if p is None]
    searched = [root for k, root in roots if k != "embedded" or (root / name).is_dir()]
    if not download:
        raise _missing_error(name, info, folder, missing, "download disabled", searched)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = f"cannot create the folder to download into: {e.strerror}"
        raise _missing_error(name, info, folder, missing, why, searched) from None
    failures = []
    unreachable: set[str] = set()
    for f in missing:
        dest = folder / f"{f}.gz"
        why = _download(info, f, dest, unreachable)
        if why is None:
            found[f] = dest
        else:
            failures.append(why)
    still_missing = [f for f, p in found.items() if p is None]
    if still_missing:
        raise _missing_error(name, info, folder, still_missing, f"download failed: {'; '.join(failures)}", searched)
    return Located(kind if kind == "explicit" else "downloaded", folder, found)  # type: ignore[arg-type]


def _load_array(path: pathlib.Path, sha256: str, verify: bool, remedy: str) -> np.ndarray:
    content = read_idx_bytes(path)
    if verify:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, sha256)
        if key not in _verified:
            got = hashlib.sha256(content).hexdigest()
            if got != sha256:
                raise DataError(
                    f"{path}: checksum mismatch (SHA-256 of the decompressed bytes is {got}, expected {sha256}); "
                    f"the file is corrupt or a different data set: {remedy}"
                )
            _verified.add(key)
    return parse_idx(content, str(path))


def _image_set(images_path: pathlib.Path, labels_path: pathlib.Path, info: BuiltinInfo, verify: bool,
               remedy: str) -> ImageSet:
    images = _load_array(images_path, info.sha256[images_path.name.removesuffix(".gz")], verify, remedy)
    labels = _load_array(labels_path, info.sha256[labels_path.name.removesuffix(".gz")], verify, remedy)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images of shape [N, H, W], got {images.dtype} {list(images.shape)}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{labels_path}: expected uint8 labels of shape [N], got {labels.dtype} {list(labels.shape)}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels "
            "(expected the same count)"
        )
    if len(labels) and (top := int(labels.max())) >= len(info.classes):
        raise DataError(f"{labels_path}: label {top} out of range (expected 0 to {len(info.classes) - 1})")
    return ImageSet(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(info.classes),
    )


def load_builtin(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
                 verify: bool = True) -> tuple[ImageSet, ImageSet]:
    """Loads a built-in data set as (train, test) from where `locate_builtin` finds it.

    Each file may be gzip-compressed (<file>.gz) or raw (<file>). Missing files are downloaded when `download`
    is true. With `verify`, every file's decompressed SHA-256 must match the known one (checked once per file
    version per process). Raises DataError for an unknown name, missing files (naming the exact paths expected),
    corrupt or mismatched files.
    """
    located = locate_builtin(name, data_dir, download=download)
    info, paths = BUILTIN_DATASETS[name], located.paths
    train = _image_set(paths[info.train_images], paths[info.train_labels], info, verify, located.remedy)
    test = _image_set(paths[info.test_images], paths[info.test_labels], info, verify, located.remedy)
    return train, test
