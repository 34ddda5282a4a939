"""Reliability and security: killed processes, failing disks, non-finite numbers, hostile or broken files, fuzzed
parsers and user mistakes. docs/RELIABILITY.md maps each promise to the test here that proves it."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import io
import json
import os
import pickle
import random
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trainforge
from trainforge import cli, runs
from trainforge import config as cfg
from trainforge.data import load_data, sources
from trainforge.errors import CheckpointError, ConfigError, TrainingError
from trainforge.train import Hooks
from trainforge.train import checkpoint
from trainforge.train.checkpoint import check_state

import forked_cli
from conftest import REPO


def small_config(out: Path, **extra) -> dict:
    values = {"model": "linear", "epochs": 1, "subset": 600, "batch_size": 60, "out": str(out), "tensorboard": False,
              "device": "cpu"}
    values.update(extra)
    return values


@pytest.fixture(scope="module")
def small():
    """The 600-image MNIST subset small_config trains on, loaded once: 10 steps an epoch at batch size 60."""
    return load_data("mnist", subset=600, seed=0)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, small) -> Path:
    """A finished run directory of one epoch on `small`: every file a run writes."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    trainforge.train(small_config(out), data=small, progress=False)
    return out


@pytest.fixture()
def offline(monkeypatch):
    def refuse(request, timeout=None):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)


def cli_main(capsys, *args: str) -> tuple[int, str]:
    """Runs the CLI in this process (so monkeypatched faults apply); returns (exit status, stderr)."""
    try:
        status = cli.main(list(args))
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, stderr: str, *fragments: str) -> None:
    assert status == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---- crash safety: SIGKILL at random points, then --resume -------------------------------------------------------

KILL_ARGS = ("train", "--model", "linear", "--subset", "600", "--batch-size", "60", "--epochs", "3",
             "--checkpoint-every", "2", "--augment", "translate", "--seed", "5", "--device", "cpu", "--no-tensorboard",
             "--json", "--quiet")
WRITE_DELAY = 0.2  # seconds each atomic write holds its temporary file open: the window a kill aims at


# Imports trainforge once, then forks one child per requested run. Each child is a separate process running the CLI's
# main(), as `python -m trainforge` does, and is killed for real; forking only spares each run the seconds of importing
# torch. Nothing may run a torch kernel before the fork: a child of a process with OpenMP threads can deadlock.
def temporaries(run: Path, name: str) -> set[str]:
    with contextlib.suppress(FileNotFoundError):
        return {e.name for e in os.scandir(run) if e.name.startswith(f".{name}.") and e.name.endswith(".tmp")}
    return set()


