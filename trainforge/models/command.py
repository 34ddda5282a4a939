"""List the registered models (with their default recipes), the named recipes, and for each built-in data set the
model and recipe `trainforge train --data NAME` uses with the accuracy and time the benchmarks measured for it."""

from __future__ import annotations

import argparse
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    del parser  # no options of its own


def dataset_defaults() -> list[dict[str, Any]]:
    """Per built-in data set: its default model and recipe, what was measured of that recipe on it (or None), and
    every recipe measured on it (`measured_recipes`)."""
    from ..config import TrainConfig
    from ..data import BUILTIN_DATASETS
    from ..train.recipes import choose, measured

    results = measured()
    rows = []
    for name in BUILTIN_DATASETS:
        recipe, model = choose(TrainConfig(data=name))
        on_set = results.get(name, {})
        rows.append({"data": name, "model": model, "recipe": recipe, "measured": on_set.get(recipe),
                     "measured_recipes": on_set})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..train.recipes import RECIPES
    from .registry import list_models, model_entry

    models = [{"name": n, "recipe": model_entry(n).default_recipe, "description": model_entry(n).description}
              for n in list_models()]
    datasets = dataset_defaults()
    if not (args.json or args.quiet):
        from rich.console import Console
        from rich.table import Table

        from .fewshot import PREFIX

        table = Table("model", "default recipe", "description", title="registered models")
        for m in models:
            if not m["name"].startswith(PREFIX):  # one twin per model: summarised below the table
                table.add_row(m["name"], m["recipe"], m["description"])
        Console().print(table)
        print(f"{PREFIX}<model>: the few-shot prototype classifier on each model above (made by `trainforge fewshot`)")
        print("recipes: " + ", ".join(sorted(RECIPES)))
        for line in _dataset_lines(datasets):
            print(line)
    return {"models": models, "recipes": sorted(RECIPES), "datasets": datasets}


def _dataset_lines(rows: list[dict[str, Any]]) -> list[str]:
    from ..train.recipes import RECIPES

    lines = ["built-in data sets: what `trainforge train --data NAME` trains without --model, and the recipes the "
             "scripts in benchmarks/ measured on each"]
    for row in rows:
        lines.append(f"  {row['data']}: recipe {row['recipe']} (model {row['model']}): {_measurement(row['measured'])}")
        for recipe, result in row["measured_recipes"].items():
            if recipe != row["recipe"]:
                model = RECIPES.get(recipe, {}).get("model", "-")
                lines.append(f"    also measured: recipe {recipe} (model {model}): {_measurement(result)}")
    return lines


def _measurement(m: dict[str, Any] | None) -> str:
    if m is None:
        return "not measured yet"
    spread = f" ± {100 * m['acc_std']:.2f} over {m['seeds']} seeds" if m["seeds"] > 1 else " (1 seed)"
    # The load average says how much other work shared the machine, and so how far the time is from its own.
    load = f", load average {max(m['load_average']):.1f}" if m.get("load_average") else ""
    return (f"{100 * m['acc_mean']:.2f}%{spread}, {m['seconds_median']:.1f} s of training (median; {m['device']}, "
            f"{m['threads']} threads{load}, {m['date']})")
