"""Shared fixtures: MNIST from the package and data sets made from it (tests/mnist_made.py), and small trained runs.

No test reads ../shared or Fashion-MNIST: a fresh clone with an empty home must pass."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import httpx
import pytest

import forked_cli
import mnist_made

REPO = Path(__file__).resolve().parents[1]

# Tests, and the subprocesses they start, find MNIST as a fresh install does (the copy inside the package, or a
# verified one in the user cache), never through a data root the developer happens to have set.
os.environ.pop("TRAINFORGE_DATA", None)
# Decoded-image caches and hardware measurements of the session go to a directory of its own, never the developer's
# ~/.cache/trainforge; subprocesses inherit it.
os.environ["TRAINFORGE_CACHE"] = tempfile.mkdtemp(prefix="trainforge-cache-")
atexit.register(shutil.rmtree, os.environ["TRAINFORGE_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def mnist():
    from trainforge.data import load_data

    return load_data("mnist")


@pytest.fixture(scope="session")
def mnist_small(mnist):
    """2,000 training and 1,000 test images of MNIST, seeded and class-balanced."""
    return mnist_made.subset(mnist, 2000, 1000)


@pytest.fixture(scope="session")
def mnist_5_5(mnist_small):
    """Two tasks from MNIST for updates and forgetting: digits 0-4 (the old task) and 5-9 (the new one)."""
    return (mnist_made.class_split(mnist_small, [0, 1, 2, 3, 4], "mnist-0-4"),
            mnist_made.class_split(mnist_small, [5, 6, 7, 8, 9], "mnist-5-9"))


@pytest.fixture(scope="session")
def mnist_png_folder(tmp_path_factory, mnist):
    """An image folder of real digits as PNG: train/ with 20 per class, val/ with 10 per class."""
    return mnist_made.write_split_folder(tmp_path_factory.mktemp("folders") / "digits_png",
                                         mnist_made.subset(mnist, 200, 100, seed=1))


@pytest.fixture(scope="session")
def mnist_jpeg_folder(tmp_path_factory, mnist):
    """A photo-like folder: digits upscaled to 128 px RGB JPEGs, train/ with 10 per class, val/ with 5 per class."""
    return mnist_made.write_split_folder(tmp_path_factory.mktemp("folders") / "digits_jpeg",
                                         mnist_made.subset(mnist, 100, 50, seed=2), fmt="jpeg", size=128)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist) -> Path:
    """A linear model trained for one epoch on real MNIST: enough to be clearly better than chance."""
    import trainforge

    out = tmp_path_factory.mktemp("runs") / "linear"
    trainforge.train({"model": "linear", "epochs": 1, "out": str(out), "tensorboard": False}, data=mnist,
                     progress=False)
    return out


@pytest.fixture(scope="session")
def small_cnn_run(tmp_path_factory, mnist_small) -> Path:
    """A narrow cnn (width 8) trained two epochs on 2,000 MNIST images (evaluated on 1,000): a quick conv model well
    above chance (about 70%), for tests of export, serving and compression."""
    import trainforge

    out = tmp_path_factory.mktemp("runs") / "cnn8"
    trainforge.train({"model": "cnn", "width": 8, "epochs": 2, "batch_size": 32, "out": str(out),
                      "tensorboard": False}, data=mnist_small, progress=False)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """`trainforge ARGS` in a process of its own, as a user runs it: forked from tests/forked_cli.py's server, which
    has imported trainforge once (an interpreter of its own spent 2.5 s importing torch)."""
    changes = dict(env or {})
    # What the command starts itself (torchrun's workers, benchmark scripts) imports this checkout too.
    changes["PYTHONPATH"] = str(REPO) + os.pathsep + (changes.get("PYTHONPATH") or os.environ.get("PYTHONPATH", ""))
    code, out, err = _cli_server().start(*args, env=changes, cwd=cwd).wait(timeout)
    return subprocess.CompletedProcess(["trainforge", *args], code, out, err)


_SERVERS: list[forked_cli.Server] = []


def _cli_server() -> forked_cli.Server:
    """The session's forking server, started on first use."""
    if not _SERVERS or _SERVERS[-1].process.poll() is not None:
        directory = Path(tempfile.mkdtemp(prefix="trainforge-cli-"))
        _SERVERS.append(forked_cli.Server(directory, REPO))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        atexit.register(_SERVERS[-1].close)
    return _SERVERS[-1]


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """`trainforge ARGS` in this process (cli.main), shaped as run_cli's result: for commands that end in a second or
    two, where an interpreter of their own would cost more than the command."""
    from trainforge import cli

    try:
        status = cli.main(list(args))
    except SystemExit as exc:  # --help
        status = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["trainforge", *args], status, out, err)


def load_benchmark(name: str) -> ModuleType:
    """The script benchmarks/NAME.py as a module, for tests of its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def start_server(source: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`trainforge serve SOURCE ARGS` on a free port of 127.0.0.1, once its /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "trainforge", "serve", str(source), "--port", str(port), "--quiet",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited early: {proc.stderr.read()}")
        try:
            httpx.get(base + "/health", timeout=1.0)
            return proc, base
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("server did not start")
            time.sleep(0.2)


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    """Polls `predicate` until it holds; fails naming `what` only if it never does (a hang, not a slow machine)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what} after {timeout:.0f} s")
        time.sleep(0.02)


# `mutmut run` (pyproject.toml) first records which tests reach which mutated function, in the test process only;
# its marker in the environment would make the subprocesses that tests start record too, which fails outside the
# repository's root. The test process keeps its own copy of the marker (mutmut's process-local state).
if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    del os.environ["MUTANT_UNDER_TEST"]


def digits_folder(root: Path, mnist, per_class: int = 8) -> Path:
    """MNIST digits as PNGs, `per_class` of each class: a folder small enough to train in seconds."""
    mnist_made.write_folder(root, mnist_made.subset(mnist, 10 * per_class, 10, seed=3).train)
    return root


@pytest.fixture(scope="session")
def auto_run(tmp_path_factory, mnist):
    """An auto run killed (SIGKILL) as soon as its search was recorded, then continued with --resume (tests/test_auto.py
    checks it; tests/test_cli.py resumes the finished run as auto's real invocation)."""
    from trainforge.auto.pipeline import STOP_AFTER_ENV
    from trainforge.train.budget import TICK_ENV

    base = tmp_path_factory.mktemp("auto")
    folder = digits_folder(base / "digits", mnist)
    out = base / "out"
    system_tmp = base / "tmp"  # where temporary files would go: auto keeps its own inside --out
    system_tmp.mkdir()
    ticking = {TICK_ENV: "0.04", "TMPDIR": str(system_tmp)}  # the budget counts clock readings, not seconds
    killed = run_cli("auto", str(folder), "--time", "40s", "--out", str(out), env={**ticking, STOP_AFTER_ENV: "search"})
    resumed = run_cli("auto", "--resume", str(out), "--json", env=ticking)
    assert not list(system_tmp.iterdir()) and not (out / ".tmp").exists()
    return folder, out, killed, resumed
