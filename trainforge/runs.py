"""The run directory: weights, config, resumable state, metrics and summary; `load()` to get a model back.

    <run>/config.yaml        the resolved TrainConfig: `trainforge train --config <run>/config.yaml` re-runs it
    <run>/model.safetensors  weights of the model with its preprocessing (raw uint8 images in, logits out)
    <run>/model.json         what rebuilds the model: architecture, classes, input contract, temperature
    <run>/state.pt           model, optimizer, scheduler, RNG and loop position, to resume (weights_only loading)
    <run>/metrics.jsonl      one JSON line per epoch
    <run>/summary.json       the final result

Every file is written atomically (temporary file, fsync, rename), so a crash leaves the previous version whole.

Fault injection for the crash tests: with TRAINFORGE_TEST_WRITE_DELAY=<seconds> in the environment, every atomic
write sleeps that long between writing its temporary file and renaming it, so a test can kill the process while a
checkpoint is half-written. Unset (the default) it costs one dictionary look-up per file written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, NoReturn

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, TrainforgeError

MODEL_FILE = "model.safetensors"
MODEL_INFO = "model.json"
CONFIG_FILE = "config.yaml"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
WRITE_DELAY_ENV = "TRAINFORGE_TEST_WRITE_DELAY"


@dataclasses.dataclass
class ModelInfo:
    """What rebuilds a run's model: the registered architecture and its input contract."""

    model: str
    num_classes: int
    classes: list[str]
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    width: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    temperature: float = 1.0  # the model divides its logits by it (`apply_temperature`); 1.0 in runs made before

    @classmethod
    def from_values(cls, values: Any, source: str | os.PathLike) -> "ModelInfo":
        """A ModelInfo from untrusted decoded JSON, every field checked against bounds that keep `load()` cheap
        (a hostile file could otherwise ask for a 10^6-pixel side or 10^9 classes); CheckpointError names the
        field."""
        def fail(why: str) -> NoReturn:
            raise CheckpointError(f"{source}: malformed model description ({why})")

        if not isinstance(values, dict):
            fail(f"expected a JSON object, found {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - names):
            fail(f"unknown field(s) {', '.join(map(repr, unknown[:5]))}")
        if missing := sorted(f.name for f in dataclasses.fields(cls) if f.name not in values
                             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
            fail(f"missing field(s) {', '.join(map(repr, missing))}")
        for field, (low, high) in _INFO_INT_BOUNDS.items():
            value = values.get(field)
            if field == "width" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                fail(f"field {field!r} is {str(value)[:40]}, expected an integer from {low} to {high}")
        if values["in_channels"] not in (1, 3):
            fail(f"field 'in_channels' is {values['in_channels']}, expected 1 or 3")
        if not isinstance(values["model"], str) or not 0 < len(values["model"]) <= 200:
            fail("field 'model' must be a registered model's name")
        classes = values["classes"]
        if (not isinstance(classes, list) or len(classes) != values["num_classes"]
                or not all(isinstance(c, str) and len(c) <= 1000 for c in classes)):
            fail(f"field 'classes' must list num_classes ({values['num_classes']}) names")
        for field in ("mean", "std"):
            stats = values[field]
            if (not isinstance(stats, list) or not 1 <= len(stats) <= 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in stats)):
                fail(f"field {field!r} must list 1 to 3 finite numbers")
        if not all(v > 0 for v in values["std"]):
            fail("field 'std' must be positive")
        if not isinstance(values.get("extra", {}), dict):
            fail("field 'extra' must be a JSON object")
        if not _valid_temperature(values.get("temperature", 1.0)):
            fail(f"field 'temperature' is {str(values['temperature'])[:40]}, expected a finite number > 0")
        return cls(**values)


def _valid_temperature(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# Bounds on the sizes a model description may ask for: far beyond any real run, small enough to build in memory.
_INFO_INT_BOUNDS = {"num_classes": (1, 100_000), "image_size": (1, 4096), "in_channels": (1, 3),
                    "width": (1, 65_536)}


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Opens a temporary file beside `path`; on success it is fsynced and renamed over `path`.

    On any failure the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run directory is as readable as any file written
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            _test_write_delay()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CheckpointError(f"{path}: cannot write ({exc.strerror or exc}); the previous version is unchanged") \
            from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    """The process's umask, read without changing it (threads may be creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _test_write_delay() -> None:
    delay = os.environ.get(WRITE_DELAY_ENV)
    if delay:
        try:
            seconds = float(delay)
        except ValueError:
            raise CheckpointError(f"${WRITE_DELAY_ENV}: expected a number of seconds, got {delay!r}") from None
        time.sleep(seconds)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files that writes killed mid-way (SIGKILL, power loss) left in `directory`.

    Only call this where no other process is writing into `directory`. Returns the files removed.
    """
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        if tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


LOCK_FILE = ".lock"
# Files whose presence means a directory holds a run (finished or interrupted) that a new run would destroy.
RUN_MARKERS = (CONFIG_FILE, MODEL_FILE)
# What a run writes, removed by --overwrite before a new run starts there.
RUN_OUTPUTS = (CONFIG_FILE, MODEL_FILE, MODEL_INFO, STATE_FILE, METRICS_FILE, SUMMARY_FILE)


@dataclasses.dataclass
class RunLock:
    """An exclusive claim on a run directory; the kernel drops it when its process dies."""

    path: Path
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def acquire_lock(run_dir: Path) -> RunLock:
    """Claims `run_dir` for this process: a second process gets a ConfigError naming the holder (host and pid).

    The claim is an flock on `<run_dir>/.lock`, which records the holder: a lock left by a dead process on this host
    is taken over; one from another host cannot be checked from here and is reported with how to remove it.
    """
    import fcntl
    import socket

    path, host = run_dir / LOCK_FILE, socket.gethostname()
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise ConfigError(f"{run_dir} is in use by another training (pid {holder.get('pid', '?')} on host "
                              f"{holder.get('host', host)}); wait for it to finish, or choose another --out") from None
        if os.fstat(fd).st_ino == _inode(path):
            break
        os.close(fd)  # the holder released (and unlinked) the file between our open and flock: claim the new one
    holder = _lock_holder(fd)
    if holder.get("host", host) != host:
        os.close(fd)
        raise ConfigError(f"{run_dir} is locked by pid {holder.get('pid')} on host {holder['host']} (another machine, "
                          f"so this one cannot tell whether it still runs); if it does not, delete {path}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": host, "pid": os.getpid()}).encode(), 0)
    return RunLock(path, fd)


