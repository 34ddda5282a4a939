"""Dataclass configs that round-trip through YAML/JSON, and the CLI flags generated from them.

Every field carries its help text in `metadata["help"]`; `add_arguments` turns the fields into `--flags`, so a flag
and its Python parameter cannot drift apart, and a saved `config.yaml` re-runs the same job.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError, deprecated

T = TypeVar("T")

# Error messages quote the offending value through this: a hostile YAML file (nested aliases, the "billion laughs")
# describes a structure whose full repr would take exponential time and memory.
_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxdict, _short.maxstring, _short.maxother = 2, 6, 6, 80, 80


def option(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, positive: bool = False, auto: bool = False,
           parse: typing.Callable[[str], Any] | None = None, flag: bool = True) -> Any:
    """A config field with help text and the bounds its values must respect; `auto`: the string "auto" is also a
    value, which the run replaces by what it chooses; `parse`: a string value must pass it (it raises ValueError
    saying what it expected); `flag=False`: a record the run writes, with no command-line flag."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "positive": positive, "auto": auto,
            "parse": parse, "flag": flag}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


DURATION_FORMS = "a positive number of seconds, minutes or hours: 90s, 5m or 1.5h"
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smh])")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds of a duration written as 90s, 5m or 1.5h (the one spelling of every time budget); ValueError naming
    the value and the accepted forms otherwise."""
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    seconds = float(match[1]) * _UNIT_SECONDS[match[2]] if match else 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"expects {DURATION_FORMS}; got {_short.repr(text)}")
    return seconds


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run. Fields left at None are filled from the recipe."""

    # Old field name -> new one: old config files and flags still load, with a deprecation line.
    RENAMED: typing.ClassVar[dict[str, str]] = {"strategy": "parallel"}

    recipe: str | None = option(None, "named bundle of model, optimizer, schedule, batch size and epochs "
                                      "(default: the data set's recipe for the model, else the model's own, else "
                                      "'reference')")
    data: str = option("mnist", "built-in data set (mnist, fashion-mnist) or a folder of images, one sub-folder per class")
    data_dir: str | None = option(None, "root of the built-in data sets (default: $TRAINFORGE_DATA, else the first "
                                           "complete copy in ~/.cache/trainforge, /usr/share/datasets or the "
                                           "package's own MNIST)")
    subset: int | None = option(None, "train on a seeded, class-balanced subset of N training images", positive=True)
    val_fraction: float = option(0.1, "held-out fraction of an image folder without train/ and val/ sub-folders, "
                                      "and of the training images with --holdout", low=0.0, high=0.9)
    holdout: bool = option(False, "train on all but a seeded, stratified --val-fraction of the training images and "
                                  "evaluate on that held-out part instead of the test set (as `tune` does)")
    image_size: int | None = option(None, "resize folder images to this side length (default: their own size)",
                                    positive=True)
    model: str | None = option(None, "registered model name (see `trainforge models`; default: the data set's "
                                     "default model, or one chosen from an image folder's images)")
    width: int | None = option(None, "width multiplier input of models that take one (channels or hidden units)",
                               positive=True)
    epochs: float | None = option(None, "training epochs; fractions train part of the last epoch", positive=True)
    time: str | None = option(None, "time budget of the whole run, e.g. 90s, 5m or 1.5h: data loading, the memory "
                                    "plan, training, evaluations and the final files end within it, and the "
                                    "number of steps is set from the measured step time so that the schedule "
                                    "ends at the budget (instead of --epochs)", parse=parse_duration)
    time_plan: dict[str, Any] | None = option(None, "what a --time run measured and resolved: the budget, the step time, "
                                          "the steps and epochs", flag=False)
    # batch_size and lr also take "auto"; the run records the number it chose in its config.yaml.
    batch_size: int | None = option(None, "global batch size (split across processes), or auto: on a GPU the largest "
                                          "power of two that fits, on the CPU the size past which samples/s stops "
                                          "growing; the learning rate then follows by --lr-scaling",
                                    positive=True, auto=True)
    accumulate: int | None = option(None, "micro-batches per optimizer step (gradient accumulation; the global batch "
                                          "stays --batch-size); the memory plan raises it when a batch does not fit, "
                                          "and so does an out-of-memory error during training (default: 1 if the "
                                          "batch fits)", positive=True)
    optimizer: str | None = option(None, "optimizer", choices=("sgd", "adam", "adamw"))
    lr: float | None = option(None, "peak learning rate, or auto: the learning-rate range test's suggestion "
                                    "(see `trainforge lr-find`)", positive=True, auto=True)
    lr_scaling: str | None = option(None, "how the learning rate follows --batch-size auto from the recipe's batch "
                                          "size (default: linear for sgd, sqrt for adam/adamw)",
                                    choices=("linear", "sqrt"))
    momentum: float | None = option(None, "SGD momentum (Nesterov when > 0)", low=0.0, high=0.999)
    betas: list[float] | None = option(None, "Adam/AdamW betas, two numbers", low=0.0, high=0.9999)
    weight_decay: float | None = option(None, "weight decay", low=0.0)
    schedule: str | None = option(None, "learning-rate schedule", choices=("constant", "cosine", "onecycle"))
    warmup: float | None = option(None, "fraction of training spent warming the learning rate up", low=0.0, high=1.0)
    label_smoothing: float | None = option(None, "label smoothing of the cross-entropy loss", low=0.0, high=0.5)
    augment: str | None = option(None, "augmentation on the device: random left-right flips (for classes that look "
                                       "the same mirrored, as clothing does; not digits or text) and/or shifts by up "
                                       "to 2 pixels", choices=("none", "translate", "flip", "flip-translate"))
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    precision: str | None = option(None, "auto (bf16 on GPUs that support it, and on CPUs with native bf16 for models "
                                         "it measured faster on; else fp32), 32, bf16 or fp16 (default: the "
                                         "recipe's; a run records the precision chosen)",
                                   choices=("auto", "32", "bf16", "fp16"))
    eval_precision: str | None = option(None, "precision of evaluation: auto (bf16 on CPUs with native bf16, where "
                                              "inference measured faster for every model, and on GPUs that support "
                                              "it; else fp32), 32, bf16 or fp16 (default: the training precision; "
                                              "auto for finetune, except a linear probe on cached features); a run "
                                              "records the one chosen", choices=("auto", "32", "bf16", "fp16"))
    layout: str = option("auto", "memory layout of the model: auto (channels-last for convolutional models on CPUs "
                                 "and CUDA GPUs, where it measured faster), channels-last or contiguous; a run "
                                 "records the layout chosen", choices=("auto", "channels-last", "contiguous"))
    compile: bool = option(False, "compile the model with torch.compile")
    parallel: str = option("ddp", "how several processes share the model: ddp (a full replica in each) or fsdp "
                                  "(parameters, gradients and optimizer state sharded across them, for models "
                                  "that do not fit one device)", choices=("ddp", "fsdp"))
    seed: int = option(0, "random seed of initialisation, shuffling and augmentation", low=0, high=2 ** 32 - 1)
    target_acc: float | None = option(None, "stop once test accuracy reaches this fraction", low=0.0, high=1.0)
    eval_batch_size: int | None = option(None, "largest batch of evaluation; the memory plan lowers it to fit "
                                               "(default: 2000)", positive=True)
    eval_subset: int | None = option(None, "evaluate each epoch on a seeded, class-balanced subset of N test images; "
                                           "the last epoch (or the one a run stops at) is scored on all of them",
                                     positive=True)
    memory_budget: str | None = option(None, "memory the run may use, e.g. 4G or 512M (K/M/G/T): resident memory on "
                                             "the CPU, allocated memory on a GPU; batches shrink and accumulate to "
                                             "stay inside it (default: half of what is available at start)")
    loader: str = option("auto", "auto (device-resident when the data fits the memory budget, else streamed), "
                                 "device or streaming", choices=("auto", "device", "streaming"))
    workers: int = option(2, "worker processes of the streaming loader", low=0)
    checkpoint_every: int | None = option(None, "also checkpoint every N optimizer steps", positive=True)
    checkpoint_minutes: float | None = option(10.0, "also checkpoint every M minutes, so a crash loses at most that "
                                                    "(0 turns it off)", low=0.0)
    skip_nonfinite: bool = option(False, "skip steps whose loss or gradients are NaN/Inf instead of stopping")
    out: str | None = option(None, "run directory (default: runs/<timestamp>); one that holds a run is refused "
                                   "unless --overwrite")
    overwrite: bool = option(False, "replace the run already in --out (default: refuse, and suggest --resume)")
    tensorboard: bool = option(True, "write TensorBoard event files into the run directory")


