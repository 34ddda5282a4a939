"""Tests of trainforge.runs: the run directory's claim (lock, no silent overwrite) and model.json's bounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainforge import runs
from trainforge.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]


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
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"already holds a run \\(config.yaml\\); continue it with --resume {tmp_path}"):
        runs.prepare_run_dir(tmp_path)
    assert (tmp_path / runs.CONFIG_FILE).read_text() == "seed: 5\n" and not (tmp_path / runs.LOCK_FILE).exists()
    runs.prepare_run_dir(tmp_path, resuming=True).release()
    assert (tmp_path / runs.CONFIG_FILE).exists()
    runs.prepare_run_dir(tmp_path, overwrite=True).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


GOOD = dict(model="linear", num_classes=2, classes=["a", "b"], in_channels=1, image_size=28, mean=[0.1], std=[0.3])


@pytest.mark.parametrize("change, field", [
    (dict(image_size=10 ** 6), "'image_size' is 1000000, expected an integer from 1 to 4096"),
    (dict(num_classes=10 ** 9), "'num_classes' is 1000000000, expected an integer from 1 to 100000"),
    (dict(in_channels=2), "'in_channels' is 2, expected 1 or 3"),
    (dict(width=True), "'width' is True, expected an integer"),
    (dict(classes=["a"]), "'classes' must list num_classes (2) names"),
    (dict(std=[0.0]), "'std' must be positive"),
    (dict(mean=[float("nan")]), "'mean' must list 1 to 3 finite numbers"),
    (dict(evil=1), "unknown field(s) 'evil'"),
])
def test_hostile_model_descriptions_name_the_field(trained_run, tmp_path, change, field):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in (runs.MODEL_FILE, runs.CONFIG_FILE):
        (run_dir / name).write_bytes((trained_run / name).read_bytes())
    (run_dir / runs.MODEL_INFO).write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(CheckpointError, match=f"^{run_dir / runs.MODEL_INFO}: malformed model description"):
        runs.load(run_dir)
    with pytest.raises(CheckpointError) as info:
        runs.ModelInfo.from_values({**GOOD, **change}, "m.json")
    assert field in str(info.value)


def test_the_model_descriptions_trainforge_writes_pass_the_bounds(trained_run):
    info = runs.read_model_info(trained_run)
    assert info.image_size == 28 and info.num_classes == 10 and runs.load(trained_run).classes == info.classes