def _lock_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, OSError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def default_run_dir() -> Path:
    """runs/<timestamp>, with a suffix if that exists already."""
    import datetime

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / stamp
    suffix = 1
    while path.exists():
        path = Path("runs") / f"{stamp}-{suffix}"
        suffix += 1
    return path


def prepare_run_dir(run_dir: Path, *, overwrite: bool = False, resuming: bool = False) -> RunLock:
    """Creates (or reuses) `run_dir` and claims it; a directory that already holds a run is refused unless
    `overwrite` (which removes that run's files first) or `resuming` it. Clears temporaries a killed run left."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: is a file, expected a run directory (or a path to create one at)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {run_dir}: cannot create the run directory ({exc.strerror or exc})") from None
    lock = acquire_lock(run_dir)
    if not resuming and (found := [m for m in RUN_MARKERS if (run_dir / m).exists()]):
        if not overwrite:
            lock.release()
            raise ConfigError(f"--out {run_dir} already holds a run ({', '.join(found)}); continue it with --resume "
                              f"{run_dir}, choose another --out, or pass --overwrite to replace it")
        _remove_outputs(run_dir)
    remove_stale_temporaries(run_dir)
    return lock


def _remove_outputs(run_dir: Path) -> None:
    import shutil

    for name in RUN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> None:
    """Writes tensors as safetensors (a format that cannot carry code), atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_open(path) as handle:
        handle.write(save(tensors))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads weights from .safetensors, or from a torch file without executing any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # any failure to parse an untrusted file means the same: not valid
            raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    state = safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load` with `weights_only=True`: a file that would run code is refused, a broken one named."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # torch warns about unusual pickle protocols before refusing them; the refusal below says it all.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _refusal_reason(exc)[:200] or type(exc).__name__
        raise CheckpointError(f"{path}: refused to load: only tensors and plain containers are loaded, since other "
                              f"objects could execute code ({reason})") from None
    except Exception as exc:
        # torch.load's zip, pickle and safetensors parsers fail on damaged input with whatever exception their
        # code path hits (struct.error, KeyError, SafetensorError, ...): for an untrusted file every one means
        # "unreadable".
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None


def _refusal_reason(exc: pickle.UnpicklingError) -> str:
    """The reason in torch's refusal, without its boilerplate: the text after "WeightsUnpickler error: " (a global
    from a module torch does not know), else the paragraphs between its opening one about its defaults and its
    closing one pointing at its documentation (a global from a module it blocks); one line either way."""
    text = str(exc).split("Check the documentation")[0]
    if "WeightsUnpickler error: " in text:
        return " ".join(text.split("WeightsUnpickler error: ", 1)[1].split())
    return " ".join(" ".join(p for p in text.split("\n\n")[1:]).split())


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_open(path) as handle:
        handle.write(buffer.getvalue())


def write_metrics(run_dir: Path, metrics: list[dict[str, Any]]) -> None:
    """Rewrites metrics.jsonl whole, so a resumed run never keeps lines past its checkpoint."""
    write_text(run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: line {number} is not JSON") from None
    return lines


def read_model_info(run_dir: str | os.PathLike) -> ModelInfo:
    run_dir = Path(run_dir)
    path = run_dir / MODEL_INFO
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (no such directory)")
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a finished run directory (no {MODEL_INFO}; "
                              f"an interrupted run can be continued with --resume)")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: malformed model description ({exc})") from None
    return ModelInfo.from_values(values, path)


def build_model(info: ModelInfo) -> nn.Module:
    """The architecture described by `info`, with its preprocessing, untrained."""
    from .models import build_classifier

    model = build_classifier(info.model, info.num_classes, info.in_channels, info.image_size, tuple(info.mean),
                             tuple(info.std), width=info.width)
    model.temperature = float(info.temperature)
    return model


def apply_temperature(run_dir: str | os.PathLike, temperature: float) -> ModelInfo:
    """Records `temperature` in a finished run's model.json (atomically), so that its model, as `load()`, export and
    serving rebuild it, divides its logits by it: calibrated probabilities, the same top-1 answers. 1.0 undoes it."""
    if not _valid_temperature(temperature):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    info = dataclasses.replace(read_model_info(run_dir), temperature=float(temperature))
    write_json(Path(run_dir) / MODEL_INFO, dataclasses.asdict(info))
    return info


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Loads weights, failing with the list of missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches (file vs model)", shapes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:10])}" + (f" (+{len(keys) - 10} more)" if len(keys) > 10
                                                                     else ""))
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(parts))
    model.load_state_dict(state)


def load(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a run, in eval mode: raw uint8 images [N, C, H, W] in, logits out.

    The model carries `classes` (label names) and `info` (its ModelInfo) as attributes.
    """
    run_dir = Path(run_dir)
    info = read_model_info(run_dir)
    try:
        model = build_model(info)
    except TrainforgeError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{run_dir / MODEL_INFO}: cannot rebuild model {info.model!r} ({exc})") from None
    load_state_dict_strict(model, load_weights(run_dir / MODEL_FILE), run_dir / MODEL_FILE)
    model.classes = list(info.classes)
    model.info = info
    return model.to(device).eval()


@dataclasses.dataclass
class RunData:
    """A run's data as the run defined it, read back from its config.yaml."""

    config: Any  # the run's TrainConfig
    dataset: Any  # DataBundle: the whole data set (every training image, the test split)
    train: Any  # ImageSet: what the run trained on (its --subset, without its --holdout part)
    val: Any  # ImageSet of the --holdout part, or None for a run evaluated on the test split
    test: Any  # ImageSet: the data set's test split

    @property
    def evaluation(self) -> Any:
        """The split the run reported its accuracy on: the held-out part with --holdout, else the test split."""
        return self.val if self.val is not None else self.test


def load_run_data(run_dir: str | os.PathLike, data_dir: str | None = None, *, progress: bool = False) -> RunData:
    """The data of a run: its data set (from `data_dir`, else the run's own root) split as the run split it; a
    folder decoded with a progress bar when `progress` (a cache hit shows none)."""
    from . import config as cfg
    from .data import ImageSet, balanced_subset, load_data
    from .data.loaders import holdout_split
    from .data.sources import BUILTIN_DATASETS

    config = cfg.load_file(cfg.TrainConfig, Path(run_dir) / CONFIG_FILE)
    root = data_dir or config.data_dir
    common = dict(seed=config.seed, image_size=config.image_size, val_fraction=config.val_fraction, progress=progress)
    dataset = load_data(config.data, root, **common)
    trained = dataset
    if config.data in BUILTIN_DATASETS and config.subset is not None:
        idx = balanced_subset(dataset.train.labels, config.subset, config.seed)  # as load_data subsets
        trained = dataclasses.replace(dataset, train=ImageSet(dataset.train.images[idx], dataset.train.labels[idx],
                                                              dataset.classes))
    elif config.data not in BUILTIN_DATASETS and (config.subset is not None or config.loader == "streaming"):
        # A folder's subset is chosen among its files before decoding, as training chose it.
        trained = load_data(config.data, root, subset=config.subset, loader=config.loader, **common)
    val = None
    if config.holdout:
        split = holdout_split(trained, config.val_fraction, config.seed)
        trained, val = split, split.test
    return RunData(config, dataset, trained.train, val, dataset.test)
