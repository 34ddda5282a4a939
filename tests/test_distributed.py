"""Multi-process training on gloo: N processes follow one process's trajectory, only rank 0 writes, a checkpoint
resumes on any number of processes and under either parallel mode (ddp, fsdp), and a dead process ends the job with an error."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_cli

import trainforge
from trainforge import cli, runs
from trainforge import config as cfg
from trainforge.errors import ConfigError, TrainingError
from trainforge.train import command, distributed, loop

# 451 images in batches of 200: the last batch of 51 splits 26/25 over two processes, so equality with one
# process also checks that uneven shards are weighted by their size. No BN in a linear model: nothing rank-local.
SMALL = {"model": "linear", "subset": 451, "batch_size": 200, "schedule": "constant", "lr": 0.05,
         "tensorboard": False}
SMALL_FLAGS = ["--model", "linear", "--subset", "451", "--batch-size", "200", "--schedule", "constant",
               "--lr", "0.05", "--no-tensorboard"]

# Runs `trainforge` under torchrun, logging which rank opens which run-directory file (every write goes through
# runs.atomic_open), so the test can see that only rank 0 writes.
WRITE_LOGGER = """
import os, sys
from trainforge import cli, runs
from trainforge import config as cfg
from trainforge.errors import ConfigError, TrainingError

log = open(sys.argv[1], "a")
original = runs.atomic_open

def logged(path, *args, **kwargs):
    log.write(f"{os.environ['RANK']} {os.path.basename(path)}\\n")
    log.flush()
    return original(path, *args, **kwargs)

