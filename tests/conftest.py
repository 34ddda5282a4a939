"""Shared fixtures: the real data root (../shared/data beside the checkout) and one small trained run."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Every test, and every subprocess a test starts, reads the real data sets from the shared root unless told otherwise.
os.environ.setdefault("TRAINFORGE_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["TRAINFORGE_DATA"])
    if not (root / "mnist").is_dir():
        pytest.fail(f"real MNIST not found under {root}: set TRAINFORGE_DATA to the shared data root")
    return root


@pytest.fixture(scope="session")
def mnist(data_root):
    from trainforge.data import load_data

    return load_data("mnist", str(data_root))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist) -> Path:
    """A linear model trained for one epoch on real MNIST: enough to be clearly better than chance."""
    import trainforge

    out = tmp_path_factory.mktemp("runs") / "linear"
    trainforge.train({"model": "linear", "epochs": 1, "out": str(out), "tensorboard": False}, data=mnist,
                     progress=False)
    return out


@pytest.fixture(scope="session")
def small_cnn_run(tmp_path_factory, mnist) -> Path:
    """A narrow cnn (width 8) trained two epochs on 2,000 MNIST images (evaluated on 1,000): a quick conv model well
    above chance (about 70%), for tests of export, serving and compression."""
    import trainforge
    from trainforge.data import DataBundle, ImageSet, balanced_subset

    idx = balanced_subset(mnist.train.labels, 2000, 0)
    bundle = DataBundle("mnist", ImageSet(mnist.train.images[idx], mnist.train.labels[idx], mnist.classes),
                        ImageSet(mnist.test.images[:1000], mnist.test.labels[:1000], mnist.classes),
                        mnist.mean, mnist.std)
    out = tmp_path_factory.mktemp("runs") / "cnn8"
    trainforge.train({"model": "cnn", "width": 8, "epochs": 2, "batch_size": 32, "out": str(out),
                      "tensorboard": False}, data=bundle, progress=False)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Runs `python -m trainforge ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "trainforge", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)


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
