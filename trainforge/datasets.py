"""Show which built-in data sets are available on this machine, where each is read from, and whether it verifies.

Without --data-dir or $TRAINFORGE_DATA the search order is the user cache (~/.cache/trainforge), the system's data
sets (/usr/share/datasets, e.g. Debian's `apt-get install dataset-fashion-mnist`) and the MNIST copy shipped inside
trainforge; nothing is downloaded here (`trainforge train --data NAME` downloads what is missing).

Example:
  trainforge datasets --json
"""

from __future__ import annotations

import argparse
from typing import Any

from .data.sources import BUILTIN_DATASETS, load_builtin, locate_builtin
from .errors import DataError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="an explicit data root to inspect instead of the default search")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking each file's SHA-256 (faster; only reports where the files are)")


def describe(name: str, data_dir: str | None = None, verify: bool = True) -> dict[str, Any]:
    """Where built-in set `name` would be read from and whether its files verify; never downloads."""
    try:
        located = locate_builtin(name, data_dir, download=False)
    except DataError as exc:
        return {"name": name, "available": False, "source": None, "folder": None, "verified": None,
                "problem": str(exc)}
    row = {"name": name, "available": True, "source": located.kind, "folder": str(located.folder),
           "verified": None, "problem": None}
    if verify:
        try:
            load_builtin(name, data_dir, download=False)
            row["verified"] = True
        except DataError as exc:
            row.update(verified=False, problem=str(exc))
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [describe(name, args.data_dir, args.verify) for name in BUILTIN_DATASETS]
    if not (args.json or args.quiet):
        from rich.console import Console
        from rich.table import Table

        table = Table("data set", "available", "source", "folder", "verified", title="built-in data sets")
        for row in rows:
            verified = {True: "yes", False: "NO", None: "-"}[row["verified"]]
            table.add_row(row["name"], "yes" if row["available"] else "no", row["source"] or "-",
                          row["folder"] or "-", verified)
        console = Console()
        console.print(table)
        for row in rows:
            if row["problem"]:
                console.print(row["problem"], markup=False, highlight=False)
    return {"datasets": rows}