def inode(path: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_ino
    return None


class Trigger:
    """When to kill: a new checkpoint landing, or a given file's temporary appearing (its write under way).

    Every run writes summary.json last, so every trigger also fires on that: no process can finish unkilled.
    """

    def __init__(self, run: Path, what: str, rng: random.Random, jitter: float):
        self.run, self.what, self.jitter = run, what, rng.uniform(0, jitter)
        self.state_inode = inode(run / runs.STATE_FILE)
        self.seen = {name: temporaries(run, name) for name in (runs.STATE_FILE, runs.MODEL_FILE, runs.METRICS_FILE,
                                                               runs.SUMMARY_FILE)}

    def fired(self) -> bool:
        if temporaries(self.run, runs.SUMMARY_FILE) - self.seen[runs.SUMMARY_FILE]:
            return True
        if self.what == "checkpoint":
            return inode(self.run / runs.STATE_FILE) not in (None, self.state_inode)
        return bool(temporaries(self.run, self.what) - self.seen[self.what])


def kill_when(process: forked_cli.Forked, trigger: Trigger, timeout: float = 180) -> bool:
    """SIGKILLs `process` once `trigger` fires (plus its random jitter); False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not trigger.fired():
        if not process.alive():
            return False
        assert time.monotonic() < deadline, f"trigger {trigger.what!r} never fired"
        time.sleep(0.002)
    time.sleep(trigger.jitter)
    if not process.alive():
        return False
    process.kill()
    return True


def checkpoint_step(run: Path) -> int:
    state = runs.safe_torch_load(run / runs.STATE_FILE)
    check_state(state, run / runs.STATE_FILE)
    return state["state"]["step"]


@pytest.fixture()
def fork_server(tmp_path):
    server = forked_cli.Server(tmp_path, REPO)
    yield server
    server.close()


@pytest.mark.checkpoints
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path, fork_server):
    """Six kills: mid-training, mid-checkpoint, at epoch-end writes and during the final write; each resume
    continues, and the result is bit-for-bit that of a run never killed."""
    seed = int(os.environ.get("TRAINFORGE_KILL_SEED", "20261129"))
    rng = random.Random(seed)
    whole_dir, run = tmp_path / "whole", tmp_path / "killed"
    whole = fork_server.start(*KILL_ARGS, "--out", str(whole_dir))  # in parallel: the reference
    # (what fires the kill, up to how many seconds later): the jitter after a checkpoint lands spans at most two
    # more checkpoint writes, so the run cannot reach its end before the kills aimed at its last writes.
    # Kills aimed inside a write fire as soon as its temporary appears: the whole WRITE_DELAY is the margin for a
    # busy machine to deliver the signal before the rename.
    plan = [("checkpoint", 0.3), (runs.STATE_FILE, 0.0), ("checkpoint", 0.3), (runs.MODEL_FILE, 0.0),
            (runs.METRICS_FILE, 0.0), (runs.SUMMARY_FILE, 0.0)]
    kills, mid_state_write, last_step = [], 0, 0
    for number, (what, jitter) in enumerate(plan):
        args = ("train", "--resume", str(run), "--json", "--quiet") if number else (*KILL_ARGS, "--out", str(run))
        trigger = Trigger(run, what, rng, jitter)
        process = fork_server.start(*args, env={runs.WRITE_DELAY_ENV: str(WRITE_DELAY)})
        killed = kill_when(process, trigger)
        code, out, err = process.wait()
        context = f"kill seed {seed}, kill {number} ({what}): exit {code}, {err[-2000:]}"
        if not killed:
            assert code == 0, context
            break
        assert code == -signal.SIGKILL, context
        kills.append(what)
        step = checkpoint_step(run)  # loads, and is a whole checkpoint: the write it was killed in did not count
        assert step >= last_step, context
        if temporaries(run, runs.STATE_FILE):  # killed between writing a checkpoint and renaming it into place
            mid_state_write += 1
            # A kill aimed at this process's first checkpoint write: the one before it is the previous kill's.
            # (Kills after a random delay may land in a later write, once other checkpoints have landed.)
            if what == runs.STATE_FILE:
                assert step == last_step, "the previous checkpoint must survive a kill during the next one's write"
        if (run / runs.MODEL_FILE).exists():
            runs.load_weights(run / runs.MODEL_FILE)
        runs.read_metrics(run)
        last_step = step
    assert len(kills) >= 5 and mid_state_write >= 1, (kills, mid_state_write)

    code, out, err = fork_server.start("train", "--resume", str(run), "--json", "--quiet").wait()
    assert code == 0, err
    code, whole_out, whole_err = whole.wait()
    assert code == 0, whole_err
    got, expected = json.loads(out.splitlines()[-1]), json.loads(whole_out.splitlines()[-1])
    assert got["steps"] == expected["steps"] == 30
    for key in ("test_acc", "test_loss", "train_loss", "epochs", "nonfinite_skips"):
        assert got[key] == expected[key], (key, got[key], expected[key])
    killed_w, whole_w = runs.load_weights(run / runs.MODEL_FILE), runs.load_weights(whole_dir / runs.MODEL_FILE)
    assert killed_w.keys() == whole_w.keys() and all(torch.equal(killed_w[k], whole_w[k]) for k in whole_w)
    assert [m["test_acc"] for m in runs.read_metrics(run)] == [m["test_acc"] for m in runs.read_metrics(whole_dir)]
    assert json.loads((run / runs.SUMMARY_FILE).read_text())["test_acc"] == expected["test_acc"]
    assert not list(run.glob(".*.tmp")), "a resumed run clears the temporaries of killed writes"


@pytest.mark.checkpoints
def test_checkpoint_minutes_checkpoints_by_time(tmp_path, small):
    calls = []

    def interrupt_at_5(logits, labels, images):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(logits, labels)

    # A period far shorter than any optimizer step: every step is due, none by step count.
    with pytest.raises(KeyboardInterrupt):
        trainforge.train(small_config(tmp_path / "m", checkpoint_minutes=1e-9), data=small,
                         hooks=Hooks(loss_fn=interrupt_at_5), progress=False)
    assert checkpoint_step(tmp_path / "m") == 4


@pytest.mark.checkpoints
def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".state.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "state.pt").write_bytes(b"keep")
    (tmp_path / "notes.tmp").write_text("not ours")
    removed = runs.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".state.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "state.pt"]


@pytest.mark.checkpoints
def test_write_delay_hook_rejects_a_non_number(tmp_path, monkeypatch):
    monkeypatch.setenv(runs.WRITE_DELAY_ENV, "soon")
    with pytest.raises(CheckpointError, match="TRAINFORGE_TEST_WRITE_DELAY: expected a number of seconds"):
        runs.write_text(tmp_path / "x.txt", "x")
    assert not (tmp_path / "x.txt").exists()


# ---- disk and I/O faults -----------------------------------------------------------------------------------------

class DiskFault:
    """Makes the n-th write of `state.pt` fail the way a full or read-only disk does, at one stage of the write."""

    def __init__(self, monkeypatch, stage: str, fail_on: int, code: int):
        self.stage, self.fail_on, self.code, self.state_writes = stage, fail_on, code, 0
        originals = {"mkstemp": tempfile.mkstemp, "fsync": os.fsync, "replace": os.replace}
        self.original = originals[stage]
        target = {"mkstemp": (tempfile, "mkstemp"), "fsync": (os, "fsync"), "replace": (os, "replace")}[stage]
        monkeypatch.setattr(*target, self)

    def __call__(self, *args, **kwargs):
        is_state = {"mkstemp": lambda: kwargs.get("prefix", "").startswith(f".{runs.STATE_FILE}."),
                    "fsync": lambda: os.readlink(f"/proc/self/fd/{args[0]}").split("/")[-1].startswith(
                        f".{runs.STATE_FILE}."),
                    "replace": lambda: Path(args[1]).name == runs.STATE_FILE}[self.stage]()
        if is_state:
            self.state_writes += 1
            if self.state_writes == self.fail_on:
                raise OSError(self.code, os.strerror(self.code))
        return self.original(*args, **kwargs)


@pytest.mark.checkpoints
@pytest.mark.parametrize("stage,code", [("mkstemp", errno.EROFS), ("fsync", errno.ENOSPC), ("replace", errno.EIO)])
def test_a_failing_disk_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, small, stage, code):
    run = tmp_path / "run"
    DiskFault(monkeypatch, stage, fail_on=3, code=code)
    with pytest.raises(TrainingError) as info:
        trainforge.train(small_config(run, checkpoint_every=2), data=small, progress=False)
    message = str(info.value)
    assert message.startswith("stopped at step 6: ") and os.strerror(code) in message
    assert f"last good checkpoint: {run / 'state.pt'} (step 4)" in message and f"--resume {run}" in message
    monkeypatch.undo()
    assert checkpoint_step(run) == 4
    assert not list(run.glob(".*.tmp")), "a failed write leaves no temporary behind"


@pytest.mark.checkpoints
def test_a_full_disk_is_one_line_in_the_cli_and_resume_loses_nothing(tmp_path, monkeypatch, capsys, small):
    run = tmp_path / "run"
    args = ("train", "--model", "linear", "--subset", "600", "--batch-size", "60", "--epochs", "1",
            "--checkpoint-every", "2", "--device", "cpu", "--no-tensorboard", "--quiet", "--out")
    DiskFault(monkeypatch, "fsync", fail_on=2, code=errno.ENOSPC)
    status, err = cli_main(capsys, *args, str(run))
    assert_one_line_error(status, err, "No space left on device", "(step 2)", "--resume")
    monkeypatch.undo()
    status, _ = cli_main(capsys, "train", "--resume", str(run), "--quiet")
    assert status == 0
    whole = trainforge.train(small_config(tmp_path / "whole", checkpoint_every=2), data=small, progress=False)
    resumed = json.loads((run / runs.SUMMARY_FILE).read_text())
    assert resumed["test_acc"] == whole.test_acc and resumed["steps"] == whole.steps == 10


@pytest.mark.checkpoints
def test_an_unwritable_run_directory_is_a_clear_error(tmp_path, monkeypatch, capsys):
    # We run as root, where permissions do not stop writes: a read-only file system is simulated at mkstemp.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    status, err = cli_main(capsys, "train", "--subset", "100", "--epochs", "1", "--out", str(tmp_path / "r"))
    # The memory plan's line comes first: the run directory is written once the plan is in its config.
    assert err.startswith("memory plan: ")
    assert_one_line_error(status, err.split("\n", 1)[1], "config.yaml: cannot write (Read-only file system)")


def test_files_are_written_only_through_atomic_writes():
    """Every file trainforge/ writes by path goes through `runs.atomic_open` (or its users), so no crash leaves half
    a file; the README's exceptions (TensorBoard's event files, the `.lock`) are all there are. A scan of the code:
    a file opened for writing, `Path.write_bytes`/`write_text`, `os.open` for writing, `onnx.save` or `np.save`
    anywhere else in the package fails it."""
    import ast

    # Functions that write through a temporary file and os.replace themselves, and the locks, rewritten in place.
    # The decoded-image cache fills its temporary file from several processes (mapped), then renames it itself.
    allowed = {("runs.py", "atomic_open"), ("data/sources.py", "_fetch"), ("runs.py", "acquire_lock"),
               ("data/cache.py", "decode_folder"), ("data/cache.py", "_allocate"), ("data/cache.py", "_publish")}
    package, found = REPO / "trainforge", []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name, function.name) not in allowed:
                found += [f"{name}:{call.lineno} {function.name}: {ast.unparse(call)[:80]}"
                          for call in ast.walk(function) if isinstance(call, ast.Call) and _writes_a_file(call)]
    assert not found, "write these through runs.atomic_open:\n" + "\n".join(found)


def _writes_a_file(call) -> bool:
    import ast

    what = ast.unparse(call.func)
    mode = ast.unparse(call.args[1]) if len(call.args) > 1 else next(
        (ast.unparse(k.value) for k in call.keywords if k.arg == "mode"), "")
    if what in ("open", "io.open", "os.fdopen"):
        return any(c in mode for c in "wax+")
    if what == "os.open":
        return any(flag in mode for flag in ("O_WRONLY", "O_RDWR", "O_CREAT"))
    return (what.endswith((".write_bytes", ".write_text")) and what != "runs.write_text"
            or what in ("onnx.save", "onnx.save_model", "np.save", "numpy.save"))


# ---- numerical faults ----------------------------------------------------------------------------------------------

class PoisonGradients:
    """Cross-entropy whose loss stays finite but whose gradients are NaN at the given step."""

    def __init__(self, step: int):
        self.step, self.calls = step, 0

    def __call__(self, logits, labels, images):
        self.calls += 1
        if self.calls == self.step:
            logits.register_hook(lambda grad: grad * float("nan"))
        return torch.nn.functional.cross_entropy(logits, labels)


@pytest.mark.checkpoints
def test_nonfinite_gradients_with_a_finite_loss_are_caught(tmp_path, small):
    with pytest.raises(TrainingError, match=r"NaN/Inf at step 6; last good checkpoint: .*state.pt \(step 4\)"):
        trainforge.train(small_config(tmp_path / "g", checkpoint_every=2), data=small,
                         hooks=Hooks(loss_fn=PoisonGradients(5)), progress=False)
    assert checkpoint_step(tmp_path / "g") == 4
    with pytest.raises(TrainingError, match=r"weights hold NaN/Inf at step 4; not overwriting the checkpoint. "
                                            r"last good checkpoint: .*\(step 2\)"):
        trainforge.train(small_config(tmp_path / "w", checkpoint_every=2), data=small,
                         hooks=Hooks(loss_fn=PoisonGradients(4)), progress=False)
    assert checkpoint_step(tmp_path / "w") == 2
    skipped = trainforge.train(small_config(tmp_path / "s", skip_nonfinite=True), data=small,
                               hooks=Hooks(loss_fn=PoisonGradients(5)), progress=False)
    assert skipped.nonfinite_skips == 1 and skipped.steps == 10 and 0.5 < skipped.test_acc <= 1


@pytest.mark.checkpoints
def test_inf_loss_is_caught_like_nan(tmp_path, small):
    calls = []

    def inf_at_7(logits, labels, images):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("inf") if len(calls) == 7 else loss

    with pytest.raises(TrainingError, match=r"NaN/Inf at step 7; last good checkpoint: .*\(step 6\)"):
        trainforge.train(small_config(tmp_path / "i", checkpoint_every=3), data=small,
                         hooks=Hooks(loss_fn=inf_at_7), progress=False)


def test_a_diverging_learning_rate_is_one_line_in_the_cli(tmp_path, capsys):
    status, err = cli_main(capsys, "train", "--model", "linear", "--optimizer", "sgd", "--lr", "1e38",
                           "--subset", "600", "--batch-size", "60", "--epochs", "1", "--checkpoint-every", "1",
                           "--no-tensorboard", "--quiet", "--out", str(tmp_path / "d"))
    assert_one_line_error(status, err, "NaN/Inf", "--skip-nonfinite")


# ---- hostile and broken files ----------------------------------------------------------------------------------

class Exploit:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    marker = tmp_path / "owned"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"weight": Exploit(marker)}))
    zipped = tmp_path / "zipped.pt"
    torch.save({"weight": torch.zeros(2), "payload": Exploit(marker)}, zipped)
    named = tmp_path / "model.safetensors"
    named.write_bytes(pickle.dumps(Exploit(marker)))
    return marker, [raw, zipped, named]


@pytest.mark.checkpoints
def test_the_malicious_pickle_would_run_code_with_plain_pickle(tmp_path):
    marker, (raw, _, _) = malicious_files(tmp_path)
    pickle.loads(raw.read_bytes())  # proves the test file is live: plain pickle runs the command
    assert marker.exists()


@pytest.mark.checkpoints
def test_malicious_pickles_are_refused_without_running_code(tmp_path):
    marker, files = malicious_files(tmp_path)
    raw, zipped, named = files
    for path in (raw, zipped):
        with pytest.raises(CheckpointError, match=f"{path}: refused to load: .*could execute code"):
            runs.safe_torch_load(path)
        with pytest.raises(CheckpointError, match=f"{path}: refused to load"):
            runs.load_weights(path)
    with pytest.raises(CheckpointError, match=f"{named}: not a valid safetensors file"):
        runs.load_weights(named)
    assert not marker.exists(), "unpickling ran the payload"


@pytest.mark.checkpoints
def test_malicious_checkpoints_are_refused_through_the_cli(tmp_path, small_run, capsys):
    marker, (_, zipped, named) = malicious_files(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    for name in (runs.CONFIG_FILE, runs.MODEL_INFO):
        (run / name).write_bytes((small_run / name).read_bytes())
    (run / runs.STATE_FILE).write_bytes(zipped.read_bytes())
    status, err = cli_main(capsys, "train", "--resume", str(run))
    assert_one_line_error(status, err, f"{run / 'state.pt'}: refused to load")
    (run / runs.MODEL_FILE).write_bytes(named.read_bytes())
    status, err = cli_main(capsys, "eval", str(run))
    assert_one_line_error(status, err, f"{run / 'model.safetensors'}: not a valid safetensors file")
    assert not marker.exists()


@pytest.mark.checkpoints
@pytest.mark.parametrize("verb", ["eval", "predict", "finetune", "fewshot", "compress", "export", "serve", "report"])
def test_every_verb_that_reads_a_run_refuses_malicious_weights(tmp_path, small_run, capsys, verb):
    if verb not in cli.VERBS:
        pytest.skip(f"no {verb} verb in this tree")
    marker, (_, zipped, named) = malicious_files(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    for path in small_run.iterdir():
        if path.is_file():
            (run / path.name).write_bytes(path.read_bytes())
    (run / runs.MODEL_FILE).write_bytes(named.read_bytes())
    out = str(tmp_path / "out")
    args = {"predict": [str(run), str(tmp_path / "x.png")], "finetune": ["--from", str(run), "--out", out],
            "fewshot": ["--from", str(run), "--out", out],
            "compress": [str(run), "--prune", "0.5", "--out", out],
            "export": [str(run), "--out", out + ".onnx"]}.get(verb, [str(run)])
    status, err = cli_main(capsys, verb, *args)
    assert_one_line_error(status, err, f"{run / 'model.safetensors'}: not a valid safetensors file")
    if verb == "finetune":  # a weights file given directly
        status, err = cli_main(capsys, "finetune", "--from", str(zipped), "--model", "linear", "--subset", "100",
                               "--out", out)
        assert_one_line_error(status, err, f"{zipped}: refused to load")
    assert not marker.exists()


@pytest.fixture()
def run_copy(tmp_path, small_run) -> Path:
    run = tmp_path / "copy"
    run.mkdir()
    for path in small_run.iterdir():
        if path.is_file():
            (run / path.name).write_bytes(path.read_bytes())
    return run


@pytest.mark.checkpoints
def test_truncated_and_corrupt_checkpoints_name_the_file(run_copy, capsys):
    state, weights = run_copy / runs.STATE_FILE, run_copy / runs.MODEL_FILE
    good_state, good_weights = state.read_bytes(), weights.read_bytes()
    for cut in (0, 10, len(good_state) // 2, len(good_state) - 10):
        state.write_bytes(good_state[:cut])
        with pytest.raises(CheckpointError, match=f"{state}: not a readable checkpoint"):
            trainforge.train(resume=run_copy, progress=False)
    state.write_bytes(good_state[:len(good_state) // 2])
    status, err = cli_main(capsys, "train", "--resume", str(run_copy))
    assert_one_line_error(status, err, f"{state}: not a readable checkpoint (truncated or corrupt")
    for broken in (good_weights[:len(good_weights) // 2], b"\xff" * 8 + good_weights[8:], b"", b"{}"):
        weights.write_bytes(broken)
        status, err = cli_main(capsys, "eval", str(run_copy))
        assert_one_line_error(status, err, f"{weights}: not a valid safetensors file")


@pytest.mark.checkpoints
def test_a_checkpoint_carries_its_format_and_the_runs_config(tmp_path):
    config = cfg.TrainConfig(out=str(tmp_path), seed=3, epochs=2)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    counters = dict(epoch=1, step_in_epoch=0, step=4, elapsed=1.5, skips=0, loss_sum=0.0, loss_count=0)
    checkpoint.Checkpointer(tmp_path, config, enabled=True).save(model, optimizer, scheduler, None, counters, [])
    state = runs.safe_torch_load(tmp_path / runs.STATE_FILE)
    check_state(state, tmp_path / runs.STATE_FILE)
    assert state["format"] == checkpoint.FORMAT and cfg.from_dict(cfg.TrainConfig, state["config"]) == config


@pytest.mark.checkpoints
@pytest.mark.parametrize("mutate,why", [
    (lambda s: [], "expected a mapping, found list"),
    (lambda s: {k: v for k, v in s.items() if k != "metrics"}, "'metrics' is missing"),
    (lambda s: {**s, "state": {**s["state"], "epoch": "one"}}, "state 'epoch' is 'one'"),
    (lambda s: {**s, "state": {**s["state"], "step": -5}}, "state 'step' is -5"),
    (lambda s: {**{k: v for k, v in s.items() if k != "state"}, "position": {"epoch": 1}},
     "position 'step_in_epoch' is None"),
    (lambda s: {**s, "model": {"weight": [1.0]}}, "'model' must map parameter names to tensors"),
    (lambda s: {**s, "metrics": [{"epoch": 1}]}, "'metrics' must be a list of per-epoch records"),
])
def test_checkpoints_of_the_wrong_layout_are_refused(run_copy, mutate, why):
    state = runs.safe_torch_load(run_copy / runs.STATE_FILE)
    torch.save(mutate(state), run_copy / runs.STATE_FILE)
    with pytest.raises(CheckpointError, match=f"{run_copy / 'state.pt'}: not a trainforge checkpoint .*{why}"):
        trainforge.train(resume=run_copy, progress=False)


@pytest.mark.checkpoints
def test_weights_that_do_not_fit_the_model_are_refused(run_copy, capsys):
    weights = runs.load_weights(run_copy / runs.MODEL_FILE)
    runs.save_weights(run_copy / runs.MODEL_FILE, {**weights, "extra.bias": torch.zeros(3)})
    status, err = cli_main(capsys, "eval", str(run_copy))
    assert_one_line_error(status, err, "weights do not fit the model", "unexpected keys: extra.bias")


def test_config_files_with_wrong_types_unknown_keys_or_hostile_yaml_name_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    marker = tmp_path / "owned"
    cases = [(b"epochs: three\n", "field 'epochs' expects a number, got 'three'"),
             (b"learning_rate: 0.1\n", "unknown field(s) learning_rate"),
             (b"- 1\n- 2\n", "expected a mapping"),
             (f"!!python/object/apply:os.system ['touch {marker}']\n".encode(), "not valid YAML"),
             (b"batch_size: 1.5\n", "field 'batch_size' expects an integer"),
             (b"seed: 99999999999999999999\n", "field 'seed' must be <= 4294967295"),
             (b"\xff\xfe\x00epochs: 1", "cannot read config file")]
    for data, message in cases:
        path.write_bytes(data)
        status, err = cli_main(capsys, "train", "--config", str(path))
        assert_one_line_error(status, err, f"{path}: ", message)
    assert not marker.exists()
    # Nested aliases describe a structure with 10^8 leaves: quoting it whole would never finish.
    lines = ["lr:", "  - &a [1, 1, 1, 1, 1, 1, 1, 1, 1, x]"]
    lines += [f"  - &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcdefg", "bcdefgh", strict=True)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="field 'lr' expects a number") as info:
        cfg.load_file(cfg.TrainConfig, path)
    assert len(str(info.value)) < 1000


def test_data_files_with_wrong_magic_or_size_name_the_file(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for path in (sources.EMBEDDED_ROOT / "mnist").iterdir():
        (root / "mnist" / path.name).write_bytes(path.read_bytes())
    labels = next((root / "mnist").glob("train-labels-idx1-ubyte*"))
    for broken, message in ((b"\x12\x34\x08\x01\x00\x00\x00\x02\x01\x02", "not an IDX file"),
                            (b"\x00\x00\x08\x01\x00\x00\xea\x60\x01\x02", "truncated IDX data")):
        labels.write_bytes(gzip.compress(broken) if labels.suffix == ".gz" else broken)
        status, err = cli_main(capsys, "train", "--data-dir", str(root), "--epochs", "1")
        assert_one_line_error(status, err, str(labels), message)


# ---- fuzzing: random and mutated input to every parser ---------------------------------------------------------
# The IDX reader is fuzzed in tests/test_data.py (1,000 random and 1,000 mutated files); here: config and checkpoints.

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)
FIELDS = [f.name for f in dataclasses.fields(cfg.TrainConfig)]
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=4), scalars, max_size=2)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=5))
def test_fuzz_config_from_mappings(mapping):
    try:
        config = cfg.from_dict(cfg.TrainConfig, mapping)
    except ConfigError:
        return
    assert cfg.from_dict(cfg.TrainConfig, cfg.to_dict(config)) == config


_YAMLISH = st.lists(st.sampled_from(list("\n :-[]{}&*!#|>'\",.?%@`\t\\") + FIELDS[:8] + ["1", "0.5", "true", "~"]),
                    max_size=30).map("".join)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.binary(max_size=200) | _YAMLISH.map(str.encode))
def test_fuzz_config_files(fuzz_dir, data):
    path = fuzz_dir / "c.yaml"
    path.write_bytes(data)
    try:
        cfg.load_file(cfg.TrainConfig, path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ")


def _fuzz_load(directory: Path, data: bytes, suffix: str) -> None:
    path = directory / f"f{suffix}"
    path.write_bytes(data)
    for loader in (runs.safe_torch_load, runs.load_weights):
        try:
            state = loader(path)
        except CheckpointError as exc:
            assert str(exc).startswith(f"{path}: ")
            continue
        if loader is runs.safe_torch_load:
            with contextlib.suppress(CheckpointError):
                check_state(state, path)


@pytest.mark.checkpoints
@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".pt", ".safetensors"]))
def test_fuzz_checkpoint_loaders_with_random_bytes(fuzz_dir, data, suffix):
    _fuzz_load(fuzz_dir, data, suffix)


def _small_state() -> bytes:
    buffer = io.BytesIO()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    position = {"epoch": 1, "step_in_epoch": 0, "global_step": 3, "elapsed": 0.5, "skips": 0, "loss_sum": 0.0,
                "loss_count": 0}
    torch.save({"format": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {},
                "rng_cpu": torch.get_rng_state()[:16], "position": position,
                "metrics": [{"epoch": 1, "test_acc": 0.5, "test_loss": 1.0}]}, buffer)
    return buffer.getvalue()


def _small_weights() -> bytes:
    from safetensors.torch import save

    return save({"linear.weight": torch.ones(2, 3), "linear.bias": torch.zeros(2)})


VALID = {".pt": _small_state(), ".safetensors": _small_weights()}


@st.composite
def mutated_checkpoints(draw: st.DrawFn) -> tuple[bytes, str]:
    suffix = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[suffix])
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data), suffix


@pytest.mark.checkpoints
@FUZZ
@given(case=mutated_checkpoints())
def test_fuzz_checkpoint_loaders_with_mutated_files(fuzz_dir, case):
    _fuzz_load(fuzz_dir, *case)


# ---- user input: every train option is validated ---------------------------------------------------------------

def _violations(field: dataclasses.Field) -> list:
    meta, base = field.metadata, cfg._base_type(cfg._field_types(cfg.TrainConfig)[field.name])
    bad = []
    if meta.get("choices"):
        bad.append("no-such-choice")
    if meta.get("positive"):
        bad.append(0)
    if meta.get("low") is not None:
        bad.append(meta["low"] - 1)
    if meta.get("high") is not None:
        bad.append(meta["high"] + 1)
    if meta.get("parse") is cfg.parse_duration:
        bad += ["5 minutes", "-3m", "0"]
    if base in (int, float):
        bad.append("many")
    if base is dict or getattr(base, "__origin__", None) is dict:
        bad.append("not-a-mapping")
    return [[v, v] if getattr(base, "__origin__", None) is list and not isinstance(v, str) else v for v in bad]


# Free-form options that code (not field metadata) checks: each with a bad value and the message it must give.
CHECKED_IN_CODE = {
    "recipe": (["--recipe", "fast"], "unknown recipe 'fast'; known recipes"),
    "data": (["--data", "nowhere"], "neither a built-in data set"),
    "data_dir": (["--data-dir", "{tmp}/missing"], "missing {tmp}/missing/mnist/"),
    "model": (["--model", "gpt5"], "unknown model 'gpt5'"),
    "device": (["--device", "tpu"], "--device: expected auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
    "out": (["--out", "{tmp}/file"], "--out {tmp}/file: is a file, expected a run directory"),
    "memory_budget": (["--memory-budget", "lots"], "--memory-budget 'lots': expected a positive size such as 4G"),
}


def test_every_train_option_has_a_validation_rule():
    for field in dataclasses.fields(cfg.TrainConfig):
        if field.type in ("bool", bool) or field.name in CHECKED_IN_CODE:
            continue
        assert _violations(field), f"--{field.name.replace('_', '-')} accepts anything: give it choices or bounds"


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(cfg.TrainConfig) if _violations(f)],
                         ids=lambda f: f.name)
def test_out_of_range_values_are_refused_with_what_was_expected(field):
    for bad in _violations(field):
        with pytest.raises(ConfigError, match=f"field '{field.name}' (must be|expects)"):
            cfg.from_dict(cfg.TrainConfig, {field.name: bad})


def test_bad_train_options_are_one_line_errors_in_the_cli(tmp_path, capsys, offline):
    (tmp_path / "file").write_text("not a directory")
    cases = [(args, message) for args, message in CHECKED_IN_CODE.values()] + [
        (["--batch-size", "0"], "field 'batch_size' must be > 0, got 0"),
        (["--epochs", "0"], "field 'epochs' must be > 0"),
        (["--eval-batch-size", "-1"], "field 'eval_batch_size' must be > 0, got -1"),
        (["--lr", "nan"], "field 'lr' must be a finite number"),
        (["--seed", str(2 ** 64)], "field 'seed' must be <= 4294967295"),
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a GPU"),
        (["--device", "cuda:x"], "--device: expected auto, cpu, cuda, cuda:N or mps"),
        (["--subset", "70000"], "--subset 70000 exceeds the 60000 training images of mnist"),
        (["--resume", "{tmp}/file"], "no such run directory"),
        (["--config", "{tmp}"], "cannot read config file"),
    ]
    for args, message in cases:
        args = [a.replace("{tmp}", str(tmp_path)) for a in args]
        status, err = cli_main(capsys, "train", "--epochs", "1", "--no-tensorboard", "--quiet", *args)
        assert_one_line_error(status, err, message.replace("{tmp}", str(tmp_path)))


def test_bad_eval_and_predict_options_are_one_line_errors(small_run, tmp_path, capsys):
    image = tmp_path / "missing.png"
    for args, message in ((["eval", str(small_run), "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                          (["eval", str(small_run), "--device", "bogus"], "--device: expected auto, cpu, cuda"),
                          (["eval", str(small_run), "--memory-budget", "12Q"],
                           "--memory-budget '12Q': expected a positive size such as 4G"),
                          (["predict", str(small_run), str(image), "--top-k", "0"], "--top-k must be >= 1, got 0"),
                          (["predict", str(small_run), str(image), "--device", "bogus"], "--device: expected auto"),
                          (["predict", str(small_run), str(image)], f"{image}: no such image file")):
        status, err = cli_main(capsys, *args)
        assert_one_line_error(status, err, message)


def test_argparse_errors_say_what_was_expected_in_one_line(capsys):
    for args, message in ((["--batch-size", "ten"], "expected an integer or auto, got 'ten'"),
                          (["--optimizer", "lion"], "invalid choice: 'lion'"),
                          (["--betas", "x"], "expected a number, got 'x'")):
        status, err = cli_main(capsys, "train", *args)
        assert_one_line_error(status, err, message)


def test_large_seeds_train_with_augmentation(tmp_path, small):
    result = trainforge.train(small_config(tmp_path / "s", seed=2 ** 32 - 1, augment="flip-translate"), data=small,
                              progress=False)
    assert result.steps == 10


# ---- what mutation testing (mutmut, docs/RELIABILITY.md) found untested in train/checkpoint.py ------------------

@pytest.mark.checkpoints
def test_checkpoints_fall_due_by_steps_and_by_rank0s_clock(monkeypatch):
    from trainforge.train import checkpoint

    clock = [1000.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    config = cfg.TrainConfig(checkpoint_every=5, checkpoint_minutes=2)
    alone = checkpoint.Checkpointer(Path("r"), config, True)
    in_a_job = checkpoint.Checkpointer(Path("r"), config, True, world=2)
    assert [s for s in range(1, 21) if alone.due(s)] == [5, 10, 15, 20]
    clock[0] += 119.9
    assert not alone.due(3) and not in_a_job.due(8)
    clock[0] += 0.1
    assert alone.due(3) and alone.due(7)
    # In a job the clock is looked at every TIME_CHECK_STEPS steps only, so that all processes look together.
    assert [s for s in range(1, 20) if in_a_job.due(s)] == [5, 8, 10, 15, 16]
    assert not checkpoint.Checkpointer(Path("r"), cfg.TrainConfig(checkpoint_minutes=None), True).due(10 ** 6)


@pytest.mark.checkpoints
def test_a_checkpoint_holds_the_layout_resume_reads(small_run):
    from trainforge.train import checkpoint

    state = runs.safe_torch_load(small_run / runs.STATE_FILE)
    assert set(state) == {"format", "model", "optimizer", "scheduler", "scaler", "rng_cpu", "rng_cuda", "state",
                          "metrics", "config"}
    assert state["format"] == checkpoint.FORMAT == 2 and state["scaler"] is None and state["rng_cuda"] == []
    assert state["config"] == cfg.to_dict(cfg.load_file(cfg.TrainConfig, small_run / runs.CONFIG_FILE))
    assert state["state"]["step"] == 10 and state["metrics"] == runs.read_metrics(small_run)
    weights = runs.load_weights(small_run / runs.MODEL_FILE)
    assert all(torch.equal(weights[k], v) for k, v in state["model"].items())


@pytest.mark.checkpoints
def test_a_disk_failing_at_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch, small):
    run = tmp_path / "run"
    DiskFault(monkeypatch, "replace", fail_on=1, code=errno.EIO)
    with pytest.raises(TrainingError) as info:
        trainforge.train(small_config(run, checkpoint_every=2), data=small, progress=False)
    assert str(info.value) == (f"stopped at step 2: {run / runs.STATE_FILE}: cannot write (Input/output error); the "
                               f"previous version is unchanged; no checkpoint was written in this process; nothing "
                               f"to resume from")


@pytest.mark.checkpoints
def test_counters_read_both_formats_in_todays_names():
    from trainforge.train import checkpoint

    today = {"epoch": 1, "step": 7, "skips": 0}
    assert checkpoint.counters({"state": today}) == today and checkpoint.counters({"state": today}) is not today
    assert checkpoint.counters({"position": {"epoch": 1, "global_step": 7, "skips": 0}}) == today


@pytest.mark.checkpoints
def test_restoring_a_checkpoint_of_another_model_names_the_mismatch():
    from trainforge.train import checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng_cpu": torch.get_rng_state()}
    two_groups = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    for broken, why in (({**state, "optimizer": two_groups.state_dict()}, "parameter groups"),
                        ({k: v for k, v in state.items() if k != "scheduler"}, "'scheduler'")):
        with pytest.raises(CheckpointError, match=f"^state.pt: checkpoint does not match this run \\(.*{why}"):
            checkpoint.restore(broken, model, optimizer, scheduler, None, torch.device("cpu"))
    rng = torch.get_rng_state()
    torch.rand(3)
    moved = {k: v + 1 for k, v in model.state_dict().items()}
    checkpoint.restore({**state, "model": moved, "rng_cpu": rng}, model, optimizer, scheduler, None,
                       torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, moved[k]) for k, v in model.state_dict().items())


@pytest.mark.checkpoints
def test_load_resume_takes_the_saved_config_under_the_options_given(tmp_path, small_run, capsys):
    from trainforge.train import checkpoint

    for run, message in ((tmp_path / "none", f"--resume {tmp_path / 'none'}: no such run directory"),
                         (tmp_path, f"--resume {tmp_path}: no checkpoint (state.pt) and no saved config "
                                    f"(config.yaml) to resume from")):
        with pytest.raises(CheckpointError) as info:
            checkpoint.load_resume(run, cfg.TrainConfig())
        assert str(info.value) == message
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    config, state = checkpoint.load_resume(run, cfg.TrainConfig(epochs=3, seed=0))
    saved = cfg.load_file(cfg.TrainConfig, small_run / runs.CONFIG_FILE)
    # An option given explicitly wins; one left at its default keeps the saved value; the run stays where it is.
    assert config == dataclasses.replace(saved, epochs=3, out=str(run)) and saved.batch_size != 128
    assert state["state"]["step"] == 10 and capsys.readouterr().err == ""
    (run / runs.STATE_FILE).unlink()
    config, state = checkpoint.load_resume(run, cfg.TrainConfig())
    assert state is None and config == dataclasses.replace(saved, out=str(run))
    assert capsys.readouterr().err == (f"--resume {run}: stopped before its first checkpoint; starting it over from "
                                       f"its saved config\n")


@pytest.mark.checkpoints
@pytest.mark.parametrize("mutate,why", [
    (lambda s: {**s, "state": {**s["state"], "skips": True}}, "state 'skips' is True, expected a non-negative"),
    (lambda s: {**s, "state": {**s["state"], "elapsed": -0.5}}, "state 'elapsed' is -0.5"),
    (lambda s: {**s, "rng_cpu": [1, 2]}, "'rng_cpu' is missing or not a Tensor"),
    (lambda s: {**s, "optimizer": None}, "'optimizer' is missing or not a dict"),
    (lambda s: {**s, "model": {1: torch.ones(1)}}, "'model' must map parameter names to tensors"),
    (lambda s: {**s, "metrics": [{"test_acc": 0.5, "test_loss": "low"}]}, "'metrics' must be a list of per-epoch"),
    (lambda s: {**s, "metrics": ({"test_acc": 0.5, "test_loss": 1.0},)}, "'metrics' is missing or not a list"),
    (lambda s: {**{k: v for k, v in s.items() if k != "state"},
                "position": {**{k: v for k, v in s["state"].items() if k != "step"}, "global_step": -1}},
     "position 'global_step' is -1"),
])
def test_checkpoint_layout_errors_name_the_field_and_what_was_expected(tmp_path, mutate, why):
    good = {"model": {"w": torch.ones(1)}, "optimizer": {}, "scheduler": {}, "rng_cpu": torch.ones(1),
            "metrics": [{"test_acc": 1, "test_loss": 0.5}],
            "state": {"epoch": 1, "step_in_epoch": 0, "step": 3, "elapsed": 0.5, "skips": 0, "loss_sum": 0,
                      "loss_count": 0}}
    check_state(good, tmp_path)
    with pytest.raises(CheckpointError, match=f"^{tmp_path}: not a trainforge checkpoint \\({why}"):
        check_state(mutate(good), tmp_path)


@pytest.mark.checkpoints
def test_restore_loads_the_scaler_and_on_a_gpu_its_rng_states_when_saved(monkeypatch):
    from trainforge.train import checkpoint

    class Scaler:
        def __init__(self):
            self.loaded = []

        def load_state_dict(self, state):
            self.loaded.append(state)

    cuda_rng = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", cuda_rng.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng_cpu": torch.get_rng_state(), "scaler": {"scale": 8.0}, "rng_cuda": ["gpu0", "gpu1", "gpu2"]}
    scaler = Scaler()
    checkpoint.restore(saved, model, optimizer, scheduler, scaler, torch.device("cpu"))
    checkpoint.restore({**saved, "scaler": None}, model, optimizer, scheduler, scaler, torch.device("cpu"))
    checkpoint.restore(saved, model, optimizer, scheduler, None, torch.device("cpu"))  # a run without a scaler
    # The CUDA generators are set on a GPU only, for as many devices as this machine has.
    assert scaler.loaded == [{"scale": 8.0}] and cuda_rng == []
    checkpoint.restore({**saved, "rng_cuda": []}, model, optimizer, scheduler, None, torch.device("cuda"))
    checkpoint.restore(saved, model, optimizer, scheduler, None, torch.device("cuda"))
    assert cuda_rng == [["gpu0", "gpu1"]]


@pytest.mark.checkpoints
def test_resuming_a_format_1_checkpoint_says_so_once_and_reads_its_counters(tmp_path, small_run, capsys):
    from trainforge.train import checkpoint

    run = tmp_path / "old"
    shutil.copytree(small_run, run)
    state = runs.safe_torch_load(run / runs.STATE_FILE)
    position = {("global_step" if k == "step" else k): v
                for k, v in state.pop("state").items()}
    torch.save({**state, "format": 1, "position": position}, run / runs.STATE_FILE)
    _, loaded = checkpoint.load_resume(run, cfg.TrainConfig())
    assert checkpoint.counters(loaded)["step"] == 10
    assert capsys.readouterr().err == (f"trainforge: deprecated: {run / runs.STATE_FILE}: a checkpoint of format 1 "
                                       f"(loop counters under 'position'); its run resumes, and its next checkpoint "
                                       f"is written in format 2\n")


@pytest.mark.checkpoints
@pytest.mark.parametrize("gpu", [False, True])
def test_a_checkpoint_saves_the_scaler_and_the_gpus_rng_states_when_there_are_some(tmp_path, monkeypatch, gpu):
    from trainforge.train import checkpoint

    class Scaler:
        def state_dict(self):
            return {"scale": 8.0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.ones(2)])
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    saver = checkpoint.Checkpointer(tmp_path, cfg.TrainConfig(), True, last_step=7)
    # A resumed run's checkpointer knows the checkpoint it resumed from before it writes one.
    assert saver.describe_last() == f"last good checkpoint: {tmp_path / runs.STATE_FILE} (step 7)"
    saver.save(model, optimizer, scheduler, Scaler(), {"step": 9}, [])
    state = runs.safe_torch_load(tmp_path / runs.STATE_FILE)
    assert state["scaler"] == {"scale": 8.0} and state["state"] == {"step": 9} and saver.last_step == 9
    assert len(state["rng_cuda"]) == gpu and not (tmp_path / runs.MODEL_FILE).exists()
