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
    assert mlp.defaults() == {"weight_decay": 1e-4, "batch_size": 128, "width": 256, "augment": "none"}
    with pytest.raises(ConfigError, match="holdout"):
        search_space({"model": "linear", "holdout": False})


def test_the_first_trial_is_the_recipe_with_what_the_readme_says_of_weight_decay_and_epochs():
    from trainforge.tune import search_space

    # mnist's reference recipe: lr 0.4, batch 2048 (off the searched grid, added to it), no weight decay, 10 epochs.
    reference = search_space({"model": "linear"})
    assert reference.defaults() == {"lr": 0.4, "weight_decay": 1e-6, "batch_size": 2048, "epochs": 10,
                                    "augment": "none"}
    assert reference.batch_sizes == (64, 128, 256, 512, 2048)
    # The cnn recipe's 1.5 epochs round up to 2, and --max-epochs caps them.
    assert search_space({"model": "cnn"}).defaults() == {"lr": 4e-3, "weight_decay": 5e-4, "batch_size": 128,
                                                         "epochs": 2, "width": 32, "augment": "none"}
    assert search_space({"model": "cnn"}, max_epochs=1).defaults()["epochs"] == 1


def test_resuming_a_study_with_other_options_is_refused(tmp_path):
    from trainforge.errors import ConfigError
    from trainforge.tune import TuneSettings, search_space
    from trainforge.tune.study import open_study

    settings = TuneSettings(fixed={"model": "linear", "subset": 2000, "seed": 0}, trials=2, out=str(tmp_path))
    open_study(settings, search_space(settings.fixed))
    other = TuneSettings(fixed={"model": "linear", "subset": 3000, "seed": 0}, trials=2, out=str(tmp_path))
    with pytest.raises(ConfigError, match="subset: 2000 in the study, 3000 now"):
        open_study(other, search_space(other.fixed))


def test_a_study_of_the_same_name_that_minimizes_is_refused_and_kept(tmp_path):
    import optuna

    from trainforge.errors import ConfigError
    from trainforge.tune import TuneSettings, search_space
    from trainforge.tune.study import open_study

    settings = TuneSettings(fixed={"model": "linear", "subset": 2000}, trials=2, out=str(tmp_path), study="mine")
    other = optuna.create_study(study_name="mine", storage=settings.storage_url(), direction="minimize")
    other.add_trial(optuna.trial.create_trial(value=0.5))
    with pytest.raises(ConfigError, match=r"study 'mine' in sqlite:///\S+ minimizes its objective, tune maximizes"):
        open_study(settings, search_space(settings.fixed))
    assert [t.value for t in optuna.load_study(study_name="mine", storage=settings.storage_url()).trials] == [0.5]


# The dead worker's trial is made by hand with ask(), which warns that heartbeats are meant for optimize().
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_whose_worker_stopped_beating_is_failed_and_run_again_in_sqlite(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from trainforge.tune.storage import open_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url, heartbeat=1), direction="maximize")
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    # The last heartbeat of a worker that then died (killed, machine lost): its trial stays running.
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(2 * 1 + 1)  # now older than twice the heartbeat
    # Another worker starts a trial: it fails the dead one and runs its parameters first.
    other = optuna.load_study(study_name="s", storage=open_storage(url, heartbeat=1))
    other.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    trials = other.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == dead.number and trials[1].params == dead.params


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
                              (TuneSettings(fixed={}, trials=2, heartbeat=0, out=str(tmp_path)), "--heartbeat must be"),
                              (TuneSettings(fixed={"model": "nope"}, trials=2, out=str(tmp_path)), "unknown model")):
        with pytest.raises(trainforge.TrainforgeError, match=message):
            run_study(settings, progress=False)
    with pytest.raises(ConfigError, match="--storage"):
        run_study(TuneSettings(fixed={}, trials=1, storage="nosuchdb://x"), progress=False)
    with pytest.raises(ConfigError, match=r"--storage postgresql://u:\*\*\*@127.0.0.1:1/x: cannot connect \(.*"
                                          r"Connection refused") as error:
        run_study(TuneSettings(fixed={}, trials=1, storage="postgresql://u:secret@127.0.0.1:1/x"), progress=False)
    assert "secret" not in str(error.value)
    assert not (tmp_path / "study.db").exists()


def test_a_missing_database_driver_is_one_line_saying_what_to_install(monkeypatch):
    from trainforge.errors import ConfigError
    from trainforge.tune.storage import open_storage

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(ConfigError, match=r"^--storage postgresql://u:\*\*\*@db-host/optuna: no PostgreSQL driver is "
                                          r"installed \(pip install 'psycopg\[binary\]'\)$"):
        open_storage("postgresql://u:secret@db-host/optuna")
    with pytest.raises(ConfigError, match=r"^--storage postgresql\+psycopg2://u:\*\*\*@db-host/optuna: its driver "
                                          r"psycopg2 is not installed \(pip install psycopg2-binary\)$"):
        open_storage("postgresql+psycopg2://u:secret@db-host/optuna")