def _base_type(tp: Any) -> Any:
    """The type inside Optional[...]."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    # Cached: resolving the string annotations costs milliseconds, and every value checked needs them.
    return typing.get_type_hints(cls)


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """Checks one value against its field's type and bounds; returns it in canonical form."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp = _field_types(cls)[name]
    optional = type(None) in get_args(tp)
    base = _base_type(tp)
    meta = field.metadata
    where = f"{source}: field '{name}'"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be empty")
    if meta.get("auto") and value == "auto":
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} expects true or false, got {_short.repr(value)}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} expects an integer, got {_short.repr(value)}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} expects a number, got {_short.repr(value)}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} expects a string, got {_short.repr(value)}")
        if meta.get("parse"):
            try:
                meta["parse"](value)
            except ValueError as exc:
                raise ConfigError(f"{where} {exc}") from None
    elif get_origin(base) is list:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} expects a list of numbers, got {_short.repr(value)}")
        value = [float(v) for v in value]
    elif get_origin(base) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} expects a mapping, got {_short.repr(value)}")
    _check_bounds(where, value, meta)
    return value


def _check_bounds(where: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, meta['choices']))}; got {_short.repr(value)}")
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, (int, float)):
            continue
        if v != v or v in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} must be a finite number, got {_short.repr(v)}")
        if meta.get("positive") and v <= 0:
            raise ConfigError(f"{where} must be > 0, got {_short.repr(v)}")
        if meta.get("low") is not None and v < meta["low"]:
            raise ConfigError(f"{where} must be >= {meta['low']}, got {_short.repr(v)}")
        if meta.get("high") is not None and v > meta["high"]:
            raise ConfigError(f"{where} must be <= {meta['high']}, got {_short.repr(v)}")


