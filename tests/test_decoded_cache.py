"""The decoded-image cache: a folder decoded once, reused while its files are unchanged, decoded again when they
change or the cache is damaged, and never used half-written; where it cannot be written, decoding falls back to
memory. Each test works on a small folder of real digits as photo-like JPEGs, in a cache directory of its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mnist_made
import pytest
import torch
from conftest import REPO, run_cli
from PIL import Image

from trainforge.data import load_data, make_train_loader
from trainforge.data.cache import FULL_ENV, cache_entries, decode_folder
from trainforge.data.folder import FolderDataset, decode_files, scan_image_folder
from trainforge.data.loaders import CachedRows
from trainforge.errors import DataError

SIZE = 32


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TRAINFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "decoded"


@pytest.fixture
def folder(tmp_path, mnist) -> Path:
    """train/ with 4 JPEGs of 64 px per class, val/ with 2."""
    return mnist_made.write_split_folder(tmp_path / "photos", mnist_made.subset(mnist, 40, 20, seed=3), fmt="jpeg",
                                         size=64)


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def decoded_directly(root: Path, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder's train and val images decoded in this process, with no cache: what every load must give."""
    train, val, classes = scan_image_folder(root)
    return (decode_files(train, (size, size), 3, classes, workers=1).images,
            decode_files(val, (size, size), 3, classes, workers=1).images)


def entry_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.is_dir() else []


def test_second_load_is_a_cache_hit_that_leaves_the_cache_and_the_folder_untouched(cache, folder):
    before = listing(folder)
    first = load_data(str(folder), image_size=SIZE)
    assert first.note.startswith(f"decoded 60 images to {SIZE}x{SIZE}x3 in ") and "cached at" in first.note
    [array] = cache.glob("*.npy")
    stat = array.stat()
    second = load_data(str(folder), image_size=SIZE)
    assert second.note.startswith(f"decoded cache hit: {array} ")
    assert (array.stat().st_ino, array.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    train, val = decoded_directly(folder)
    for bundle in (first, second):
        assert torch.equal(bundle.train.images, train) and torch.equal(bundle.test.images, val)
    assert listing(folder) == before  # nothing written into the user's folder
    [row] = cache_entries()
    assert row["folder"] == str(folder.resolve()) and row["images"] == 60 and row["bytes"] == stat.st_size


def change_one_file(path: Path) -> None:
    Image.new("RGB", (64, 64), (200, 30, 90)).save(path, quality=90)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))


