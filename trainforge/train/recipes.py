"""Named recipes: model, optimizer, schedule, batch size and epochs that are known to work together.

Each recipe states its result in a line and names the `benchmarks/RESULTS.md` section that holds the record.
"""

from __future__ import annotations

import dataclasses

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
    # For models registered without a recipe of their own (user models): AdamW with one-cycle is a forgiving start
    # for small image classifiers. It names no model, so it needs --model.
    "default": dict(epochs=5, batch_size=128, optimizer="adamw", lr=1e-3, betas=[0.9, 0.999], weight_decay=1e-4,
                    schedule="onecycle", warmup=0.1, label_smoothing=0.0, augment="none"),
    "resnet": dict(model="resnet18", epochs=5, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
                   weight_decay=5e-4, schedule="onecycle", warmup=0.2, label_smoothing=0.1, augment="translate"),
    "vgg": dict(model="vgg16_bn", epochs=5, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9,
                weight_decay=5e-4, schedule="onecycle", warmup=0.2, label_smoothing=0.1, augment="translate"),
}

# What a recipe may leave out, filled so that every resolved config is complete.
FALLBACKS = dict(momentum=0.9, betas=[0.9, 0.999], weight_decay=0.0, schedule="constant", warmup=0.0,
                 label_smoothing=0.0, augment="none", optimizer="sgd", lr=0.01, epochs=1, batch_size=128,
                 precision="auto")


def resolve(config: cfg.TrainConfig) -> cfg.TrainConfig:
    """A complete config: fields the user left at None come from the recipe, then from the fallbacks.

    The recipe is the one named, else the model's own, else 'reference'. The model's registry entry names its
    recipe, and a recipe for another model only lends its hyperparameters.
    """
    values = dataclasses.asdict(config)
    name = config.recipe
    if name is None:
        name = model_entry(config.model).default_recipe if config.model else "reference"
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
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


def recipe_value(name: str, key: str) -> object:
    """What recipe `name` (with the fallbacks) sets `key` to."""
    return {**FALLBACKS, **RECIPES[name]}[key]
