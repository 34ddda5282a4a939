"""Named recipes: model, optimizer, schedule, batch size and epochs that are known to work together.

Each recipe states its result in a line and names the `benchmarks/RESULTS.md` section that holds the record.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..errors import ConfigError
from ..models import model_entry

# The MNIST recipes pin fp32: their records were measured in it, and bf16 (faster per step on CPUs with native bf16)
# would move them (RESULTS.md, "Fine-tuning speed"); `--precision auto` still opts them in.
RECIPES: dict[str, dict] = {
    # The reference workload (linear, 10 epochs) done well: 92.56% on MNIST (RESULTS.md, "Recipes").
    "reference": dict(model="linear", epochs=10, batch_size=2048, optimizer="sgd", lr=0.4, momentum=0.9,
                      weight_decay=0.0, schedule="onecycle", warmup=0.1, label_smoothing=0.0, augment="none",
                      precision="32"),
    "mlp": dict(model="mlp", epochs=10, batch_size=128, optimizer="adamw", lr=2e-3, betas=[0.9, 0.999],
                weight_decay=1e-4, schedule="onecycle", warmup=0.2, label_smoothing=0.0, augment="none",
                precision="32"),
    # The general-purpose cnn: 99.23% on MNIST in 1.5 epochs (RESULTS.md, "Recipes").
    "cnn": dict(model="cnn", epochs=1.5, batch_size=128, optimizer="adamw", lr=4e-3, betas=[0.9, 0.99],
                weight_decay=5e-4, schedule="onecycle", warmup=0.2, label_smoothing=0.1, augment="none",
                precision="32"),
    # The fastest way to >= 99.0% on MNIST: 99.19% ± 0.05 over 5 seeds, 4.6x less time than the published peer
    # recipe on the CPU (RESULTS.md, "Recipes" and "Time to accuracy").
    "speedrun": dict(model="speedrun_cnn", epochs=0.8, batch_size=256, optimizer="adam", lr=1e-2, betas=[0.7, 0.9],
                     weight_decay=0.0, schedule="onecycle", warmup=0.3, label_smoothing=0.1, augment="none",
                     precision="32"),
    # Fashion-MNIST's default (`trainforge train --data fashion-mnist`): 93.8% over 3 seeds in under 3 minutes of
    # training on 2 CPU cores (RESULTS.md, "Defaults beyond MNIST").
    "fashion": dict(model="fashion_cnn", epochs=8, batch_size=256, optimizer="adamw", lr=4e-3, betas=[0.9, 0.99],
                    weight_decay=5e-4, schedule="onecycle", warmup=0.2, label_smoothing=0.1, augment="flip",
                    precision="32"),
    # For models registered without a recipe of their own (user models): AdamW with one-cycle is a forgiving start
    # for small image classifiers. It names no model, so it needs --model.
    "default": dict(epochs=5, batch_size=128, optimizer="adamw", lr=1e-3, betas=[0.9, 0.999], weight_decay=1e-4,
                    schedule="onecycle", warmup=0.1, label_smoothing=0.0, augment="none"),
    "resnet": dict(model="resnet18", epochs=5, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
                   weight_decay=5e-4, schedule="onecycle", warmup=0.2, label_smoothing=0.1, augment="translate"),
    "vgg": dict(model="vgg16_bn", epochs=5, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9,
                weight_decay=5e-4, schedule="onecycle", warmup=0.2, label_smoothing=0.1, augment="translate"),
}

# Every recipe above with a record was tuned on 60,000 training images (MNIST's or Fashion-MNIST's), and the others
# count their epochs on a set that size too. On another number of images a recipe keeps its optimizer steps, not its
# epochs (scale_to_data): on 1,000 Fashion-MNIST images the 8 epochs of `fashion` are 32 steps (76.7%); its 1,880
# steps, capped at MAX_SCALED_EPOCHS (200 steps), reached 84.8% over 3 seeds (RESULTS.md, "Time budgets and recipes
# scaled to the data").
RECIPE_IMAGES = 60_000
# A set larger than the recipe's still gets this many passes (or the recipe's own epochs, if fewer).
MIN_SCALED_EPOCHS = 3
# At most this many epochs on a small set (or the recipe's own, if more): past it more passes over the same few
# images buy little and every epoch's evaluation costs as much as on a large set.
MAX_SCALED_EPOCHS = 50
# Test images evaluated after each epoch but the last when a recipe takes more epochs on a small set (unless
# --eval-subset says): on 1,000 Fashion-MNIST images an epoch is 4 steps, and evaluating all 10,000 test images
# after each took over 90% of the run.
SCALED_EVAL_SUBSET = 1000

# What a recipe may leave out, filled so that every resolved config is complete.
FALLBACKS = dict(momentum=0.9, betas=[0.9, 0.999], weight_decay=0.0, schedule="constant", warmup=0.0,
                 label_smoothing=0.0, augment="none", optimizer="sgd", lr=0.01, epochs=1, batch_size=128,
                 precision="auto")


# Per built-in data set: the model trained when none is named (the first), and the recipe each listed model gets on
# that set instead of its own.
DATASET_RECIPES: dict[str, dict[str, str]] = {
    "mnist": {"linear": "reference"},
    "fashion-mnist": {"fashion_cnn": "fashion"},
}


# What the benchmark scripts measured of recipes (benchmarks/time_to_accuracy.py, benchmarks/reference.py), written by
# them and read by `trainforge models`: data set -> recipe -> result.
MEASURED_FILE = Path(__file__).with_name("measured.json")


def measured() -> dict[str, dict[str, dict[str, Any]]]:
    """data set -> recipe -> the result a benchmark script recorded for it (empty where nothing was measured)."""
    try:
        return json.loads(MEASURED_FILE.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{MEASURED_FILE}: unreadable measurements ({exc}); re-run the benchmark that writes it")


def record_measurement(data: str, recipe: str, result: dict[str, Any]) -> None:
    """Stores `result` as the measurement of `recipe` on `data`, replacing an earlier one (for the benchmarks)."""
    from .. import runs

    table = measured()
    table.setdefault(data, {})[recipe] = result
    runs.write_json(MEASURED_FILE, table)


def choose(config: cfg.TrainConfig) -> tuple[str, str | None]:
    """(recipe, model) for `config`.

    The recipe: an explicit one wins; else the data set's recipe for the chosen model; else the model's own recipe;
    else 'reference'. The model: the one named, else the data set's default, else the one chosen from an image
    folder (`defaults.default_choice`); None when only the recipe names it.
    """
    from .defaults import default_choice

    if config.recipe is not None:
        return config.recipe, config.model
    model = config.model
    table = DATASET_RECIPES.get(config.data, {})
    if model is None and table:
        model = next(iter(table))
    elif model is None:
        choice = default_choice(config)
        if choice is not None and choice.pretrained:
            raise ConfigError(f"{config.data}: {choice.describe()}; `trainforge train` fine-tunes it, as does "
                              f"trainforge.finetune.command.finetune({{'source': {choice.model!r}}}, {{'data': ...}}) "
                              f"from Python; or pass a model to train from scratch")
        if choice is not None:
            model = choice.model
    if model is None:
        return "reference", None
    return table.get(model) or model_entry(model).default_recipe, model


def resolve(config: cfg.TrainConfig) -> cfg.TrainConfig:
    """A complete config: fields the user left at None come from the recipe, then from the fallbacks.

    Model and recipe are chosen as `choose` says; a recipe for another model only lends its hyperparameters.
    """
    values = dataclasses.asdict(config)
    name, model = choose(config)
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    values["model"] = values["model"] or model
    merged = {**FALLBACKS, **RECIPES[name]}
    for key, value in merged.items():
        if values.get(key) is None:
            values[key] = value
    values["recipe"] = name
    if values["model"] is None:
        raise ConfigError(f"recipe {name!r} names no model: pass one with --model (see `trainforge models`)")
    model_entry(values["model"])
    resolved = cfg.from_dict(cfg.TrainConfig, values, source="config")
    if resolved.betas is not None and len(resolved.betas) != 2:
        raise ConfigError(f"config: field 'betas' expects two numbers, got {resolved.betas}")
    return resolved


def recipe_steps(epochs: float, batch_size: int) -> float:
    """The optimizer steps of `epochs` epochs at `batch_size` on the RECIPE_IMAGES images recipes are tuned on."""
    return epochs * math.ceil(RECIPE_IMAGES / batch_size)


def scale_to_data(config: cfg.TrainConfig, n_train: int) -> tuple[cfg.TrainConfig, str | None]:
    """`config` (resolved, its epochs the recipe's) with the epochs that keep the recipe's optimizer steps on
    `n_train` training images, within MIN_SCALED_EPOCHS and MAX_SCALED_EPOCHS; and the line that says so (None
    where nothing changed: on a set the size of the recipe's own, the epochs stay exactly as they are)."""
    batch = config.batch_size
    steps = recipe_steps(config.epochs, batch)
    per_epoch = math.ceil(n_train / batch)
    low, high = min(config.epochs, MIN_SCALED_EPOCHS), max(config.epochs, MAX_SCALED_EPOCHS)
    epochs = min(max(steps / per_epoch, low), high)
    if per_epoch == math.ceil(RECIPE_IMAGES / batch) or epochs == config.epochs:
        return config, None
    bound = (f", at most {high:g}" if epochs == high else f", at least {low:g}" if epochs == low else "")
    subset = config.eval_subset or (SCALED_EVAL_SUBSET if epochs > config.epochs else None)
    evaluated = f", each but the last evaluated on {subset:,} test images" if subset != config.eval_subset else ""
    return dataclasses.replace(config, epochs=epochs, eval_subset=subset), (
        f"epochs: the {config.recipe} recipe's {config.epochs:g} epochs are {math.ceil(steps):,} steps of "
        f"{batch} on the {RECIPE_IMAGES:,} images recipes are tuned on; {epochs:.4g} epochs keep them on these "
        f"{n_train:,} training images{bound}{evaluated} (--epochs trains as many as given)")


def recipe_value(name: str, key: str) -> object:
    """What recipe `name` (with the fallbacks) sets `key` to."""
    return {**FALLBACKS, **RECIPES[name]}[key]
