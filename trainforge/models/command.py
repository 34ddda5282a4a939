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
        recipe, model, _ = choose(TrainConfig(data=name))
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

        table = Table("model", "default recipe", "description", title="registered models")
        for m in models:
            table.add_row(m["name"], m["recipe"], m["description"])
        console = Console()
        console.print(table)
        print("recipes: " + ", ".join(sorted(RECIPES)))
        console.print(_datasets_table(datasets))
    return {"models": models, "recipes": sorted(RECIPES), "datasets": datasets}


def _datasets_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from ..train.recipes import RECIPES

    table = Table(title="`trainforge train --data NAME` without --model, and other recipes measured on each set "
                        "(by the scripts in benchmarks/)")
    for column in ("data set", "model", "recipe"):
        table.add_column(column, no_wrap=True)
    table.add_column("test accuracy and train seconds, as measured")
    for row in rows:
        table.add_row(row["data"], row["model"], f"{row['recipe']} (default)", _measurement(row["measured"]))
        for recipe, result in row["measured_recipes"].items():
            if recipe != row["recipe"]:
                table.add_row(row["data"], RECIPES.get(recipe, {}).get("model", "-"), recipe, _measurement(result))
    return table


def _measurement(m: dict[str, Any] | None) -> str:
    if m is None:
        return "not measured yet"
    spread = f" ± {100 * m['acc_std']:.2f} over {m['seeds']} seeds" if m["seeds"] > 1 else " (one seed)"
    return (f"{100 * m['acc_mean']:.2f}%{spread} in {m['seconds_median']:.1f} s (median; {m['device']}, "
            f"{m['threads']} threads, {m['date']})")
