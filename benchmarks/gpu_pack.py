#!/usr/bin/env python3
"""Bring-along for a bare GPU machine: what it lacks to run benchmarks/gpu_check.py, in one git-ignored folder.

The GPU machine has Python 3.12, torch and the packages listed in benchmarks/gpu_machine_packages.txt, but no
package registry and no data sets. Built here, on a machine that reaches PyPI:
  DIR/wheels/  every requirement of trainforge (pyproject.toml), transitively, that the machine lacks, as wheels that
               install there: CPython 3.12 (cp312 or abi3) for manylinux <= 2_28 x86-64 (torch's own wheels there
               need glibc 2.28), or pure Python. Fetched one level of requirements at a time with --no-deps, so
               nothing the machine already has is downloaded; pip's cache makes a rebuild cost seconds.
  DIR/data/    MNIST as .gz (the loader reads it as is) unless the package embeds it; Fashion-MNIST as xz-compressed
               raw IDX (22.6 MB against 30.9 MB of .gz: the loader reads .gz or raw IDX, so `--unpack` restores the
               raw files on arrival), left out with a message when it would not fit.
Everything that travels (the working tree plus DIR) must stay under 64 MiB; the script reports the sizes and
prints the one command line to run on the GPU machine.

Usage:
  benchmarks/gpu_pack.sh [DIR]                        # DIR defaults to .gpu-pack (git-ignored)
  python3 benchmarks/gpu_pack.py --unpack DIR ROOT    # on the GPU machine: lay out the data root ROOT from DIR
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
INVENTORY = REPO / "benchmarks" / "gpu_machine_packages.txt"
DEFAULT_DIR = REPO / ".gpu-pack"
# Where the package keeps its own copy of MNIST, when it has one (then the pack need not carry it).
EMBEDDED_MNIST = REPO / "trainforge" / "data" / "embedded" / "mnist"
SHARED_DATA = REPO.parent / "shared" / "data"
TRAVEL_LIMIT = 64 * 2 ** 20
# Packages the GPU machine has that are packed all the same, in their newest release: the packed wheels need recent
# ones (pydantic 2.14 imports typing_extensions.sentinel, new in 4.16; with 4.15 it fails at import, tried on Python
# 3.12), the machine's version is not known, and typing-extensions only ever adds (its compatibility policy), so a
# newer copy is safe for everything already there.
REFRESH = frozenset({"typing-extensions"})
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# The GPU machine, as environment markers see it.
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "implementation_version": "3.12.3", "platform_python_implementation": "CPython",
              "platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64", "os_name": "posix",
              "platform_release": "", "platform_version": ""}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(28, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
TARGET_TAGS = frozenset([*cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=PLATFORMS),
                         *compatible_tags((3, 12), "cp312", platforms=PLATFORMS)])


class PackError(Exception):
    """Something the pack cannot hold or satisfy; printed as one line."""


def load_inventory(path: Path = INVENTORY) -> dict[str, Version | None]:
    """Package name -> version (None where the version is not known) of what the GPU machine has."""
    packages: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = Version(version) if version else None
    return packages


def trainforge_requirements() -> list[Requirement]:
    """The runtime requirements in pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def wheel_metadata(path: Path) -> tuple[str, Version, list[Requirement]]:
    """Name, version and Requires-Dist of a wheel, from its METADATA."""
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        headers = HeaderParser().parsestr(archive.read(meta).decode("utf-8"))
    return canonicalize_name(name), version, [Requirement(r) for r in headers.get_all("Requires-Dist") or []]


def installs_there(path: Path) -> bool:
    """Whether pip on the GPU machine would install this wheel: one of its tags is CPython 3.12 on x86-64 Linux."""
    return bool(parse_wheel_filename(path.name)[3] & TARGET_TAGS)


def applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether `requirement` holds on the GPU machine when its package is installed with `extras`."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**TARGET_ENV, "extra": extra}) for extra in {"", *extras})