runs.atomic_open = logged
cli.exit_with(cli.main(sys.argv[2:]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _metrics(run: Path) -> list[dict]:
    return runs.read_metrics(run)


def _assert_same_epochs(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        for key in ("train_loss", "test_loss", "test_acc"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), (g["epoch"], key)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = runs.load_weights(a / runs.MODEL_FILE), runs.load_weights(b / runs.MODEL_FILE)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


def test_two_processes_follow_one_and_checkpoints_move_between_world_sizes_and_strategies(tmp_path):
    # The one-process reference: epoch 1, then resumed to epochs 3 and 4.
    ref = tmp_path / "ref"
    trainforge.train({**SMALL, "epochs": 1, "out": str(ref)}, progress=False)
    one_epoch = tmp_path / "one-epoch"
    shutil.copytree(ref, one_epoch)
    trainforge.train({"epochs": 3}, resume=ref, progress=False)
    ref_metrics = _metrics(ref)
    assert len(ref_metrics) == 3

    # Two DDP processes from scratch, started by torchrun itself; every file write is logged with its rank.
    # Process 1 runs out of memory in step 2 and process 0 in the first evaluation (injected): both switch together
    # (2 micro-batches per step, evaluation batches halved), and the trajectory stays the one-process one.
    # (It runs while the --nproc job below runs: the two are independent, and their start-ups overlap.)
    script, log, ddp = tmp_path / "logged.py", tmp_path / "writes.log", tmp_path / "ddp"
    script.write_text(WRITE_LOGGER)
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", "--max-restarts", "0", str(script), str(log), "train", *SMALL_FLAGS,
                                 "--epochs", "3", "--out", str(ddp), "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**_env(), loop.OOM_ENV: "step=2@1,eval=1@0"})

    # The one-process checkpoint after epoch 1, resumed on two processes sharded with FSDP, via --nproc.
    try:
        done = run_cli("train", "--nproc", "2", "--resume", str(one_epoch), "--epochs", "3", "--parallel", "fsdp",
                       "--json", timeout=240)
        _, torchrun_err = torchrun.communicate(timeout=240)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.communicate()
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == ref_metrics[-1]["step"]
    _assert_same_epochs(_metrics(one_epoch), ref_metrics)
    _assert_same_weights(one_epoch, ref)

    assert torchrun.returncode == 0, torchrun_err[-3000:]
    _assert_same_epochs(_metrics(ddp), ref_metrics)
    first = _metrics(ddp)[0]
    assert first["oom_recoveries"] == [{"step": 2, "accumulate": 2, "micro_batch": 50},
                                       {"evaluation": 1, "eval_batch_size": first["eval_batch_size"]}]
    assert [m["accumulate"] for m in _metrics(ddp)] == [2, 2, 2]
    assert "out of memory on process 1 at step 2: 2 micro-batches of 50" in torchrun_err
    _assert_same_weights(ddp, ref)
    writes = [line.split() for line in log.read_text().splitlines()]
    assert {rank for rank, _ in writes} == {"0"}, "a rank other than 0 wrote to the run directory"
    assert [name for _, name in writes].count(runs.STATE_FILE) == 3  # one checkpoint per epoch, written once
    assert json.loads((ddp / runs.SUMMARY_FILE).read_text())["world_size"] == 2

    # The FSDP run's checkpoint (full tensors, ordinary optimizer state) continues in a single process.
    trainforge.train({"epochs": 4}, resume=ref, progress=False)
    result = trainforge.train({"epochs": 4}, resume=one_epoch, progress=False)
    assert result.world_size == 1
    _assert_same_epochs(_metrics(one_epoch), _metrics(ref))
    _assert_same_weights(one_epoch, ref)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return None


def _signal_rank_1_of_a_running_job(out: Path, sig: int, timeout: float, **env: str) -> tuple[int, str]:
    """Starts a 2-process training job, sends `sig` to the process of rank 1 once training runs, and returns the
    job's exit status and stderr; fails if the job has not ended `timeout` seconds after the signal."""
    proc = subprocess.Popen([sys.executable, "-m", "trainforge", "train", "--nproc", "2", "--model", "linear",
                             "--epochs", "100", "--subset", "20000", "--out", str(out), "--no-tensorboard", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**_env(), **env})
    victims: list[int] = []
    try:
        # config.yaml appears once rank 0 has joined the process group and is about to train.
        deadline = time.monotonic() + 180
        while not (out / runs.CONFIG_FILE).exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        victims = [pid for pid in _children(proc.pid) if _rank_of(pid) == "1"]
        assert len(victims) == 1
        os.kill(victims[0], sig)
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.communicate()
    return proc.returncode, stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
def test_a_killed_process_ends_the_job_with_a_one_line_error(tmp_path):
    status, stderr = _signal_rank_1_of_a_running_job(tmp_path / "run", signal.SIGKILL, timeout=60)
    assert status == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("trainforge train: error: process 1 of 2 was killed by SIGKILL"), stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "run" / runs.SUMMARY_FILE).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
def test_a_hung_process_ends_the_job_after_the_collective_timeout(tmp_path):
    # A stopped process never answers: the other one gives up after the collective timeout (5 s here), and the
    # launcher then kills the hung one after its 30 s grace period.
    status, stderr = _signal_rank_1_of_a_running_job(tmp_path / "run", signal.SIGSTOP, timeout=90,
                                                     **{distributed.TIMEOUT_ENV: "5"})
    assert status == 2
    assert "process 0 of 2 lost contact with the others" in stderr and "collectives wait 5 s" in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("trainforge train: error: process 1 of 2 was killed by SIGKILL, which ended the job; "
                           "then process 0 of 2 stopped because it lost contact"), stderr[-3000:]
    assert "Traceback" not in stderr


def test_a_lost_peer_is_a_one_line_error_with_an_exit_status_of_its_own(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(distributed.PeerLostError, match="process 1 of 2 lost contact with the others") as info:
        with distributed.peer_failures_as_errors():
            raise RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    assert info.value.exit_status == distributed.PEER_LOST_EXIT_STATUS != 2
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not a transport failure: left as it is
        with distributed.peer_failures_as_errors():
            raise RuntimeError("shape mismatch")


def test_the_process_that_failed_on_its_own_is_named_as_the_cause():
    # The launcher may notice a survivor's exit first; the process that merely lost contact is not the cause.
    failures = {0: SimpleNamespace(exitcode=distributed.PEER_LOST_EXIT_STATUS, timestamp=100),
                1: SimpleNamespace(exitcode=-signal.SIGKILL, timestamp=101)}
    assert distributed._root_cause(failures) == 1
    assert distributed._describe_failure(1, failures[1], 2) == "process 1 of 2 was killed by SIGKILL"
    assert "lost contact" in distributed._describe_failure(0, failures[0], 2)
    failures[1].exitcode = distributed.PEER_LOST_EXIT_STATUS
    assert distributed._root_cause(failures) == 0
    # The SIGTERM the launcher sends the survivors is not the cause either, even when it is recorded first.
    failures = {0: SimpleNamespace(exitcode=-signal.SIGTERM, timestamp=100),
                1: SimpleNamespace(exitcode=-signal.SIGKILL, timestamp=100)}
    assert distributed._root_cause(failures) == 1


def test_nproc_mistakes_are_one_line_errors(capsys):
    assert cli.main(["train", "--nproc", "2", "--batch-size", "101"]) == 2
    assert capsys.readouterr().err.strip() == \
        "trainforge train: error: --batch-size 101 must be divisible by --nproc 2"
    assert cli.main(["train", "--nproc", "0"]) == 2
    assert "--nproc: expected a number of processes >= 1" in capsys.readouterr().err


def test_workers_get_the_command_line_without_nproc():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--nproc", "2", "--lr", "0.3", "--betas", "0.8", "0.9", "--no-tensorboard",
                              "--parallel", "fsdp", "--json"])
    argv = command.worker_argv(args)
    assert "--nproc" not in argv
    again = parser.parse_args(argv)
    assert cfg.typed_options(again, cfg.TrainConfig) == cfg.typed_options(args, cfg.TrainConfig)
    assert again.json and again.nproc is None


def test_timeouts_and_thread_shares_are_checked(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.timeout_s() == 2.5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match="TRAINFORGE_DIST_TIMEOUT"):
        distributed.timeout_s()
    assert distributed.cpu_threads(10_000) == 1
    assert distributed.cpu_threads(1) >= distributed.cpu_threads(2) >= 1


def test_fsdp_shards_each_block_of_the_network():
    model = trainforge.create_model("mlp", num_classes=10, in_channels=1, image_size=28)
    units = distributed.shard_units(model)
    assert [type(u).__name__ for u in units] == ["Linear", "Linear", "Linear"]


def test_time_based_checkpoints_mid_epoch_are_agreed_by_every_process(tmp_path):
    """--checkpoint-minutes lets rank 0's clock decide: with a tiny interval every clock check (each 8 steps) is
    due, so checkpoints fall mid-epoch, under FSDP too (whose state gathering is a collective). Rank 1's clock is
    frozen, so a process deciding from its own clock would enter the checkpoint's collectives alone and hang.
    A small cnn: under FSDP the contiguous layout its sharding needs; the run then resumes under DDP (batch-norm
    buffers), checkpointing mid-epoch there too."""
    script, log, run = tmp_path / "logged.py", tmp_path / "writes.log", tmp_path / "run"
    frozen = ("import types\nfrom trainforge.train import checkpoint\nif os.environ['RANK'] == '1':\n"
              "    checkpoint.time = types.SimpleNamespace(monotonic=lambda: 0.0)\n")
    script.write_text(WRITE_LOGGER.replace("runs.atomic_open = logged\n", "runs.atomic_open = logged\n" + frozen))
    flags = ["--model", "cnn", "--width", "8", "--subset", "2000", "--batch-size", "100", "--no-tensorboard",
             "--checkpoint-minutes", "1e-6", "--parallel", "fsdp", "--quiet"]
    first = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "--max-restarts", "0", str(script), str(log), "train", *flags, "--epochs", "1",
                            "--out", str(run)], capture_output=True, text=True,
                           env={**_env(), distributed.TIMEOUT_ENV: "20"}, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    writes = [line.split() for line in log.read_text().splitlines()]
    assert {rank for rank, _ in writes} == {"0"}
    # 20 steps: clock checks after steps 8 and 16, then the epoch end.
    assert [name for _, name in writes].count(runs.STATE_FILE) == 3
    assert cfg.load_file(cfg.TrainConfig, run / runs.CONFIG_FILE).layout == "contiguous"
    resumed = run_cli("train", "--nproc", "2", "--resume", str(run), "--epochs", "2", "--parallel", "ddp",
                      "--checkpoint-minutes", "1e-6", "--json", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == 40


def test_flat_buckets_round_trip_every_layout_and_dtype(monkeypatch):
    """What the DDP step averages and broadcasts goes through flat copies; they come back into the same tensors,
    channels-last ones included, in buckets no larger than asked (plus the tensor that crossed the limit)."""
    monkeypatch.setattr(distributed, "BUCKET_ELEMENTS", 100)
    tensors = [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.randn(70), torch.randn(50),
               torch.arange(3), torch.randn(10, 10)]
    want = [t.clone() for t in tensors]
    buckets = list(distributed._flat_buckets(tensors))
    assert [len(group) for _, group in buckets] == [1, 2, 1, 1]  # the int64 tensor in a bucket of its own
    for flat, group in buckets:
        distributed._unflatten(flat * 2, group)
    for got, before in zip(tensors, want):
        torch.testing.assert_close(got, before * 2)
    assert tensors[0].is_contiguous(memory_format=torch.channels_last)


def test_out_of_memory_under_fsdp_names_the_accumulation_to_rerun_with():
    """FSDP gathers and reduces inside the passes, so its processes cannot settle an out-of-memory error together:
    the one that met it stops the job with the --accumulate that would fit."""
    parts = SimpleNamespace(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                            device=torch.device("cpu"), agree=False, accumulate=2)
    run = SimpleNamespace(parts=parts, state=SimpleNamespace(step=6), world=2, rank=1)
    with pytest.raises(TrainingError, match="out of memory at step 7 on process 1 .* re-run with --accumulate 4"):
        loop._recover(run, 64, torch.OutOfMemoryError("CUDA out of memory"))