def from_dict(cls: type[T], values: typing.Mapping[str, Any], source: str = "config") -> T:
    """Builds a config from a mapping, rejecting unknown keys and values of the wrong type or range."""
    if not isinstance(values, typing.Mapping):
        raise ConfigError(f"{source}: expected a mapping of field names to values, got {type(values).__name__}")
    values = _renamed(cls, values, source)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k)[:80] for k in values if k not in known)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        raise ConfigError(f"{source}: unknown field(s) {shown}; known fields: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(cls, k, v, source) for k, v in values.items()})


def _renamed(cls: type, values: typing.Mapping[str, Any], source: str) -> typing.Mapping[str, Any]:
    """`values` with the fields `cls.RENAMED` names under their new names."""
    renamed = getattr(cls, "RENAMED", {})
    if not any(old in values for old in renamed):
        return values
    out = dict(values)
    for old, new in renamed.items():
        if old in out:
            deprecated(f"{source}: field '{old}' is now '{new}'")
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def validate(config: Any, source: str = "config") -> None:
    """Raises ConfigError if any field of a config object is of the wrong type or out of range."""
    for f in dataclasses.fields(config):
        setattr(config, f.name, _coerce(type(config), f.name, getattr(config, f.name), source))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_file(cls: type[T], path: str | Path) -> T:
    """Reads a YAML or JSON config file (JSON is YAML) into `cls`; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nesting too deep to be a config file") from None
    if values is None:
        values = {}
    return from_dict(cls, values, source=str(path))


def dumps(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config))


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Adds one `--flag` per dataclass field, typed and documented from the field itself.

    Every flag defaults to argparse.SUPPRESS so that only what the user typed overrides the config file and recipe.
    """
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        base = _base_type(hints[f.name])
        meta = f.metadata
        help_text = meta.get("help", "")
        if f.default is not dataclasses.MISSING and f.default is not None:
            help_text += f" (default: {f.default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is list:
            kwargs.update(nargs="+", type=_number_arg(f.name, float), metavar="X")
        else:
            kwargs["type"] = _number_arg(f.name, base, meta.get("auto", False)) if base in (int, float) else str
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = {int: "N", float: "X"}.get(base, "VALUE") if not meta.get("choices") else None
        parser.add_argument(flag, **kwargs)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if new not in skip:
            parser.add_argument("--" + old.replace("_", "-"), dest=new, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS, action=_RenamedFlag, new_flag="--" + new.replace("_", "-"),
                                choices=next(f for f in dataclasses.fields(cls) if f.name == new).metadata["choices"])


class _RenamedFlag(argparse.Action):
    """An old flag that still works, with one deprecation line."""

    def __init__(self, *args: Any, new_flag: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        deprecated(f"{option_string} is now {self.new_flag}")
        setattr(namespace, self.dest, values)


def typed_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` the user typed on the command line (flags from `add_arguments` default to SUPPRESS)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _number_arg(name: str, kind: type, auto: bool = False) -> typing.Callable[[str], Any]:
    def parse(text: str) -> Any:
        if auto and text == "auto":
            return text
        try:
            return kind(text)
        except ValueError:
            expected = ("an integer" if kind is int else "a number") + (" or auto" if auto else "")
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def merge(cls: type[T], *layers: typing.Mapping[str, Any], source: str = "config") -> T:
    """Applies layers of values in order (later wins) over the class defaults and validates the result."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer)
    return from_dict(cls, values, source=source)


__all__ = ["TrainConfig", "from_dict", "load_file", "dumps", "to_dict", "to_json", "add_arguments", "merge",
           "typed_options", "validate", "option", "parse_duration"]