@pytest.mark.parametrize("change", ["changed", "added", "removed"])
def test_a_changed_added_or_removed_file_invalidates_the_cache(cache, folder, change):
    load_data(str(folder), image_size=SIZE)
    target = sorted((folder / "train" / "3").iterdir())[0]
    if change == "changed":
        change_one_file(target)
    elif change == "added":
        change_one_file(target.with_name("new.jpg"))
    else:
        target.unlink()
    again = load_data(str(folder), image_size=SIZE)
    counts = {kind: int(kind == change) for kind in ("changed", "added", "removed")}
    assert again.note.startswith("the folder changed since it was decoded "
                                 f"({counts['changed']} changed, {counts['added']} added, {counts['removed']} "
                                 f"removed); decoded {60 + counts['added'] - counts['removed']} images")
    train, val = decoded_directly(folder)
    assert torch.equal(again.train.images, train) and torch.equal(again.test.images, val)
    assert load_data(str(folder), image_size=SIZE).note.startswith("decoded cache hit")


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_a_damaged_cache_is_decoded_again_never_used(cache, folder, damage):
    load_data(str(folder), image_size=SIZE)
    [array] = cache.glob("*.npy")
    data = bytearray(array.read_bytes())
    if damage == "truncated":
        array.write_bytes(data[: len(data) - 1000])
    else:
        data[len(data) // 2] ^= 0xFF
        array.write_bytes(data)
    again = load_data(str(folder), image_size=SIZE)
    reason = "is damaged" if damage == "truncated" else "does not match its checksum"
    assert again.note.startswith(f"{array} {reason}") and "cached at" in again.note
    train, val = decoded_directly(folder)
    assert torch.equal(again.train.images, train) and torch.equal(again.test.images, val)


def test_an_unwritable_cache_falls_back_to_memory(tmp_path, monkeypatch, folder):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    monkeypatch.setenv("TRAINFORGE_CACHE", str(blocker))
    bundle = load_data(str(folder), image_size=SIZE)
    assert bundle.note.startswith(f"the decoded-image cache {blocker / 'decoded'} is not writable (")
    assert bundle.note.endswith(" s") and "decoded 60 images into memory in" in bundle.note
    train, val = decoded_directly(folder)
    assert torch.equal(bundle.train.images, train) and torch.equal(bundle.test.images, val)
    # Too large to hold and no cache: the training images are decoded from their files batch by batch.
    streamed = load_data(str(folder), image_size=SIZE, loader="streaming")
    assert isinstance(streamed.stream, FolderDataset) and "decoded from their files in every epoch" in streamed.note


def test_a_full_disk_falls_back_to_memory_and_leaves_no_partial_file(cache, folder, monkeypatch):
    monkeypatch.setenv(FULL_ENV, "1")
    bundle = load_data(str(folder), image_size=SIZE)
    assert bundle.note.startswith("no room for the decoded-image cache ") and "No space left on device" in bundle.note
    assert entry_files(cache) == []
    train, _ = decoded_directly(folder)
    assert torch.equal(bundle.train.images, train)


def test_a_file_changing_while_it_is_decoded_is_decoded_again(cache, folder, monkeypatch):
    from trainforge.data import folder as folder_module

    target = sorted((folder / "train" / "0").iterdir())[1]
    load = folder_module._load
    changed = []

    def load_then_change(path, size, channels):
        image = load(path, size, channels)
        if path == target and not changed:  # the old pixels are decoded, then the file is replaced
            change_one_file(path)
            changed.append(path)
        return image

    monkeypatch.setattr(folder_module, "_load", load_then_change)
    files = [path for path, _ in scan_image_folder(folder)[0]]
    decoded = decode_folder(folder, files, (SIZE, SIZE), 3, workers=1)
    assert changed == [target]
    want = decode_files([(target, 0)], (SIZE, SIZE), 3, ["0"], workers=1).images[0]
    assert torch.equal(decoded.images[files.index(target)], want)
    assert decode_folder(folder, files, (SIZE, SIZE), 3, workers=1).note.startswith("decoded cache hit")


def test_a_killed_decode_leaves_nothing_that_reads_as_a_cache(cache, folder):
    marker = cache.parent / "decoding"
    # Decodes in this test's cache, signalling from inside the third image's decode and then stalling there.
    script = (
        "import sys, time, pathlib\n"
        "from trainforge.data import folder, load_data\n"
        "load, seen = folder._load, []\n"
        "def slow(path, size, channels):\n"
        "    seen.append(path)\n"
        "    if len(seen) == 3:\n"
        f"        pathlib.Path({str(marker)!r}).touch()\n"
        "        time.sleep(600)\n"
        "    return load(path, size, channels)\n"
        "folder._load = slow\n"
        f"load_data({str(folder)!r}, image_size={SIZE})\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the decoding process never started decoding"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and the decoding processes it forked
        proc.wait(timeout=60)
    names = entry_files(cache)
    assert len(names) == 1 and names[0].endswith(".part"), names  # no .npy and no .json: nothing to read
    bundle = load_data(str(folder), image_size=SIZE)
    train, _ = decoded_directly(folder)
    assert torch.equal(bundle.train.images, train)
    assert [Path(n).suffix for n in entry_files(cache)] == [".json", ".npy"]  # the partial file is gone


def test_a_streamed_folder_is_gathered_from_the_memory_mapped_cache(cache, folder):
    bundle = load_data(str(folder), image_size=SIZE, loader="streaming", subset=20)  # rows scattered over the file
    assert isinstance(bundle.stream, CachedRows) and bundle.train.images.shape == (0, 3, SIZE, SIZE)
    loader = make_train_loader(bundle, 8, device=torch.device("cpu"), seed=0, augment="none")
    images, labels = map(torch.cat, zip(*loader))
    train, _ = decoded_directly(folder)
    want = train[bundle.stream.rows]
    assert len(images) == 20 and all(bool((want == image).flatten(1).all(1).any()) for image in images)
    assert sorted(labels.tolist()) == sorted(bundle.train.labels.tolist())


def test_datasets_lists_the_caches_and_clear_cache_removes_only_them(tmp_path, folder):
    root = tmp_path / "own-cache"
    env = {"TRAINFORGE_CACHE": str(root)}
    (root / "mnist").mkdir(parents=True)
    (root / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"a downloaded set")
    (root / "hw-host-0123.json").write_text("{}")
    load = run_cli("train", "--data", str(folder), "--model", "linear", "--image-size", str(SIZE), "--epochs", "1",
                   "--out", str(tmp_path / "run"), "--no-tensorboard", env=env)
    assert load.returncode == 0, load.stderr
    listed = run_cli("datasets", "--no-verify", "--json", env=env)
    caches = __import__("json").loads(listed.stdout.strip().splitlines()[-1])["decoded_caches"]
    assert [(c["folder"], c["size"], c["images"]) for c in caches] == [(str(folder.resolve()), [SIZE, SIZE], 60)]
    cleared = run_cli("datasets", "--no-verify", "--clear-cache", env=env)
    assert cleared.returncode == 0 and "removed 3 files of decoded-image caches" in cleared.stdout
    assert "no decoded-image caches in" in cleared.stdout
    assert sorted(p.name for p in root.rglob("*")) == ["decoded", "hw-host-0123.json", "mnist",
                                                       "train-images-idx3-ubyte.gz"]


def test_training_and_eval_say_whether_the_cache_was_hit(cache, folder, tmp_path, capsys):
    import trainforge
    from trainforge.eval import evaluate_run

    options = {"data": str(folder), "model": "linear", "image_size": SIZE, "epochs": 1, "tensorboard": False}
    trainforge.train({**options, "out": str(tmp_path / "one")}, progress=True)
    err = capsys.readouterr().err
    assert "decoding 60 images to 32x32x3 in " in err and " process" in err and ": about " in err
    assert "data: decoded 60 images to 32x32x3 in " in err
    trainforge.train({**options, "out": str(tmp_path / "two")}, progress=True)
    err = capsys.readouterr().err
    assert "data: decoded cache hit: " in err and "training images resident (counted)" in err
    assert "decoding" not in err
    shutil.rmtree(cache)  # eval decodes what it needs with the same line
    evaluate_run(tmp_path / "one", progress=True)
    assert "decoding 60 images to 32x32x3 in " in capsys.readouterr().err


def test_fine_tuning_decodes_a_folder_at_the_networks_input_size(cache, mnist_jpeg_folder, small_cnn_run, tmp_path):
    from trainforge.eval import evaluate_run
    from trainforge.finetune import finetune

    result = finetune({"source": str(small_cnn_run), "strategy": "linear-probe"},
                      {"data": str(mnist_jpeg_folder), "epochs": 1, "out": str(tmp_path / "tuned"),
                       "tensorboard": False}, progress=False)
    assert result["image_size"] == 28
    assert [(row["size"], row["channels"]) for row in cache_entries()] == [([28, 28], 3)]  # not the files' 128 px
    evaluate_run(tmp_path / "tuned")  # the recorded size: eval reads the same decoded images
    assert [(row["size"], row["channels"]) for row in cache_entries()] == [([28, 28], 3)]


def test_a_bad_file_is_named_and_nothing_is_cached(cache, folder):
    bad = folder / "train" / "1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=f"^{bad}: "):
        load_data(str(folder), image_size=SIZE)
    assert entry_files(cache) == []


def test_the_decode_estimate_leaves_the_processes_start_up_out():
    from trainforge.data.folder import _decode_estimate

    # 2 processes, 125 chunks: 0.5 s to the third chunk's end, of which one round (2 chunks) took 0.05 s.
    assert _decode_estimate(0.5, 0.05, 3, 125, 2) == pytest.approx(0.5 + 0.05 * 61)
    assert _decode_estimate(0.1, 0.0, 2, 2, 2) == pytest.approx(0.1)  # a single round: what it took