def walk(roots: list[Requirement], wheel_dir: Path,
         inventory: dict[str, Version | None]) -> tuple[list[Requirement], set[str]]:
    """(requirements reachable from `roots` that neither the GPU machine nor a wheel in `wheel_dir` satisfies,
    names of the packed wheels reached).

    Walks from the roots through the packed wheels' own requirements, with the extras asked of each. A requirement
    the machine has in a version outside its specifier is a PackError: packing a second copy would replace the
    machine's own (numpy, torch), which no pack should do.
    """
    wheels = {}
    for path in sorted(wheel_dir.glob("*.whl")):
        name, version, requires = wheel_metadata(path)
        if name in wheels:
            raise PackError(f"{wheel_dir}: two versions of {name} ({wheels[name][0]}, {version}); keep one")
        if not installs_there(path):
            raise PackError(f"{path.name}: not installable on the GPU machine (needs a CPython 3.12, abi3 or "
                            f"pure-Python wheel for manylinux <= 2_28 x86-64)")
        wheels[name] = (version, requires)
    missing, reached, seen = [], set(), set()
    pending = [(r, "pyproject.toml") for r in roots if applies(r, set())]
    while pending:
        requirement, wanted_by = pending.pop()
        name = canonicalize_name(requirement.name)
        key = (name, str(requirement.specifier), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        if name in inventory and name not in REFRESH:
            have = inventory[name]
            if have is not None and not requirement.specifier.contains(have, prereleases=True):
                raise PackError(f"{wanted_by} needs {requirement}, and the GPU machine has {name} {have}")
            continue
        if name not in wheels or not requirement.specifier.contains(wheels[name][0], prereleases=True):
            missing.append(requirement)
            continue
        reached.add(name)
        version, requires = wheels[name]
        pending += [(r, f"{name} {version}") for r in requires if applies(r, set(requirement.extras))]
    return missing, reached


def download(requirements: list[Requirement], wheel_dir: Path) -> None:
    """Fetches one wheel per requirement (no dependencies) that installs on the GPU machine."""
    wanted = sorted({f"{r.name}{r.specifier}" for r in requirements})
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
               "--abi", "none", *platforms, "--dest", str(wheel_dir), *wanted]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PackError(f"pip download {' '.join(wanted)} failed: {done.stderr.strip().splitlines()[-1:]}")


def pack_wheels(wheel_dir: Path, inventory: dict[str, Version | None]) -> list[Path]:
    """Fills `wheel_dir` with the wheels of every requirement of trainforge the GPU machine lacks, transitively."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    roots = trainforge_requirements()
    asked: set[str] = set()
    while True:
        missing, reached = walk(roots, wheel_dir, inventory)
        if not missing:
            break
        again = {str(r) for r in missing} & asked
        if again:
            raise PackError(f"pip's wheels still do not satisfy {', '.join(sorted(again))}")
        asked |= {str(r) for r in missing}
        stale = {canonicalize_name(r.name) for r in missing}  # a packed version that no longer fits: replaced
        for path in wheel_dir.glob("*.whl"):
            if canonicalize_name(parse_wheel_filename(path.name)[0]) in stale:
                path.unlink()
        download(missing, wheel_dir)
    for path in wheel_dir.glob("*.whl"):
        if wheel_metadata(path)[0] not in reached:  # left from an earlier build with other requirements
            path.unlink()
    return sorted(wheel_dir.glob("*.whl"))


def tree_bytes(exclude: Path) -> int:
    """Bytes of the working tree that travels: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    paths = {REPO / name for name in listed if name}
    return sum(p.stat().st_size for p in paths if p.is_file() and exclude not in p.parents)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def idx_files(folder: Path) -> list[Path]:
    """The four IDX files of a data set in `folder`, each as .gz or raw, as the loader finds them."""
    found = [next((p for p in (folder / f"{n}.gz", folder / n) if p.is_file()), None) for n in IDX_NAMES]
    if None in found:
        raise PackError(f"{folder}: missing {', '.join(n for n, p in zip(IDX_NAMES, found) if p is None)}")
    return found


def xz_idx(source: Path, target: Path) -> None:
    """Writes the raw IDX content of `source` (.gz or raw) to `target` as xz, atomically."""
    import gzip

    raw = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    os.replace(tmp, target)


def pack_data(data_dir: Path, source: Path, room: int) -> list[str]:
    """Puts into `data_dir` the data sets the checks read that the package does not carry; returns notes to print.

    `room`: bytes left for data within the travel limit. MNIST comes first (every check reads it); Fashion-MNIST
    only where it fits after it (only the Fashion-MNIST recipe and the fine-tune speed benchmark read it).
    """
    notes = []
    mnist = data_dir / "mnist"
    if all((EMBEDDED_MNIST / f"{n}.gz").is_file() for n in IDX_NAMES):
        shutil.rmtree(mnist, ignore_errors=True)
        notes.append(f"mnist: embedded in the package ({EMBEDDED_MNIST.relative_to(REPO)}), not copied")
    else:
        mnist.mkdir(parents=True, exist_ok=True)
        for path in idx_files(source / "mnist"):
            if not (mnist / path.name).is_file():
                shutil.copyfile(path, mnist / path.name)
        notes.append(f"mnist: copied from {source / 'mnist'} ({folder_bytes(mnist) / 2 ** 20:.1f} MiB)")
    fashion = data_dir / "fashion-mnist"
    fashion.mkdir(parents=True, exist_ok=True)
    for name, path in zip(IDX_NAMES, idx_files(source / "fashion-mnist")):
        if not (fashion / f"{name}.xz").is_file():
            xz_idx(path, fashion / f"{name}.xz")
    need = folder_bytes(fashion)
    if need > room - folder_bytes(mnist):
        shutil.rmtree(fashion)
        notes.append(f"fashion-mnist: LEFT OUT: its {need / 2 ** 20:.1f} MiB (xz) do not fit the "
                     f"{max(0, room - folder_bytes(mnist)) / 2 ** 20:.1f} MiB left; the Fashion-MNIST steps will "
                     f"report the missing files")
    else:
        notes.append(f"fashion-mnist: {need / 2 ** 20:.1f} MiB as xz of the raw IDX files (unpacked there by --unpack)")
    return notes


