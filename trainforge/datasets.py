"""Show which built-in data sets are available on this machine, where each is read from, and whether it verifies,
and the decoded-image caches of image folders with their sizes.

Without --data-dir or $TRAINFORGE_DATA the search order is the user cache (~/.cache/trainforge), the system's data
sets (/usr/share/datasets, e.g. Debian's `apt-get install dataset-fashion-mnist`) and the MNIST copy shipped inside
trainforge; nothing is downloaded here (`trainforge train --data NAME` downloads what is missing). Image folders are
decoded once into $TRAINFORGE_CACHE/decoded (default ~/.cache/trainforge/decoded); --clear-cache removes those
decoded images only, never downloaded data sets or the hardware measurements.

Example:
  trainforge datasets --json
  trainforge datasets --clear-cache
"""

from __future__ import annotations

import argparse
from typing import Any

from .data.cache import cache_entries, clear_cache, decoded_dir
from .data.sources import BUILTIN_DATASETS, load_builtin, locate_builtin
from .errors import DataError
from .hardware.memory import format_bytes


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="an explicit data root to inspect instead of the default search")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip checking each file's SHA-256 (faster; only reports where the files are)")
    parser.add_argument("--clear-cache", action="store_true",
                        help="remove the decoded-image caches of image folders (nothing else), then list as usual")


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
    cleared = clear_cache() if args.clear_cache else None
    rows = [describe(name, args.data_dir, args.verify) for name in BUILTIN_DATASETS]
    caches = cache_entries()
    if not (args.json or args.quiet):
        _print(rows, caches, cleared)
    result: dict[str, Any] = {"datasets": rows, "decoded_caches": caches}
    if cleared is not None:
        result["cleared"] = {"files": cleared[0], "bytes": cleared[1]}
    return result


def _print(rows: list[dict[str, Any]], caches: list[dict[str, Any]], cleared: tuple[int, int] | None) -> None:
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
    if cleared is not None:
        console.print(f"removed {cleared[0]} files of decoded-image caches ({format_bytes(cleared[1])})",
                      markup=False, highlight=False)
    if not caches:
        console.print(f"no decoded-image caches in {decoded_dir()}", markup=False, highlight=False)
        return
    table = Table("image folder", "size", "images", "on disk", "file", title="decoded-image caches")
    for cache in caches:
        size = "-" if cache["size"] is None else f"{cache['size'][1]}x{cache['size'][0]}x{cache['channels']}"
        table.add_row(cache["folder"] or "(unreadable description)", size,
                      "-" if cache["images"] is None else f"{cache['images']:,}", format_bytes(cache["bytes"]),
                      cache["file"])
    console.print(table)
