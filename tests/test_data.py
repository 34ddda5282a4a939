"""Tests of trainforge.data: the IDX reader, built-in data sets (load, verify, download) and image folders."""

import gzip
import hashlib
import io
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.io import encode_jpeg, write_png

from trainforge.data import sources
from trainforge.data.folder import (
    FolderDataset,
    StreamingLoader,
    estimate_folder_bytes,
    load_image_folder,
    scan_image_folder,
    split_stratified,
    streaming_loader,
)
from trainforge.data.idx import parse_idx, read_idx, read_idx_bytes
from trainforge.data.sources import BUILTIN_DATASETS, data_root, load_builtin
from trainforge.errors import DataError

# The real MNIST files: the copy that ships inside the package (a fresh clone has no other).
EMBEDDED_MNIST = sources.EMBEDDED_ROOT / "mnist"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still are what folder.py uses.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def link_set(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for file in src.iterdir():
        (dest / file.name).symlink_to(file)


@pytest.fixture
def mnist_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A data root holding the real MNIST (links to the package's files), made the root through TRAINFORGE_DATA."""
    root = tmp_path / "root"
    link_set(EMBEDDED_MNIST, root / "mnist")
    monkeypatch.setenv("TRAINFORGE_DATA", str(root))
    return root


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every test runs offline: urlopen fails (and is recorded) unless a test serves bytes itself."""
    calls: list[str] = []

    def refuse(request, timeout=None):
        calls.append(request.full_url if isinstance(request, urllib.request.Request) else request)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    return calls


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    array = np.asarray(array)
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, codes[big.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + big.tobytes()


def write_idx_set(folder_path: Path, n_train: int, n_test: int, n_test_labels: int | None = None,
                  label: int = 3) -> None:
    """A small, structurally valid MNIST-like set (its checksums do not match the real one)."""
    folder_path.mkdir(parents=True)
    counts = (n_train, n_train, n_test, n_test if n_test_labels is None else n_test_labels)
    for name, n in zip(MNIST_FILES, counts, strict=True):
        array = np.full((n, 28, 28), 7, np.uint8) if "images" in name else np.full(n, label, np.uint8)
        (folder_path / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))


# ---- IDX format ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_parse_idx_round_trips_every_type(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    parsed = parse_idx(idx_bytes(array), "x")
    assert parsed.dtype == np.dtype(dtype).newbyteorder("=") and parsed.shape == (2, 3, 4)
    np.testing.assert_array_equal(parsed, array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "raw.gz").write_bytes(idx_bytes(array))
    (tmp_path / "compressed").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "compressed"), array)
    assert read_idx(tmp_path / "compressed").flags.writeable


@pytest.mark.parametrize("data, message", [
    (b"", "too short for an IDX header"),
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "expected magic bytes 00 00"),
    (b"\x00\x00\x0a\x01\x00\x00\x00\x01\x05", "unknown IDX element type 0x0A"),
    (b"\x00\x00\x08\x00", "declares 0 dimensions (expected 1 to 4)"),
    (b"\x00\x00\x08\x05" + b"\x00\x00\x00\x01" * 5 + b"\x05", "declares 5 dimensions"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header (expected 16 bytes for 3 dimensions, got 8)"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x04\x01\x02", "truncated IDX data (expected 4 bytes for shape (4,), got 2)"),
    (b"\x00\x00\x0c\x01\x00\x00\x00\x01\x01\x02\x03", "expected 4 bytes for shape (1,), got 3"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "1 trailing bytes after the IDX data"),
    (b"\x00\x00\x08\x03" + b"\x00\x01\x00\x00" * 3, "refusing more than 2147483648"),
])
def test_parse_idx_rejects_malformed_input(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match="^bad.idx: ") as info:
        parse_idx(data, "bad.idx")
    assert message in str(info.value)


def test_read_idx_reports_file_problems(tmp_path: Path) -> None:
    labels = (EMBEDDED_MNIST / "train-images-idx3-ubyte.gz").read_bytes()
    cases = {
        "truncated.gz": (labels[:100_000], "truncated gzip stream (expected 47040000 bytes of data for shape "
                                           "(60000, 28, 28), got "),
        "no-trailer.gz": (gzip.compress(idx_bytes(np.zeros(9, np.uint8)))[:-8], "truncated gzip stream"),
        "corrupt.gz": (labels[:5000] + bytes(b ^ 0x5A for b in labels[5000:9000]) + labels[9000:],
                       "corrupt gzip stream"),
        "bad-crc.gz": (gzip.compress(idx_bytes(np.zeros(9, np.uint8)))[:-8] + b"\0" * 8, "corrupt gzip stream"),
        "bad-header.gz": (b"\x1f\x8b\x99" + b"\0" * 20, "corrupt gzip stream"),
        "short.gz": (gzip.compress(idx_bytes(np.zeros(9, np.uint8))[:-2]), "expected 9 bytes for shape (9,), got 7"),
        "trailing.gz": (gzip.compress(idx_bytes(np.zeros(9, np.uint8)) + b"x"), "trailing bytes after the IDX data"),
        "short": (idx_bytes(np.zeros(9, np.uint8))[:-2], "expected 9 bytes for shape (9,), got 7"),
        "trailing": (idx_bytes(np.zeros(9, np.uint8)) + b"xyz", "trailing bytes after the IDX data"),
        "magic": (b"\x00\x01\x08\x01\x00\x00\x00\x01\x00", "expected magic bytes 00 00"),
        "dims.gz": (gzip.compress(b"\x00\x00\x08\x07" + b"\0" * 40), "declares 7 dimensions"),
        # A tiny file whose header claims 2**31 float64 elements: refused by size, nothing huge allocated.
        "liar.gz": (gzip.compress(b"\x00\x00\x0e\x02\x00\x01\x00\x00\x00\x00\x80\x00" + b"\0" * 64),
                    "truncated IDX data (expected 17179869184 bytes"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as info:
            read_idx(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: ") and message in str(info.value), name
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "absent")
    with pytest.raises(DataError, match="is a directory"):
        read_idx(tmp_path)


_VALID = idx_bytes(np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4))


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_parse_idx_random_bytes(data: bytes) -> None:
    try:
        parse_idx(data, "fuzz")
    except DataError:
        pass


@st.composite
def mutated_idx(draw: st.DrawFn) -> bytes:
    data = bytearray(_VALID)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, 15))  # the header and the first data bytes
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=8))


@settings(max_examples=1000, deadline=None)
@given(mutated_idx())
def test_fuzz_parse_idx_mutated_headers(data: bytes) -> None:
    try:
        array = parse_idx(data, "fuzz")
    except DataError:
        return
    assert array.size * array.itemsize == len(data) - 4 - 4 * array.ndim


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 200), st.integers(0, 255), st.integers(0, 250))
def test_fuzz_read_idx_damaged_gzip(position: int, value: int, cut: int) -> None:
    data = bytearray(gzip.compress(_VALID))
    data[position % len(data)] = value
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.gz"
        path.write_bytes(bytes(data[: max(cut, 2)]))
        try:
            read_idx_bytes(path)
        except DataError as e:
            assert str(e).startswith(f"{path}: ")


# ---- built-in data sets --------------------------------------------------------------------------------------

def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TRAINFORGE_DATA", raising=False)
    assert data_root() == Path.home() / ".cache" / "trainforge"
    monkeypatch.setenv("TRAINFORGE_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"


def test_real_mnist_loads_and_verifies_from_the_root(mnist_root: Path, no_network: list[str]) -> None:
    assert sources.locate_builtin("mnist").folder == mnist_root / "mnist"
    train, test = load_builtin("mnist")
    info = BUILTIN_DATASETS["mnist"]
    for part, n in ((train, 60000), (test, 10000)):
        assert part.images.shape == (n, 1, 28, 28) and part.images.dtype == torch.uint8
        assert part.images.is_contiguous() and part.images.device.type == "cpu"
        assert part.labels.shape == (n,) and part.labels.dtype == torch.int64
        assert part.labels.unique().tolist() == list(range(10))
        assert part.classes == list(info.classes) and len(part.classes) == 10
    mean = train.images.double().div(255).mean().item()
    assert abs(mean - info.mean) < 1e-4
    assert no_network == []


def test_fashion_mnist_is_verified_against_its_own_checksums(tmp_path: Path, no_network: list[str]) -> None:
    """Fashion-MNIST's wiring, on MNIST's files put under its name: its checksums (not MNIST's) are required, and
    what loads carries its class names. Its real content is the time-to-accuracy benchmark's business."""
    link_set(EMBEDDED_MNIST, tmp_path / "fashion-mnist")
    expected = BUILTIN_DATASETS["fashion-mnist"].sha256["train-images-idx3-ubyte"]
    with pytest.raises(DataError, match=f"train-images-idx3-ubyte.gz: checksum mismatch .* expected {expected}"):
        load_builtin("fashion-mnist", tmp_path, download=False)
    train, test = load_builtin("fashion-mnist", tmp_path, download=False, verify=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.labels.shape == (10000,)
    assert train.classes == test.classes == list(BUILTIN_DATASETS["fashion-mnist"].classes)
    assert no_network == []


def test_fashion_class_names() -> None:
    assert BUILTIN_DATASETS["fashion-mnist"].classes[0] == "T-shirt/top"
    assert BUILTIN_DATASETS["fashion-mnist"].classes[9] == "Ankle boot"
    assert BUILTIN_DATASETS["mnist"].classes == tuple("0123456789")


def test_raw_files_load_and_verification_is_cached(mnist_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mnist").mkdir()
    for name in MNIST_FILES:
        with gzip.open(EMBEDDED_MNIST / f"{name}.gz") as src:
            (tmp_path / "mnist" / name).write_bytes(src.read())
    train, test = load_builtin("mnist", tmp_path, download=False)
    reference_train, _ = load_builtin("mnist", download=False)
    assert torch.equal(train.images, reference_train.images) and torch.equal(train.labels, reference_train.labels)

    def no_hashing(*args: object) -> None:
        raise AssertionError("verified files must not be hashed again")

    monkeypatch.setattr(sources.hashlib, "sha256", no_hashing)
    load_builtin("mnist", tmp_path, download=False)
    # A changed file (new mtime) is verified again.
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="hashed again"):
        load_builtin("mnist", tmp_path, download=False)


def test_checksum_mismatch_names_the_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "mnist", 5, 3)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: checksum mismatch .* expected ba89104"):
        load_builtin("mnist", tmp_path, download=False)


def test_real_file_with_one_changed_pixel_fails_verification(tmp_path: Path) -> None:
    shutil.copytree(EMBEDDED_MNIST, tmp_path / "mnist")
    target = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    content = bytearray(gzip.decompress(target.read_bytes()))
    content[5000] ^= 1
    target.chmod(0o644)
    target.write_bytes(gzip.compress(bytes(content), compresslevel=1))
    with pytest.raises(DataError, match=f"^{target}: checksum mismatch"):
        load_builtin("mnist", tmp_path, download=False)


def test_image_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "mnist", 5, 3, n_test_labels=4)
    folder_path = tmp_path / "mnist"
    with pytest.raises(DataError) as info:
        load_builtin("mnist", tmp_path, download=False, verify=False)
    assert (f"{folder_path / 't10k-images-idx3-ubyte.gz'} holds 3 images but "
            f"{folder_path / 't10k-labels-idx1-ubyte.gz'} holds 4 labels") in str(info.value)


def test_label_out_of_range_and_wrong_shapes(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "a" / "mnist", 5, 3, label=10)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: label 10 out of range \(expected 0 to 9\)"):
        load_builtin("mnist", tmp_path / "a", download=False, verify=False)
    write_idx_set(tmp_path / "b" / "mnist", 5, 3)
    (tmp_path / "b" / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(idx_bytes(np.zeros((5, 2), np.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: expected uint8 labels of shape \[N\]"):
        load_builtin("mnist", tmp_path / "b", download=False, verify=False)


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(DataError, match="unknown data set 'cifar' \\(known: mnist, fashion-mnist\\)"):
        load_builtin("cifar")


def test_missing_files_offline_name_expected_paths(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(DataError) as info:
        load_builtin("fashion-mnist", tmp_path, download=False)
    message = str(info.value)
    for name in MNIST_FILES:
        assert str(tmp_path / "fashion-mnist" / f"{name}.gz") in message
    assert "download disabled" in message and "TRAINFORGE_DATA" in message and "--data-dir" in message
    assert no_network == []


def test_missing_files_download_fails_after_retries(tmp_path: Path, no_network: list[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(sources.time, "sleep", sleeps.append)
    shutil.copytree(EMBEDDED_MNIST, tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_builtin("mnist", tmp_path)
    message = str(info.value)
    assert f"missing {tmp_path / 'mnist' / 't10k-labels-idx1-ubyte.gz'} (download failed: " in message
    primary, secondary = BUILTIN_DATASETS["mnist"].mirrors
    assert (f"{primary}t10k-labels-idx1-ubyte.gz: network disabled in tests (3 attempts); "
            f"{secondary}t10k-labels-idx1-ubyte.gz: network disabled in tests (3 attempts)") in message
    assert "TRAINFORGE_DATA" in message
    # Only the missing file is fetched: 3 attempts on each of the 2 mirrors, with exponential backoff.
    assert no_network == [f"{base}t10k-labels-idx1-ubyte.gz" for base in BUILTIN_DATASETS["mnist"].mirrors
                          for _ in range(3)]
    assert sleeps == [1.0, 2.0, 1.0, 2.0]
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(f"{n}.gz" for n in MNIST_FILES[:3])
    # With all four missing, a mirror that was unreachable for the first file is not tried (and waited on) again.
    no_network.clear()
    sleeps.clear()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: skipped, unreachable for an earlier file"):
        load_builtin("mnist", tmp_path / "empty")
    assert len(no_network) == 6 and sleeps == [1.0, 2.0, 1.0, 2.0]


@pytest.fixture
def no_explicit_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No --data-dir or $TRAINFORGE_DATA, an empty home (so an empty user cache) and an empty system root."""
    monkeypatch.delenv("TRAINFORGE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sources, "SYSTEM_ROOT", tmp_path / "system")
    return tmp_path


def test_without_a_root_and_offline_mnist_is_read_from_the_package(no_explicit_root: Path,
                                                                    no_network: list[str]) -> None:
    located = sources.locate_builtin("mnist")
    assert located.kind == "embedded" and located.folder == sources.EMBEDDED_ROOT / "mnist"
    train, test = load_builtin("mnist")
    # The same files decompressed into an explicit root: the in-place read of the .gz files gives the same tensors.
    (no_explicit_root / "ref" / "mnist").mkdir(parents=True)
    for name in MNIST_FILES:
        (no_explicit_root / "ref" / "mnist" / name).write_bytes(read_idx_bytes(EMBEDDED_MNIST / f"{name}.gz"))
    reference_train, reference_test = load_builtin("mnist", no_explicit_root / "ref")
    assert torch.equal(train.images, reference_train.images) and torch.equal(test.labels, reference_test.labels)
    # Read in place: nothing downloaded, nothing copied into the (empty) home.
    assert no_network == [] and not (no_explicit_root / "home").exists()


def test_a_corrupt_embedded_copy_is_a_checksum_error(no_explicit_root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    embedded = no_explicit_root / "embedded"
    shutil.copytree(sources.EMBEDDED_ROOT / "mnist", embedded / "mnist")
    target = embedded / "mnist" / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(target.read_bytes()))
    content[100] = (content[100] + 1) % 10
    target.write_bytes(gzip.compress(bytes(content), compresslevel=1))
    monkeypatch.setattr(sources, "EMBEDDED_ROOT", embedded)
    with pytest.raises(DataError, match=f"^{target}: checksum mismatch .*the installed trainforge package is "
                                        "damaged: reinstall it"):
        load_builtin("mnist")


def test_search_order_cache_then_system_then_package(no_explicit_root: Path) -> None:
    # Locating looks for the four files only (their content is checked when loaded), so MNIST's files stand in for
    # Fashion-MNIST's here.
    link_set(EMBEDDED_MNIST, no_explicit_root / "system" / "fashion-mnist")
    assert sources.locate_builtin("mnist").kind == "embedded"
    link_set(EMBEDDED_MNIST, no_explicit_root / "system" / "mnist")
    assert sources.locate_builtin("fashion-mnist").kind == "system"
    assert sources.locate_builtin("mnist").kind == "system"
    link_set(EMBEDDED_MNIST, no_explicit_root / "home" / ".cache" / "trainforge" / "mnist")
    located = sources.locate_builtin("mnist")
    assert located.kind == "cache" and located.folder == no_explicit_root / "home" / ".cache" / "trainforge" / "mnist"


def test_an_explicit_root_is_authoritative(no_explicit_root: Path, monkeypatch: pytest.MonkeyPatch,
                                           no_network: list[str]) -> None:
    """A mistyped root must not silently train on the package's copy: it is searched alone, and downloaded into."""
    monkeypatch.setenv("TRAINFORGE_DATA", str(no_explicit_root / "typo"))
    with pytest.raises(DataError, match=f"mnist: missing {no_explicit_root / 'typo' / 'mnist'}.*download failed"):
        load_builtin("mnist")
    assert no_network and all("mnist" in url for url in no_network)


def test_fashion_mnist_missing_everywhere_names_the_apt_package(no_explicit_root: Path) -> None:
    with pytest.raises(DataError) as info:
        load_builtin("fashion-mnist", download=False)
    message = str(info.value)
    assert str(no_explicit_root / "home" / ".cache" / "trainforge" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz") \
        in message
    assert f"also looked in {no_explicit_root / 'system' / 'fashion-mnist'}" in message
    assert "apt-get install dataset-fashion-mnist" in message and "embedded" not in message


def test_the_wheel_carries_the_embedded_mnist(tmp_path: Path) -> None:
    """`pip install .` (not only -e) must ship the data: build the wheel and check its files' content."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(repo)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("trainforge-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "trainforge/data/embedded/README.md" in names
        for name in MNIST_FILES:
            content = gzip.decompress(archive.read(f"trainforge/data/embedded/mnist/{name}.gz"))
            assert hashlib.sha256(content).hexdigest() == BUILTIN_DATASETS["mnist"].sha256[name]


class FakeMirror:
    """Serves the package's MNIST .gz files at the mirrors' URLs, failing as told; records what was asked."""

    def __init__(self, dest: Path, failures: dict[str, list[object]]) -> None:
        self.dest = dest
        self.failures = failures  # url -> what to do on successive calls: an exception, bytes to serve, or None
        self.calls: list[str] = []

    def __call__(self, request: urllib.request.Request, timeout: float | None = None) -> io.BytesIO:
        url = request.full_url
        assert timeout is not None and timeout > 0
        self.calls.append(url)
        name = url.rsplit("/", 1)[1]
        # The final file must not appear before its download is complete and checked.
        assert not (self.dest / name).exists()
        plan = self.failures.get(url, [])
        action = plan.pop(0) if plan else None
        if isinstance(action, Exception):
            raise action
        return io.BytesIO(action if isinstance(action, bytes) else (EMBEDDED_MNIST / name).read_bytes())


def test_download_retries_checks_and_writes_atomically(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    info = BUILTIN_DATASETS["mnist"]
    primary, secondary = info.mirrors
    # The package's files were recompressed, so their MD5 differs from the mirrors'; expect theirs in this test.
    for name in MNIST_FILES:
        served = (EMBEDDED_MNIST / f"{name}.gz").read_bytes()
        monkeypatch.setitem(info.md5, f"{name}.gz", hashlib.md5(served).hexdigest())
    good_labels = (EMBEDDED_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()
    mirror = FakeMirror(tmp_path / "mnist", {
        f"{primary}train-labels-idx1-ubyte.gz": [urllib.error.URLError("timed out"), TimeoutError("slow")],
        f"{primary}t10k-labels-idx1-ubyte.gz": [good_labels[:-100]],  # damaged in transit: next mirror at once
        f"{primary}t10k-images-idx3-ubyte.gz": [urllib.error.HTTPError("u", 404, "Not Found", {}, None)],
    })
    monkeypatch.setattr(urllib.request, "urlopen", mirror)
    train, test = load_builtin("mnist", tmp_path)
    assert train.images.shape == (60000, 1, 28, 28) and test.labels.shape == (10000,)
    assert mirror.calls == [
        f"{primary}train-images-idx3-ubyte.gz",
        f"{primary}train-labels-idx1-ubyte.gz", f"{primary}train-labels-idx1-ubyte.gz",
        f"{primary}train-labels-idx1-ubyte.gz",
        f"{primary}t10k-images-idx3-ubyte.gz", f"{secondary}t10k-images-idx3-ubyte.gz",
        f"{primary}t10k-labels-idx1-ubyte.gz", f"{secondary}t10k-labels-idx1-ubyte.gz",
    ]
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(f"{n}.gz" for n in MNIST_FILES)
    for name in MNIST_FILES:
        downloaded = tmp_path / "mnist" / f"{name}.gz"
        assert downloaded.read_bytes() == (EMBEDDED_MNIST / f"{name}.gz").read_bytes()
        assert downloaded.stat().st_mode & 0o777 == 0o644


def test_download_with_wrong_content_leaves_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Served as-is, the package's recompressed files fail the canonical MD5 check.
    mirror = FakeMirror(tmp_path / "mnist", {})
    monkeypatch.setattr(urllib.request, "urlopen", mirror)
    with pytest.raises(DataError, match="wrong content \\(MD5 c7dfcf1bfd3481a40f7b3aedbdbd083c, expected f68b3c2d"):
        load_builtin("mnist", tmp_path)
    # A right MD5 does not excuse wrong content: the decompressed SHA-256 is checked too.
    fake = gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    for name in MNIST_FILES:
        monkeypatch.setitem(BUILTIN_DATASETS["mnist"].md5, f"{name}.gz", hashlib.md5(fake).hexdigest())
    mirror = FakeMirror(tmp_path / "mnist", {f"{base}{n}.gz": [fake] for base in BUILTIN_DATASETS["mnist"].mirrors
                                             for n in MNIST_FILES})
    monkeypatch.setattr(urllib.request, "urlopen", mirror)
    with pytest.raises(DataError, match="wrong content \\(decompressed SHA-256 .*, expected ba891046"):
        load_builtin("mnist", tmp_path)
    assert list((tmp_path / "mnist").iterdir()) == []


# ---- image folders -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(mnist) -> dict[int, torch.Tensor]:
    """Four real MNIST test digits of each of the classes 0, 1 and 2, as uint8 [1, 28, 28]."""
    images, labels = mnist.test.images[:200], mnist.test.labels[:200]
    return {c: images[labels == c][:4].clone() for c in range(3)}


def write_class(root: Path, name: str, images: torch.Tensor) -> list[Path]:
    """Writes PNGs and, for odd indices, JPEGs with varied suffix case."""
    (root / name).mkdir(parents=True)
    paths = []
    for i, image in enumerate(images):
        if i % 2 == 0:
            path = root / name / f"{i}.png"
            write_png(image, str(path))
        else:
            path = root / name / f"{i}.{'JPG' if i % 4 == 1 else 'jpeg'}"
            path.write_bytes(encode_jpeg(image, quality=95).numpy().tobytes())
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path, digits: dict[int, torch.Tensor]) -> Path:
    root = tmp_path / "digits"
    for c, images in digits.items():
        write_class(root, f"class{c}", images)
    (root / "class0" / "notes.txt").write_text("not an image")
    return root


def test_scan_lists_classes_and_files(image_folder: Path) -> None:
    train, val, classes = scan_image_folder(image_folder)
    assert classes == ["class0", "class1", "class2"] and val is None
    assert len(train) == 12 and [label for _, label in train] == [0] * 4 + [1] * 4 + [2] * 4
    assert {p.suffix for p, _ in train} == {".png", ".JPG", ".jpeg"}


def test_load_folder_with_seeded_stratified_split(image_folder: Path, digits: dict[int, torch.Tensor]) -> None:
    train, val = load_image_folder(image_folder, val_fraction=0.25, seed=0)
    assert train.images.shape == (9, 1, 28, 28) and val.images.shape == (3, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert sorted(val.labels.tolist()) == [0, 1, 2] and train.classes == ["class0", "class1", "class2"]
    again_train, again_val = load_image_folder(image_folder, val_fraction=0.25, seed=0)
    assert torch.equal(again_train.images, train.images) and torch.equal(again_val.labels, val.labels)
    # PNGs decode losslessly: every class-0 PNG digit is found among the loaded images.
    loaded = torch.cat([train.images, val.images])
    for i in (0, 2):
        assert any(torch.equal(digits[0][i], image) for image in loaded)


def test_split_is_reproducible_and_stratified(image_folder: Path) -> None:
    files, _, _ = scan_image_folder(image_folder)
    files = files + [(Path(f"extra{i}.png"), 1) for i in range(16)]  # class 1 now has 20 files
    splits = {seed: split_stratified(files, 0.2, seed) for seed in range(6)}
    assert split_stratified(files, 0.2, 3) == splits[3]
    assert len({tuple(val) for _, val in splits.values()}) > 1  # different seeds, different splits
    for train, val in splits.values():
        assert sorted(train + val, key=str) == sorted(files, key=str)
        assert [label for _, label in val].count(1) == 4  # 20 * 0.2
        assert [label for _, label in val].count(0) == 1  # round(0.8) = 1
    single = [(Path("a.png"), 0), (Path("b.png"), 1), (Path("c.png"), 1)]
    assert split_stratified(single, 0.1, 0)[1] in ([(Path("b.png"), 1)], [(Path("c.png"), 1)])
    assert split_stratified(files, 0.0, 0) == (files, [])


def test_load_folder_with_train_and_val(tmp_path: Path, digits: dict[int, torch.Tensor]) -> None:
    root = tmp_path / "split"
    for c in range(3):
        write_class(root / "train", str(c), digits[c][:3])
        write_class(root / "val", str(c), digits[c][3:])
    train, val = load_image_folder(root, image_size=14, channels=3)
    assert train.images.shape == (9, 3, 14, 14) and val.images.shape == (3, 3, 14, 14)
    assert val.labels.tolist() == [0, 1, 2] and val.classes == ["0", "1", "2"]
    shutil.rmtree(root / "val" / "2")
    write_class(root / "val", "7", digits[2][3:])
    with pytest.raises(DataError, match=r"train/ and val/ have different class folders \(only in val/: 7; "
                                        r"only in train/: 2\)"):
        load_image_folder(root)


def test_default_size_and_channels(tmp_path: Path, digits: dict[int, torch.Tensor]) -> None:
    root = tmp_path / "mixed"
    write_class(root, "a", digits[0][:2])
    (root / "b").mkdir()
    big_rgb = torch.nn.functional.interpolate(digits[1][:1].float(), size=(40, 40)).to(torch.uint8)[0]
    write_png(big_rgb.expand(3, -1, -1).contiguous(), str(root / "b" / "x.png"))
    train, val = load_image_folder(root, val_fraction=0)
    # Size of the first image; one sampled RGB file makes the whole set RGB.
    assert train.images.shape == (3, 3, 28, 28) and val.images.shape == (0, 3, 28, 28)
    gray, _ = load_image_folder(root, channels=1, val_fraction=0)
    assert gray.images.shape == (3, 1, 28, 28)
    assert estimate_folder_bytes(scan_image_folder(root)[0], 28, 3) == 3 * 3 * 28 * 28


def test_folder_errors_name_the_culprit(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(DataError, match=f"^{tmp_path / 'absent'}: image folder not found"):
        load_image_folder(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        load_image_folder(tmp_path / "file")
    (tmp_path / "loose").mkdir()
    write_png(torch.zeros(1, 4, 4, dtype=torch.uint8), str(tmp_path / "loose" / "a.png"))
    with pytest.raises(DataError, match="no class folders .*images found directly in it"):
        load_image_folder(tmp_path / "loose")
    (image_folder / "class3").mkdir()
    (image_folder / "class3" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=f"^{image_folder / 'class3'}: empty class folder"):
        load_image_folder(image_folder)
    (image_folder / "class3" / "broken.png").write_bytes(b"\x89PNG garbage, not an image" * 10)
    with pytest.raises(DataError, match=f"^{image_folder / 'class3' / 'broken.png'}: not an image in a supported format"):
        load_image_folder(image_folder, image_size=28, channels=1)
    (image_folder / "class3" / "broken.png").write_bytes(b"")
    with pytest.raises(DataError, match="broken.png: empty file"):
        load_image_folder(image_folder, image_size=28, channels=1)


class Indexed(torch.utils.data.Dataset):
    """Item i is (a 1x1x1 image holding i, label i): labels identify samples."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 1, 1), i, dtype=torch.uint8), i


def epoch_labels(loader: StreamingLoader) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader]


def test_streaming_loader_epochs_and_shards() -> None:
    data = Indexed(23)
    one = streaming_loader(data, batch_size=6, shuffle=True, seed=5, device="cpu", num_workers=0)
    first, second = epoch_labels(one), epoch_labels(one)
    assert len(one) == 4 and [len(b) for b in first] == [6, 6, 6, 5]
    assert sorted(sum(first, [])) == list(range(23)) and first != second
    same = streaming_loader(data, batch_size=6, shuffle=True, seed=5, device="cpu", num_workers=0)
    assert epoch_labels(same) == first
    same.set_epoch(1)
    assert epoch_labels(same) == second
    other = streaming_loader(data, batch_size=6, shuffle=True, seed=6, device="cpu", num_workers=0)
    assert epoch_labels(other) != first
    ranks = [streaming_loader(data, batch_size=6, shuffle=True, seed=5, device="cpu", num_workers=0, rank=r,
                              world_size=2) for r in range(2)]
    shards = [epoch_labels(r) for r in ranks]
    assert [len(s) for s in shards] == [4, 4]
    for batch, a, b in zip(first, *shards, strict=True):
        assert a == batch[0::2] and b == batch[1::2]
    # A last global batch smaller than world_size is dropped so all ranks take the same number of steps.
    tail = [streaming_loader(Indexed(13), batch_size=6, shuffle=False, seed=0, device="cpu", num_workers=0,
                             rank=r, world_size=2) for r in range(2)]
    assert [len(t) for t in tail] == [2, 2]
    dropped = streaming_loader(data, batch_size=6, shuffle=False, seed=0, device="cpu", num_workers=0, drop_last=True)
    assert epoch_labels(dropped) == [list(range(i, i + 6)) for i in (0, 6, 12)]


def test_folder_dataset_streams_with_workers(image_folder: Path) -> None:
    files, _, classes = scan_image_folder(image_folder)
    dataset = FolderDataset(files, image_size=16, channels=1)
    image, label = dataset[5]
    assert image.shape == (1, 16, 16) and image.dtype == torch.uint8 and label == 1
    loader = streaming_loader(dataset, batch_size=5, shuffle=True, seed=0, device="cpu", num_workers=2)
    batches = list(loader)
    assert [tuple(images.shape) for images, _ in batches] == [(5, 1, 16, 16), (5, 1, 16, 16), (2, 1, 16, 16)]
    assert all(labels.dtype == torch.int64 for _, labels in batches)
    assert sorted(torch.cat([labels for _, labels in batches]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    broken = image_folder / "class2" / "zz.png"
    broken.write_bytes(b"garbage")
    files, _, _ = scan_image_folder(image_folder)
    loader = streaming_loader(FolderDataset(files, 16, 1), batch_size=4, shuffle=False, seed=0, device="cpu",
                              num_workers=2)
    # One line naming the file, not the worker's traceback. (Not kept `as info`: the test frame would then be in
    # a reference cycle with the error and hold the workers until a garbage collection.)
    with pytest.raises(DataError, match=rf"\A{re.escape(str(broken))}: not an image in a supported format[^\n]*\Z"):
        list(loader)


def _digit_folder(root, mnist_set, per_class=12):
    """A folder of real MNIST digits as PNG files, one sub-folder per class."""
    for label in range(3):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        idx = torch.nonzero(mnist_set.labels == label).flatten()[:per_class]
        for i in idx.tolist():
            write_png(mnist_set.images[i], str(folder / f"{i}.png"))
    return root


@pytest.mark.parametrize("loader", ["device", "streaming"])
def test_training_on_an_image_folder_resident_or_streamed(tmp_path, loader, mnist):
    import trainforge
    from trainforge.data import load_data

    train = mnist.train
    folder = _digit_folder(tmp_path / "digits", train)
    bundle = load_data(str(folder), val_fraction=0.25, loader=loader)
    assert (bundle.stream is not None) == (loader == "streaming")
    assert bundle.in_channels == 1 and bundle.image_size == 28 and bundle.classes == ["class0", "class1", "class2"]
    result = trainforge.train({"data": str(folder), "model": "linear", "epochs": 3, "batch_size": 9,
                               "loader": loader, "workers": 0, "augment": "translate", "val_fraction": 0.25,
                               "out": str(tmp_path / loader), "tensorboard": False}, progress=False)
    # Digits 0, 1 and 2 are easy: 9 steps reach all 9 held-out images at seed 0; chance is a third.
    assert result.steps == 3 * 3 and result.test_acc >= 0.75, result
    model = trainforge.load(tmp_path / loader)
    assert model.classes == ["class0", "class1", "class2"]


def test_folder_subset_larger_than_the_folder_is_an_error(tmp_path, mnist):
    from trainforge.data import load_data

    train = mnist.train
    folder = _digit_folder(tmp_path / "digits", train, per_class=4)
    with pytest.raises(DataError, match="--subset 100 exceeds"):
        load_data(str(folder), subset=100)


def test_device_loader_epochs_are_seeded_permutations_that_resume_mid_epoch(mnist) -> None:
    from trainforge.data.loaders import DeviceLoader

    images, labels = mnist.train.images[:5000], mnist.train.labels[:5000]
    loader = DeviceLoader(images, labels, 512, device=torch.device("cpu"), seed=3)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 10 and len(batches[-1][1]) == 5000 - 9 * 512
    assert all(x.dtype == torch.uint8 and x.device.type == "cpu" for x, _ in batches)
    # Each image exactly once per epoch, with its own label.
    seen = torch.cat([x.flatten(1) for x, _ in batches])
    assert torch.equal(seen.sum(0, dtype=torch.int64), images.flatten(1).sum(0, dtype=torch.int64))
    assert torch.equal(torch.cat([y for _, y in batches]).bincount(), labels.bincount())
    loader.set_epoch(0, start_step=7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(list(loader), batches[7:]))
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], batches[0][0])


def test_large_seeds_augment_a_streamed_folder(tmp_path, mnist):
    """--seed up to 2**32 - 1 with --augment on a streamed folder: the per-batch augmentation seed is wrapped to the
    64 bits a generator takes (it overflowed manual_seed from about 1.9e8 on)."""
    from trainforge.data import load_data, make_train_loader
    from trainforge.data.loaders import augment_seed

    train = mnist.train
    bundle = load_data(str(_digit_folder(tmp_path / "digits", train, per_class=4)), loader="streaming",
                       val_fraction=0.25)
    seed = 2 ** 32 - 1
    loader = make_train_loader(bundle, 3, device=torch.device("cpu"), seed=seed, augment="translate", workers=0)
    batches = [images for images, _ in loader]
    assert len(batches) == 3 and all(b.shape == (3, 1, 28, 28) for b in batches)
    assert 0 <= augment_seed(seed, 7, 10 ** 6) < 2 ** 64
    assert augment_seed(1, 2, 3) == (1 * 1_000_003 + 2) * 100_003 + 3  # small seeds: the draws of earlier runs