def unpack(pack_dir: Path, root: Path) -> None:
    """On the GPU machine: a data root at `root` with MNIST (the pack's copy, else the package's) and, when packed,
    Fashion-MNIST as raw IDX files."""
    root.mkdir(parents=True, exist_ok=True)
    mnist = pack_dir / "data" / "mnist"
    mnist = mnist if mnist.is_dir() else EMBEDDED_MNIST
    link = root / "mnist"
    if not link.exists():
        link.symlink_to(mnist.resolve(), target_is_directory=True)
    fashion = pack_dir / "data" / "fashion-mnist"
    for packed in sorted(fashion.glob("*.xz")):
        target = root / "fashion-mnist" / packed.stem
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(lzma.decompress(packed.read_bytes()))
        print(f"{target}: sha256 {hashlib.sha256(target.read_bytes()).hexdigest()}")


def run_command(pack_dir: Path) -> str:
    """The one command line to run on the GPU machine, from the repository root."""
    rel = os.path.relpath(pack_dir, REPO)
    return (f"python3 -m pip install -q --no-index --no-deps {rel}/wheels/*.whl && "
            f"python3 -m pip install -q --no-index --no-deps --no-build-isolation . && "
            f"python3 benchmarks/gpu_pack.py --unpack {rel} /tmp/trainforge-data && "
            f"TRAINFORGE_DATA=/tmp/trainforge-data python3 benchmarks/gpu_check.py --out \"${{OUT:-gpu-results}}\"")


def build(pack_dir: Path, source: Path) -> int:
    """Builds the pack, prints its sizes and the command to run there; returns the process's exit status."""
    wheels = pack_wheels(pack_dir / "wheels", load_inventory())
    tree, wheel_bytes = tree_bytes(pack_dir), folder_bytes(pack_dir / "wheels")
    notes = pack_data(pack_dir / "data", source, TRAVEL_LIMIT - tree - wheel_bytes)
    data = folder_bytes(pack_dir / "data")
    total = tree + wheel_bytes + data
    print(f"wheels: {len(wheels)} ({wheel_bytes / 2 ** 20:.1f} MiB): {' '.join(p.name for p in wheels)}")
    for note in notes:
        print(note)
    print(f"travels: working tree {tree / 2 ** 20:.1f} MiB + wheels {wheel_bytes / 2 ** 20:.1f} MiB + data "
          f"{data / 2 ** 20:.1f} MiB = {total / 2 ** 20:.1f} MiB of {TRAVEL_LIMIT / 2 ** 20:.0f} MiB")
    if total > TRAVEL_LIMIT:
        print(f"gpu_pack: error: {total / 2 ** 20:.1f} MiB exceed the {TRAVEL_LIMIT / 2 ** 20:.0f} MiB that can "
              f"travel", file=sys.stderr)
        return 1
    print(f"on the GPU machine, from the repository root, with {os.path.relpath(pack_dir, REPO)} copied there too:")
    print(run_command(pack_dir))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR, help="the pack's folder (default: .gpu-pack)")
    parser.add_argument("--data-source", type=Path, default=Path(os.environ.get("TRAINFORGE_DATA", SHARED_DATA)),
                        help="data root to copy from (default: $TRAINFORGE_DATA, else ../shared/data)")
    parser.add_argument("--unpack", nargs=2, type=Path, metavar=("DIR", "ROOT"),
                        help="on the GPU machine: make the data root ROOT from the pack DIR")
    args = parser.parse_args()
    try:
        if args.unpack:
            unpack(*args.unpack)
            return 0
        return build(args.dir.resolve(), args.data_source)
    except PackError as exc:
        print(f"gpu_pack: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
