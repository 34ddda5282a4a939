"""Tests of trainforge.runs: the run directory's claim (lock, no silent overwrite), model.json's bounds, and a run
directory written by an earlier trainforge (tests/fixtures/legacy_run) that still loads, evaluates and resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_main, wait_for

from trainforge import runs
from trainforge.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]
# Every test here is one of those `mutmut run` measures (pyproject.toml, [tool.mutmut]).
pytestmark = pytest.mark.checkpoints


def hold_lock_then(run_dir: Path, action: str) -> subprocess.Popen:
    """A process that claims `run_dir`, prints 'held', then waits (action 'wait') or kills itself ('die')."""
    code = (f"import os, signal, pathlib; from trainforge import runs; runs.prepare_run_dir(pathlib.Path({str(run_dir)!r}))"
            f"; print('held', flush=True); "
            + ("os.kill(os.getpid(), signal.SIGKILL)" if action == "die" else "import time; time.sleep(60)"))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_claim_names_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock_then(run_dir, "wait")
    try:
        with pytest.raises(ConfigError, match=f"{run_dir} is in use by another training \\(pid {holder.pid} on host"):
            runs.prepare_run_dir(run_dir)
    finally:
        holder.kill()
        holder.wait()
    dead = hold_lock_then(run_dir, "die")
    assert dead.wait() == -signal.SIGKILL and (run_dir / runs.LOCK_FILE).exists()
    lock = runs.prepare_run_dir(run_dir)
    assert json.loads((run_dir / runs.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / runs.LOCK_FILE).exists()


def test_a_lock_from_another_host_is_reported_with_how_to_remove_it(tmp_path):
    (tmp_path / runs.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 7}))
    with pytest.raises(ConfigError, match=f"locked by pid 7 on host elsewhere .* delete {tmp_path / runs.LOCK_FILE}"):
        runs.prepare_run_dir(tmp_path)


def test_a_directory_holding_a_run_is_kept_unless_overwrite(tmp_path):
    (tmp_path / runs.CONFIG_FILE).write_text("seed: 5\n")
    (tmp_path / runs.METRICS_FILE).write_text("{}\n")
    (tmp_path / runs.MODEL_FILE).write_bytes(b"weights")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"already holds a run \\(config.yaml, model.safetensors\\); continue it "
                                          f"with --resume {tmp_path}"):
        runs.prepare_run_dir(tmp_path)
    assert (tmp_path / runs.CONFIG_FILE).read_text() == "seed: 5\n" and not (tmp_path / runs.LOCK_FILE).exists()
    runs.prepare_run_dir(tmp_path, resuming=True).release()
    assert (tmp_path / runs.CONFIG_FILE).exists()
    runs.prepare_run_dir(tmp_path, overwrite=True).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


GOOD = dict(model="linear", num_classes=2, classes=["a", "b"], in_channels=1, image_size=28, mean=[0.1], std=[0.3])


@pytest.mark.parametrize("change, why", [
    (dict(image_size=10 ** 6), "field 'image_size' is 1000000, expected an integer from 1 to 4096"),
    (dict(num_classes=10 ** 9), "field 'num_classes' is 1000000000, expected an integer from 1 to 100000"),
    (dict(in_channels=2), "field 'in_channels' is 2, expected 1 or 3"),
    (dict(width=True), "field 'width' is True, expected an integer from 1 to 65536"),
    (dict(classes=["a"]), "field 'classes' must list num_classes (2) names"),
    (dict(std=[0.0]), "field 'std' must be positive"),
    (dict(mean=[float("nan")]), "field 'mean' must list 1 to 3 finite numbers"),
    (dict(mean=0.5), "field 'mean' must list 1 to 3 finite numbers"),
    (dict(mean=[0.1] * 4), "field 'mean' must list 1 to 3 finite numbers"),
    (dict(extra="x"), "field 'extra' must be a JSON object"),
    (dict(evil=1), "unknown field(s) 'evil'"),
    (dict(temperature=0), "field 'temperature' is 0, expected a finite number > 0"),
    (dict(temperature=float("inf")), "field 'temperature' is inf, expected a finite number > 0"),
    (dict(temperature="2"), "field 'temperature' is 2, expected a finite number > 0"),
    (dict(temperature="9" * 50), f"field 'temperature' is {'9' * 40}, expected a finite number > 0"),  # cut at 40
])
def test_hostile_model_descriptions_name_the_field(holdout_run, tmp_path, change, why):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in (runs.MODEL_FILE, runs.CONFIG_FILE):
        (run_dir / name).write_bytes((holdout_run / name).read_bytes())
    (run_dir / runs.MODEL_INFO).write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(CheckpointError, match=f"^{run_dir / runs.MODEL_INFO}: malformed model description"):
        runs.load(run_dir)
    with pytest.raises(CheckpointError) as info:
        runs.ModelInfo.from_values({**GOOD, **change}, "m.json")
    assert str(info.value) == f"m.json: malformed model description ({why})"


def test_the_model_descriptions_trainforge_writes_pass_the_bounds(holdout_run):
    info = runs.read_model_info(holdout_run)
    assert info.image_size == 28 and info.num_classes == 10 and runs.load(holdout_run).classes == info.classes


FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"


@pytest.fixture()
def legacy(tmp_path) -> Path:
    """A copy of the fixture (a linear model trained 2 epochs on a 2-class folder of 4x4 images), writable."""
    shutil.copytree(FIXTURE, tmp_path / "legacy")
    return tmp_path / "legacy"


def test_legacy_run_loads(legacy):
    import trainforge

    model = trainforge.load(legacy / "run")
    assert model.classes == ["dark", "light"]


def test_legacy_run_evaluates_to_its_summary(legacy):
    summary = json.loads((legacy / "run" / "summary.json").read_text())
    result = run_cli("eval", "run", "--json", cwd=legacy)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["test_acc"] == summary["test_acc"]


def test_legacy_run_resumes_with_one_line_per_old_name(legacy):
    result = run_cli("train", "--resume", "run", "--epochs", "3", "--json", "--quiet", cwd=legacy)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["steps"] == 12 and summary["epochs"] == 3.0
    lines = (legacy / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    notes = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert len(notes) == 2, result.stderr
    assert "field 'strategy' is now 'parallel'" in notes[0] and "format 1" in notes[1]
    # The resumed run rewrote its files in today's names.
    assert "parallel: ddp" in (legacy / "run" / "config.yaml").read_text()
    again = run_cli("train", "--resume", "run", "--epochs", "4", "--json", "--quiet", cwd=legacy)
    assert again.returncode == 0 and "deprecated" not in again.stderr, again.stderr


def test_old_strategy_flag_of_train_still_works(legacy):
    result = run_cli("train", "--data", "data", "--model", "linear", "--epochs", "1", "--batch-size", "4",
                     "--strategy", "ddp", "--no-tensorboard", "--out", "new", "--json", "--quiet", cwd=legacy)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("deprecated") == 1 and "--strategy is now --parallel" in result.stderr
    assert "parallel: ddp" in (legacy / "new" / "config.yaml").read_text()


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory, mnist) -> Path:
    """A linear model trained one epoch on 1,000 MNIST images, a tenth of them held out for validation."""
    import trainforge

    out = tmp_path_factory.mktemp("runs") / "holdout"
    trainforge.train({"model": "linear", "epochs": 1, "subset": 1000, "holdout": True, "out": str(out),
                      "tensorboard": False}, progress=False)
    return out


def test_load_run_data_splits_the_data_as_the_run_did(holdout_run, mnist):
    from trainforge.runs import load_run_data

    data = load_run_data(holdout_run)
    assert len(data.train.labels) == 900 and len(data.val.labels) == 100 and data.evaluation is data.val
    assert data.train.classes == data.val.classes == mnist.classes
    assert torch.equal(data.test.labels, mnist.test.labels)
    assert len(data.dataset.train.labels) == len(mnist.train.labels)
    # The held-out images are among the subset's, never among those trained on.
    trained = {bytes(x.numpy()) for x in data.train.images}
    assert not any(bytes(x.numpy()) in trained for x in data.val.images)


def test_eval_split_val_reproduces_the_validation_accuracy_the_run_reported(holdout_run, trained_run, capsys):
    summary = json.loads((holdout_run / "summary.json").read_text())
    val = run_main(capsys, "eval", str(holdout_run), "--split", "val", "--json")
    assert val.returncode == 0, val.stderr
    result = json.loads(val.stdout.splitlines()[-1])
    assert (result["split"], result["test_samples"]) == ("val", 100)
    assert result["test_acc"] == summary["test_acc"]
    test = json.loads(run_main(capsys, "eval", str(holdout_run), "--json").stdout.splitlines()[-1])
    assert (test["split"], test["test_samples"]) == ("test", 10000)
    refused = run_main(capsys, "eval", str(trained_run), "--split", "val")
    assert refused.returncode == 2 and "trained without --holdout" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def _train_argv(out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "linear", "--subset", "500", "--epochs", "1", "--no-tensorboard", "--out", str(out),
            "--json", *extra]


def _start_train(out: Path, delay: float, *extra: str) -> subprocess.Popen:
    """`trainforge train` whose every atomic write waits `delay` s before its rename (runs.WRITE_DELAY_ENV)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), runs.WRITE_DELAY_ENV: str(delay)}
    return subprocess.Popen([sys.executable, "-m", "trainforge", *_train_argv(out, *extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_out_on_a_finished_run_refuses_overwrite_replaces_and_config_reruns_elsewhere(holdout_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(holdout_run, run_dir)
    before = (run_dir / runs.METRICS_FILE).read_text()
    refused = run_main(capsys, *_train_argv(run_dir, "--seed", "5"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"--out {run_dir} already holds a run" in refused.stderr and f"--resume {run_dir}" in refused.stderr
    assert (run_dir / runs.METRICS_FILE).read_text() == before
    rerun = run_cli("train", "--config", str(run_dir / runs.CONFIG_FILE), "--json", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    new_dir = Path(json.loads(rerun.stdout.splitlines()[-1])["run_dir"])
    assert (tmp_path / new_dir).parent == tmp_path / "runs" and (run_dir / runs.METRICS_FILE).read_text() == before
    replaced = run_cli(*_train_argv(run_dir, "--seed", "5", "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr
    assert "seed: 5" in (run_dir / runs.CONFIG_FILE).read_text() and len(runs.read_metrics(run_dir)) == 1


def test_two_trainings_into_one_out_one_runs_the_other_gets_the_lock_error(tmp_path, mnist_small):
    import threading

    import trainforge
    from trainforge.train.loop import Hooks

    # The first, in this process, holds the run directory at the end of its epoch until the second has been refused.
    out, at_epoch_end, refused, result = tmp_path / "shared", threading.Event(), threading.Event(), []

    def hold(record):
        at_epoch_end.set()
        refused.wait(600)  # set once the second has returned, and run_cli gives it 300 s at most
        return False

    first = threading.Thread(target=lambda: result.append(trainforge.train(
        {"model": "linear", "epochs": 1, "out": str(out), "tensorboard": False}, data=mnist_small,
        hooks=Hooks(on_epoch=hold), progress=False)))
    first.start()
    try:
        assert at_epoch_end.wait(120), "the first training never finished its epoch"
        second = run_cli(*_train_argv(out))
    finally:
        refused.set()
        first.join(120)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"{out} is in use by another training (pid {os.getpid()} on host" in second.stderr
    (trained,) = result  # the first ran to its end and wrote its run
    assert runs.read_metrics(out)[-1]["test_acc"] == trained.test_acc > 0.5
    assert (out / runs.SUMMARY_FILE).exists() and not (out / runs.LOCK_FILE).exists()


def test_sigkill_before_the_first_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path):
    whole = run_cli(*_train_argv(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = _start_train(tmp_path / "cut", 1.0)
    # Killed while the first checkpoint's temporary file waits for its rename: config.yaml saved, no state.pt.
    wait_for(lambda: list((tmp_path / "cut").glob(".state.pt.*.tmp")), "the first checkpoint's write", timeout=120)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert (tmp_path / "cut" / runs.CONFIG_FILE).exists() and not (tmp_path / "cut" / runs.STATE_FILE).exists()
    resumed = run_cli("train", "--resume", str(tmp_path / "cut"), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "stopped before its first checkpoint; starting it over from its saved config" in resumed.stderr
    got, want = (json.loads(r.stdout.splitlines()[-1]) for r in (resumed, whole))
    assert (got["test_acc"], got["test_loss"], got["train_loss"]) == (want["test_acc"], want["test_loss"],
                                                                    want["train_loss"])


# ---- what mutation testing (mutmut, docs/RELIABILITY.md) found untested --------------------------------------------

def test_overwrite_removes_the_runs_tensorboard_logs_too(tmp_path):
    (tmp_path / runs.MODEL_FILE).write_bytes(b"weights")
    (tmp_path / "tensorboard" / "train").mkdir(parents=True)
    (tmp_path / "tensorboard" / "train" / "events.out").write_bytes(b"old curves")
    runs.prepare_run_dir(tmp_path, overwrite=True).release()
    assert list(tmp_path.iterdir()) == []


def test_default_run_dir_is_the_time_with_a_suffix_when_taken(tmp_path, monkeypatch):
    import datetime

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datetime, "datetime", Frozen)
    made = []
    for _ in range(3):
        made.append(runs.default_run_dir())
        made[-1].mkdir(parents=True)
    assert made == [Path("runs/20260102-030405"), Path("runs/20260102-030405-1"), Path("runs/20260102-030405-2")]


@pytest.fixture(scope="module")
def folder_holdout_run(tmp_path_factory, mnist_png_folder) -> Path:
    """A linear model trained one epoch on 100 of the 200 digits of a PNG folder without val/ (so --val-fraction
    and --seed choose its test images), resized to 16 px, 40% of the 100 held out for validation."""
    import trainforge

    out = tmp_path_factory.mktemp("runs") / "folder_holdout"
    trainforge.train({"model": "linear", "data": str(mnist_png_folder / "train"), "subset": 100, "holdout": True,
                      "val_fraction": 0.4, "image_size": 16, "seed": 3, "epochs": 1, "batch_size": 20,
                      "out": str(out), "tensorboard": False}, progress=False)
    return out


def test_load_run_data_splits_a_folder_as_the_run_did(folder_holdout_run):
    from trainforge.eval import evaluate_run

    data = runs.load_run_data(folder_holdout_run)
    # 200 files: 80 test (--val-fraction 0.4), 120 to train from, --subset 100 of them, 40 of those held out.
    assert (len(data.dataset.train.labels), len(data.test.labels)) == (120, 80)
    assert (len(data.train.labels), len(data.val.labels)) == (60, 40) and data.evaluation is data.val
    assert data.train.images.shape[1:] == (1, 16, 16) and data.val.classes == data.dataset.classes
    # The held-out images the run reported on are these: its model scores on them what it reported.
    summary = json.loads((folder_holdout_run / runs.SUMMARY_FILE).read_text())
    result = evaluate_run(folder_holdout_run, split="val", device="cpu")
    assert result["test_samples"] == 40 and result["test_acc"] == summary["test_acc"]
    assert result["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


def _with_config(run_dir: Path, directory: Path, **changes) -> Path:
    """A run directory holding only `run_dir`'s config.yaml with `changes`: all that load_run_data reads."""
    from trainforge import config as cfg

    saved = cfg.load_file(cfg.TrainConfig, run_dir / runs.CONFIG_FILE)
    directory.mkdir()
    (directory / runs.CONFIG_FILE).write_text(cfg.dumps(dataclasses.replace(saved, **changes)))
    return directory


def test_load_run_data_reads_the_data_root_given_else_the_runs_own(holdout_run, folder_holdout_run, tmp_path,
                                                                   monkeypatch):
    import urllib.error
    import urllib.request

    from trainforge.data import sources
    from trainforge.errors import DataError

    def offline(request, timeout=None):
        raise urllib.error.URLError("no network in tests")

    # A data root without MNIST would be filled from the mirrors: offline, that is the error naming the root.
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(sources.time, "sleep", lambda seconds: None)
    with pytest.raises(DataError, match=f"missing {tmp_path / 'empty' / 'mnist'}"):
        runs.load_run_data(holdout_run, str(tmp_path / "empty"))
    moved = _with_config(holdout_run, tmp_path / "moved", data_dir=str(tmp_path / "gone"))
    with pytest.raises(DataError, match=f"missing {tmp_path / 'gone' / 'mnist'}"):
        runs.load_run_data(moved)
    # Without --subset and --holdout: every training image, evaluated on the test split.
    whole = runs.load_run_data(_with_config(folder_holdout_run, tmp_path / "whole", subset=None, holdout=False))
    assert whole.val is None and whole.evaluation is whole.test and whole.train is whole.dataset.train
    assert (len(whole.train.labels), len(whole.test.labels)) == (120, 80)


@pytest.mark.parametrize("values, why", [
    ([GOOD], "expected a JSON object, found list"),
    ({k: v for k, v in GOOD.items() if k not in ("mean", "std")}, "missing field(s) 'mean', 'std'"),
    ({**GOOD, **{f"x{i}": 1 for i in range(6)}}, "unknown field(s) 'x0', 'x1', 'x2', 'x3', 'x4'"),
])
def test_model_descriptions_that_are_no_object_or_lack_fields_say_which(values, why):
    with pytest.raises(CheckpointError) as info:
        runs.ModelInfo.from_values(values, "m.json")
    assert str(info.value) == f"m.json: malformed model description ({why})"


def test_a_run_of_a_model_with_a_width_loads_at_that_width(tmp_path):
    from trainforge.models import build_classifier

    info = runs.ModelInfo(**{**GOOD, "model": "cnn", "width": 4})
    model = build_classifier("cnn", 2, 1, 28, (0.1,), (0.3,), width=4)
    runs.save_weights(tmp_path / runs.MODEL_FILE, model.state_dict())
    runs.write_json(tmp_path / runs.MODEL_INFO, dataclasses.asdict(info))
    loaded = runs.load(tmp_path)
    assert loaded.info == info and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def _held_lock(run_dir: Path, content: bytes) -> int:
    """A claim on `run_dir` by this process through its own open file (flock excludes other open files, even of
    the same process), whose lock file holds `content`."""
    import fcntl

    run_dir.mkdir(exist_ok=True)
    fd = os.open(run_dir / runs.LOCK_FILE, os.O_CREAT | os.O_RDWR)
    os.write(fd, content)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@pytest.mark.parametrize("content, holder", [
    (b'{"host": "box", "pid": 5}', "pid 5 on host box"),
    (b"", "pid ? on host {host}"),  # the holder has not written itself in yet
    (b"[1, 2]", "pid ? on host {host}"),
    (b"\xff not json", "pid ? on host {host}"),
])
def test_the_lock_error_names_what_the_lock_file_says_of_its_holder(tmp_path, content, holder):
    import socket

    fd = _held_lock(tmp_path, content)
    try:
        with pytest.raises(ConfigError) as info:
            runs.prepare_run_dir(tmp_path)
    finally:
        os.close(fd)
    assert str(info.value) == (f"{tmp_path} is in use by another training ({holder.format(host=socket.gethostname())}"
                               f"); wait for it to finish, or choose another --out")


def test_a_lock_taken_over_holds_only_its_new_holder(tmp_path):
    import socket

    (tmp_path / runs.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "note": "x" * 100}))
    lock = runs.prepare_run_dir(tmp_path)
    assert json.loads((tmp_path / runs.LOCK_FILE).read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    lock.release()


def test_a_lock_file_replaced_between_open_and_claim_is_claimed_anew(tmp_path, monkeypatch):
    # The holder released (and unlinked) the lock file between this process's open and its flock: the inode
    # claimed is not the one at the path, so the file is closed and opened again.
    real_inode, seen = runs._inode, []

    def inode(path):
        seen.append(path)
        return None if len(seen) == 1 else real_inode(path)

    monkeypatch.setattr(runs, "_inode", inode)
    lock = runs.prepare_run_dir(tmp_path)
    assert len(seen) == 2 and json.loads((tmp_path / runs.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_atomic_writes_make_files_as_the_umask_says(tmp_path):
    old = os.umask(0o027)
    try:
        runs.write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640


def test_prepare_run_dir_names_what_is_wrong_with_out_and_clears_stale_temporaries(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as info:
        runs.prepare_run_dir(tmp_path / "file")
    assert str(info.value) == f"--out {tmp_path / 'file'}: is a file, expected a run directory (or a path to create one at)"
    with pytest.raises(ConfigError) as info:
        runs.prepare_run_dir(tmp_path / "file" / "run")
    assert str(info.value) == f"--out {tmp_path / 'file' / 'run'}: cannot create the run directory (Not a directory)"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".state.pt.x1.tmp").write_bytes(b"half")
    runs.prepare_run_dir(tmp_path / "run", resuming=True).release()
    assert list((tmp_path / "run").iterdir()) == []


def test_an_atomic_write_syncs_the_file_then_its_directory_and_waits_the_test_delay(tmp_path, monkeypatch):
    synced, slept = [], []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(runs.time, "sleep", slept.append)
    monkeypatch.setenv(runs.WRITE_DELAY_ENV, "0.25")
    runs.write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1} and slept == [0.25]
    assert Path(synced[0]).name.startswith(".x.json.") and synced[1:] == [str(tmp_path)]
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1\n}\n'


def test_metrics_model_info_and_weights_that_are_missing_or_broken_name_the_file(tmp_path):
    assert runs.read_metrics(tmp_path) == []
    runs.write_metrics(tmp_path, [{"epoch": 1}, {"epoch": 2}])
    assert runs.read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2}]
    (tmp_path / runs.METRICS_FILE).write_text('{"epoch": 1}\n{"epoch": 2\n')
    with pytest.raises(CheckpointError) as info:
        runs.read_metrics(tmp_path)
    assert str(info.value) == f"{tmp_path / runs.METRICS_FILE}: line 2 is not JSON"
    for run_dir, message in ((tmp_path / "none", f"{tmp_path / 'none'}: not a run directory (no such directory)"),
                             (tmp_path, f"{tmp_path}: not a finished run directory (no model.json; an interrupted "
                                        f"run can be continued with --resume)")):
        with pytest.raises(CheckpointError) as info:
            runs.read_model_info(run_dir)
        assert str(info.value) == message
    (tmp_path / runs.MODEL_INFO).write_bytes(b"{\xff")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / runs.MODEL_INFO}: malformed model description \\("):
        runs.read_model_info(tmp_path)
    with pytest.raises(CheckpointError) as info:
        runs.load_weights(tmp_path / "w.pt")
    assert str(info.value) == f"{tmp_path / 'w.pt'}: weights file not found"


def test_torch_weights_files_load_plain_or_under_state_dict_and_nothing_else(tmp_path):
    weights = {"linear.weight": torch.ones(2, 3), "linear.bias": torch.zeros(2)}
    for name, content in (("plain.pt", weights), ("wrapped.pt", {"state_dict": weights, "epoch": 3})):
        torch.save(content, tmp_path / name)
        loaded = runs.load_weights(tmp_path / name)
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    for content in ({"linear.weight": [1.0]}, [torch.ones(1)], {"state_dict": [torch.ones(1)]}):
        torch.save(content, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError) as info:
            runs.load_weights(tmp_path / "bad.pt")
        assert str(info.value) == f"{tmp_path / 'bad.pt'}: expected a mapping of parameter names to tensors"


def test_a_refused_pickle_gives_torchs_reason_without_its_boilerplate(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"weight": torch.zeros(2), "payload": Exploit()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError) as info:
        runs.safe_torch_load(tmp_path / "x.pt")
    prefix = (f"{tmp_path / 'x.pt'}: refused to load: only tensors and plain containers are loaded, since other "
              f"objects could execute code (")
    message = str(info.value)
    assert message.startswith(prefix) and message.endswith(")") and "\n" not in message
    reason = message[len(prefix):-1]
    assert "GLOBAL posix.system" in reason and reason == " ".join(reason.split()) and 0 < len(reason) <= 200
    assert not any(boilerplate in reason for boilerplate in ("Weights only load failed", "WeightsUnpickler error",
                                                             "Check the documentation"))
    # A global from a module torch does not know: its reason follows "WeightsUnpickler error: ", cut at 200.
    (tmp_path / "unknown.pt").write_bytes(b"\x80\x02c" + b"m" * 300 + b"\nf\n)R.")
    with pytest.raises(CheckpointError) as info:
        runs.safe_torch_load(tmp_path / "unknown.pt")
    assert str(info.value).endswith(f"could execute code (Unsupported global: GLOBAL {'m' * 173})")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "x.pt").read_bytes()[:300])
    with pytest.raises(CheckpointError) as info:
        runs.safe_torch_load(tmp_path / "cut.pt")
    reason = str(info.value).split("(truncated or corrupt: ", 1)[1]
    assert reason.startswith("PytorchStreamReader failed") and len(reason) == 201 and "\n" not in reason
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        runs.safe_torch_load(tmp_path / "empty.pt")
    assert str(info.value) == f"{tmp_path / 'empty.pt'}: not a readable checkpoint (truncated or corrupt: EOFError)"


def test_weights_that_do_not_fit_list_the_keys_and_shapes_ten_at_most(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    state = {"0.weight": torch.zeros(4, 3), **{f"extra{i:02d}": torch.zeros(1) for i in range(12)}}
    with pytest.raises(CheckpointError) as info:
        runs.load_state_dict_strict(model, state, "w.safetensors")
    assert str(info.value) == (
        "w.safetensors: weights do not fit the model; missing keys: 0.bias, 1.bias, 1.weight; unexpected keys: "
        + ", ".join(f"extra{i:02d}" for i in range(10)) + " (+2 more); shape mismatches (file vs model): "
        "0.weight (4, 3) vs (2, 3)")
    good = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    runs.load_state_dict_strict(model, good, "w.safetensors")
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("change", [
    dict(image_size=4096), dict(num_classes=1, classes=["a"]), dict(in_channels=3, mean=[0.1] * 3, std=[0.3] * 3),
    dict(model="x"), dict(model="m" * 200), dict(classes=["a", "c" * 1000]), dict(width=65_536),
])
def test_model_descriptions_at_the_bounds_are_accepted(change):
    assert runs.ModelInfo.from_values({**GOOD, **change}, "m.json") == runs.ModelInfo(**{**GOOD, **change})


@pytest.mark.parametrize("change, why", [
    (dict(image_size=4097), "field 'image_size' is 4097, expected an integer from 1 to 4096"),
    (dict(image_size="9" * 50), f"field 'image_size' is {'9' * 40}, expected an integer from 1 to 4096"),
    (dict(model=""), "field 'model' must be a registered model's name"),
    (dict(model="m" * 201), "field 'model' must be a registered model's name"),
    (dict(model=5), "field 'model' must be a registered model's name"),
    (dict(classes=["a", "c" * 1001]), "field 'classes' must list num_classes (2) names"),
    (dict(classes=["a", 5]), "field 'classes' must list num_classes (2) names"),
])
def test_model_descriptions_past_the_bounds_are_refused(change, why):
    with pytest.raises(CheckpointError) as info:
        runs.ModelInfo.from_values({**GOOD, **change}, "m.json")
    assert str(info.value) == f"m.json: malformed model description ({why})"


def test_load_names_the_file_when_the_model_cannot_be_rebuilt_or_its_weights_do_not_fit(tmp_path, monkeypatch):
    from trainforge.models import build_classifier

    runs.write_json(tmp_path / runs.MODEL_INFO, GOOD)
    runs.save_weights(tmp_path / runs.MODEL_FILE, build_classifier("linear", 3, 1, 28, (0.1,), (0.3,)).state_dict())
    with pytest.raises(CheckpointError, match=f"^{tmp_path / runs.MODEL_FILE}: weights do not fit the model; "):
        runs.load(tmp_path)
    runs.save_weights(tmp_path / runs.MODEL_FILE, build_classifier("linear", 2, 1, 28, (0.1,), (0.3,)).state_dict())
    assert next(runs.load(tmp_path, device="meta").parameters()).device.type == "meta"

    def broken(info):
        raise RuntimeError("no such layer")

    monkeypatch.setattr(runs, "build_model", broken)
    with pytest.raises(CheckpointError) as info:
        runs.load(tmp_path)
    assert str(info.value) == f"{tmp_path / runs.MODEL_INFO}: cannot rebuild model 'linear' (no such layer)"


@pytest.mark.parametrize("count, suffix", [(10, ""), (11, " (+1 more)")])
def test_a_weights_mismatch_lists_ten_keys_then_counts_the_rest(count, suffix):
    model = torch.nn.Linear(2, 2)
    state = {**model.state_dict(), **{f"extra{i:02d}": torch.zeros(1) for i in range(count)}}
    with pytest.raises(CheckpointError) as info:
        runs.load_state_dict_strict(model, state, "w")
    assert str(info.value) == ("w: weights do not fit the model; unexpected keys: "
                               + ", ".join(f"extra{i:02d}" for i in range(10)) + suffix)


def test_cleanup_steps_that_cannot_be_done_are_skipped_not_fatal(tmp_path, monkeypatch):
    import errno
    import stat

    # The lock file is readable by all (it says who holds the run) and writable by its owner only.
    lock = runs.prepare_run_dir(tmp_path / "run")
    assert stat.S_IMODE((tmp_path / "run" / runs.LOCK_FILE).stat().st_mode) == 0o644 & ~_umask()
    # Released twice, or after someone deleted the lock file: nothing left to do, no error.
    (tmp_path / "run" / runs.LOCK_FILE).unlink()
    lock.release()
    lock.release()
    # A file system that cannot fsync a directory still gets the file written.
    real_fsync = os.fsync

    def no_directory_fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_directory_fsync)
    runs.write_text(tmp_path / "x.txt", "x")
    assert (tmp_path / "x.txt").read_text() == "x"
    # Atomically written files are as readable as plain ones (mkstemp alone would make them 0600).
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o666 & ~_umask()
    # A temporary that cannot be removed is left, and not reported as removed.
    (tmp_path / ".a.tmp").write_text("a")
    (tmp_path / ".b.tmp").write_text("b")
    real_unlink = Path.unlink

    def unlink(path, missing_ok=False):
        if path.name == ".a.tmp":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real_unlink(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert runs.remove_stale_temporaries(tmp_path) == [tmp_path / ".b.tmp"] and (tmp_path / ".a.tmp").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_temperature_is_recorded_in_model_json_and_a_bad_one_leaves_it_alone(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = runs.read_model_info(run)
    assert before.temperature == 1.0
    assert runs.apply_temperature(run, 2.5) == runs.read_model_info(run) == dataclasses.replace(before, temperature=2.5)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ConfigError, match="temperature must be a finite number > 0"):
            runs.apply_temperature(run, bad)
    assert runs.read_model_info(run).temperature == 2.5
    assert runs.apply_temperature(run, 1).temperature == 1.0  # undone
