"""List the registered models (with their default recipes) and the named recipes."""

from __future__ import annotations

import argparse
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    del parser  # no options of its own


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..train.recipes import RECIPES
    from .registry import list_models, model_entry

    models = [{"name": n, "recipe": model_entry(n).default_recipe, "description": model_entry(n).description}
              for n in list_models()]
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
    return {"models": models, "recipes": sorted(RECIPES)}
