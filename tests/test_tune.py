import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import trainforge
from trainforge import config as cfg

from conftest import REPO, run_cli


def last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


def finished(summary):
    return summary["n_complete"] + summary["n_pruned"]


def test_holdout_split_is_stratified_disjoint_and_seeded(mnist):
    from trainforge.data.loaders import balanced_subset, holdout_split
    from trainforge.data.sources import ImageSet

    idx = balanced_subset(mnist.train.labels, 2000, seed=0)
    small = type(mnist)(mnist.name, ImageSet(mnist.train.images[idx], mnist.train.labels[idx], mnist.classes),
                        mnist.test, mnist.mean, mnist.std)
    split = holdout_split(small, 0.1, seed=3)
    assert len(split.train.labels) + len(split.test.labels) == 2000
    assert torch.bincount(split.test.labels).tolist() == [20] * 10  # 10% of each class's 200
    # Held-out images are training images (never test images), and none of them is also trained on.
    train_rows = {bytes(x.numpy()) for x in split.train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in split.test.images)
    assert torch.equal(holdout_split(small, 0.1, seed=3).test.labels, split.test.labels)
    assert not torch.equal(holdout_split(small, 0.1, seed=4).test.images, split.test.images)


def test_search_space_follows_the_model_and_the_fixed_flags():
    from trainforge.errors import ConfigError
    from trainforge.tune import search_space

    linear = search_space({"model": "linear", "subset": 2000})
    assert "width" not in linear.tuned and linear.base.holdout and not linear.base.tensorboard
    assert linear.lr_range == pytest.approx((linear.base.lr / 10, linear.base.lr * 10))
    mlp = search_space({"model": "mlp", "lr": 0.01, "epochs": 2}, max_epochs=3)
    assert mlp.widths == (64, 128, 256, 512)  # around the mlp's default width of 256
    assert "lr" not in mlp.tuned and "epochs" not in mlp.tuned and "width" in mlp.tuned
    assert mlp.base.lr == 0.01 and mlp.max_epochs == 3
    # The first trial of a study is the recipe itself (epochs and lr are fixed here, so not among the values).
    assert mlp.defaults() == {"weight_decay": mlp.base.weight_decay, "batch_size": mlp.base.batch_size,
                              "width": 256, "augment": mlp.base.augment}
    with pytest.raises(ConfigError, match="holdout"):
        search_space({"model": "linear", "holdout": False})


def test_resuming_a_study_with_other_options_is_refused(tmp_path):
    from trainforge.errors import ConfigError
    from trainforge.tune import TuneSettings, search_space
    from trainforge.tune.study import open_study

    settings = TuneSettings(fixed={"model": "linear", "subset": 2000, "seed": 0}, trials=2, out=str(tmp_path))
    open_study(settings, search_space(settings.fixed))
    other = TuneSettings(fixed={"model": "linear", "subset": 3000, "seed": 0}, trials=2, out=str(tmp_path))
    with pytest.raises(ConfigError, match="subset: 2000 in the study, 3000 now"):
        open_study(other, search_space(other.fixed))


def test_trials_left_running_by_this_process_are_failed_and_other_workers_trials_kept(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from trainforge.tune.study import fail_own_running_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    mine, theirs = study.ask(), study.ask()
    mine.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    theirs.set_user_attr("worker", "elsewhere:1")
    fail_own_running_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {mine.number: TrialState.FAIL, theirs.number: TrialState.RUNNING}


TUNE = ("tune", "--model", "linear", "--subset", "3000", "--max-epochs", "2")


def test_interrupted_study_resumes_on_two_workers_and_its_best_config_retrains_to_the_same_accuracy(tmp_path):
    import optuna

    from trainforge.tune import search_space

    out = tmp_path / "tune"
    args = [*TUNE, "--out", str(out), "--json"]
    # Started by hand rather than through run_cli: the test interrupts it (SIGINT, as Ctrl-C) mid-study.
    proc = subprocess.Popen([sys.executable, "-m", "trainforge", *args, "--trials", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 240
    study, kept = None, []
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if study is None:
            if not (out / "trials").is_dir():  # made once the study is in the database
                continue
            study = optuna.load_study(study_name="mnist-linear", storage=f"sqlite:///{out / 'study.db'}")
        kept = [(t.number, t.value) for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and t.value is not None]
        if len(kept) >= 2:
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert len(kept) >= 2, stderr
    # It may have finished all trials in the meantime on a fast machine (0), or taken the signal while the
    # interpreter was already shutting down, past the CLI's handler (killed by SIGINT).
    if proc.returncode not in (0, -signal.SIGINT):
        assert proc.returncode == 130 and "interrupted" in stderr, stderr

    # The same study resumed, and raised to 6 trials, with 2 worker processes sharing the SQLite file.
    resumed = run_cli(*args, "--trials", "6", "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    summary = last_json(resumed.stdout)
    assert finished(summary) == 6
    values = {t["number"]: t["val_acc"] for t in summary["trials"]}
    assert all(values[number] == value for number, value in kept)  # the finished trials were kept, not re-run
    first_run = f"{socket.gethostname()}:{proc.pid}"
    assert len({t["worker"] for t in summary["trials"] if t["state"] in ("complete", "pruned")} - {first_run}) == 2
    assert summary["best_value"] == max(t["val_acc"] for t in summary["trials"] if t["state"] == "complete")
    recipe = search_space({"model": "linear", "subset": 3000}, max_epochs=2).defaults()
    assert summary["trials"][0]["params"] == pytest.approx(recipe)
    assert summary["config_path"] == str(out / "mnist-linear-best.yaml")
    # Each trial that trained is a loadable run (one whose loss diverged has a note instead); its resume checkpoint
    # is dropped since trials are never resumed.
    trial_dirs = [out / "trials" / f"mnist-linear-{t['number']:04d}" for t in summary["trials"]
                  if t["state"] in ("complete", "pruned") and t["note"] is None]
    assert all((d / "model.safetensors").is_file() and not (d / "state.pt").exists() for d in trial_dirs)

    # What `trainforge train --config FILE` does, in this process to spare another interpreter start.
    config = cfg.load_file(cfg.TrainConfig, summary["config_path"])
    config.out, config.tensorboard = str(tmp_path / "retrain"), False
    retrained = trainforge.train(config, progress=False)
    assert abs(retrained.test_acc - summary["best_value"]) <= 0.005


def test_bad_tune_options_are_refused_before_any_work(tmp_path):
    from trainforge.errors import ConfigError
    from trainforge.tune import TuneSettings, run_study

    for settings, message in ((TuneSettings(fixed={}, trials=0, out=str(tmp_path)), "--trials must be >= 1"),
                              (TuneSettings(fixed={}, trials=2, workers=0, out=str(tmp_path)), "--workers must be"),
                              (TuneSettings(fixed={"model": "nope"}, trials=2, out=str(tmp_path)), "unknown model")):
        with pytest.raises(trainforge.TrainforgeError, match=message):
            run_study(settings, progress=False)
    with pytest.raises(ConfigError, match="--storage"):
        run_study(TuneSettings(fixed={}, trials=1, storage="nosuchdb://x"), progress=False)
    with pytest.raises(ConfigError, match=r"--storage postgresql://u:\*\*\*@127.0.0.1:1/x: cannot open") as error:
        run_study(TuneSettings(fixed={}, trials=1, storage="postgresql://u:secret@127.0.0.1:1/x"), progress=False)
    assert "secret" not in str(error.value)
    assert not (tmp_path / "study.db").exists()
