"""An Optuna study over the training hyperparameters, scored on a held-out validation split of the training set.

Every trial is an ordinary run: its config is a full `TrainConfig` with `holdout: true` and a fixed seed, trained by
`train()` itself, so the best config written at the end re-trains (with `trainforge train --config FILE`) to the
validation accuracy the study reported. The test set is never used.

The study lives in an SQLAlchemy storage (SQLite by default, `storage.py`): an interrupted study resumes where it
stopped, and any number of processes, here or on other machines, can share it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import multiprocessing
import os
import signal
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .. import config as cfg
from ..errors import ConfigError, TrainforgeError, TrainingError
from ..train.progress import Bar
from .storage import HEARTBEAT_SECONDS, masked_url, open_storage

# The parameters a study may tune; any of them the user fixes with a flag is left out of the search.
TUNABLE = ("lr", "weight_decay", "batch_size", "epochs", "width", "augment")
# Batch sizes searched, besides the recipe's own (which the first trial uses).
BATCH_SIZES = (64, 128, 256, 512)
# Learning rates are searched over this factor either side of the recipe's, so the range suits the optimizer.
LR_SPAN = 10.0
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
# Width choices, as multiples of the model's default width.
WIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0)
# Below this many complete trials a ranking of the parameters says nothing.
MIN_TRIALS_FOR_IMPORTANCE = 3
# What identifies a study's problem: resuming it with other values would mix incomparable trials.
IDENTITY = ("data", "subset", "val_fraction", "seed", "image_size", "model", "recipe")


@dataclasses.dataclass
class TuneSettings:
    """What a study searches and where it is stored."""

    fixed: dict[str, Any]          # TrainConfig fields the user set; never tuned
    trials: int                    # finished (complete or pruned) trials the study should hold
    workers: int = 1               # processes on this machine sharing the study
    out: str = "runs/tune"         # trial run directories, the default SQLite file and best configs
    storage: str | None = None     # SQLAlchemy URL; default sqlite:///<out>/study.db
    study: str | None = None       # study name; default <data>-<model>
    budget_minutes: float | None = None
    max_epochs: int | None = None  # upper end of the epochs searched; default the recipe's epochs
    prune: bool = True
    heartbeat: int = HEARTBEAT_SECONDS  # seconds between a running trial's signs of life (storage.py)

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"

    def storage_shown(self) -> str:
        """The storage URL with its password masked, for messages and summaries."""
        return masked_url(self.storage_url())


@dataclasses.dataclass
class SearchSpace:
    """The concrete ranges of one study, derived from the recipe of its model."""

    base: cfg.TrainConfig          # the resolved config every trial starts from
    tuned: tuple[str, ...]
    lr_range: tuple[float, float]
    batch_sizes: tuple[int, ...]
    max_epochs: int
    widths: tuple[int, ...]
    default_width: int | None
    augments: tuple[str, ...]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The values of the tuned parameters for one trial."""
        values: dict[str, Any] = {}
        if "lr" in self.tuned:
            values["lr"] = trial.suggest_float("lr", *self.lr_range, log=True)
        if "weight_decay" in self.tuned:
            values["weight_decay"] = trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True)
        if "batch_size" in self.tuned:
            values["batch_size"] = trial.suggest_categorical("batch_size", self.batch_sizes)
        if "epochs" in self.tuned:
            values["epochs"] = trial.suggest_int("epochs", 1, self.max_epochs)
        if "width" in self.tuned:
            values["width"] = trial.suggest_categorical("width", self.widths)
        if "augment" in self.tuned:
            values["augment"] = trial.suggest_categorical("augment", self.augments)
        return values

    def defaults(self) -> dict[str, Any]:
        """The recipe's own values of the tuned parameters, where the search ranges hold them: a weight decay is
        clipped into WEIGHT_DECAY_RANGE (a recipe's 0 becomes its lower end), and epochs are rounded up to whole
        ones and capped at `max_epochs`."""
        base = self.base
        values = {"lr": base.lr, "weight_decay": min(max(base.weight_decay, WEIGHT_DECAY_RANGE[0]),
                                                     WEIGHT_DECAY_RANGE[1]),
                  "batch_size": base.batch_size,
                  "epochs": min(max(1, math.ceil(base.epochs)), self.max_epochs), "augment": base.augment}
        if self.default_width is not None:
            values["width"] = self.default_width
        return {name: value for name, value in values.items() if name in self.tuned}

    def config(self, values: dict[str, Any], out: str | None) -> cfg.TrainConfig:
        """The full config of a trial with these values; `out` is its run directory."""
        return dataclasses.replace(self.base, **values, out=out)


def search_space(fixed: dict[str, Any], max_epochs: int | None = None) -> SearchSpace:
    """The search space for a study whose fixed fields are `fixed` (validated like a config file)."""
    from ..models import model_entry
    from ..train import recipes

    for name in ("holdout", "out"):
        if name in fixed:
            raise ConfigError(f"tune sets '{name}' itself for every trial; do not pass it")
    if max_epochs is not None and max_epochs < 1:
        raise ConfigError(f"--max-epochs must be >= 1, got {max_epochs}")
    # Trials evaluate on a held-out part of the training set and write no TensorBoard files; all use one seed.
    base = recipes.resolve(cfg.from_dict(cfg.TrainConfig, {**fixed, "holdout": True, "tensorboard": False},
                                         source="tune options"))
    width_param = inspect.signature(model_entry(base.model).builder).parameters.get("width")
    tuned = [name for name in TUNABLE if name not in fixed]
    widths: tuple[int, ...] = ()
    if width_param is None or not isinstance(width_param.default, int):
        # A model without a width input (e.g. linear) has nothing to search there.
        tuned = [name for name in tuned if name != "width"]
    else:
        widths = tuple(sorted({max(1, round(width_param.default * f)) for f in WIDTH_FACTORS}))
    augments = cfg.TrainConfig.__dataclass_fields__["augment"].metadata["choices"]
    return SearchSpace(base=base, tuned=tuple(tuned), lr_range=(base.lr / LR_SPAN, base.lr * LR_SPAN),
                       batch_sizes=tuple(sorted({*BATCH_SIZES, base.batch_size})),
                       max_epochs=max_epochs or max(1, math.ceil(base.epochs)), widths=widths,
                       default_width=width_param.default if widths else None, augments=tuple(augments))


def _identity(space: SearchSpace) -> dict[str, Any]:
    values = cfg.to_dict(space.base)
    return {**{k: values[k] for k in IDENTITY}, "tuned": list(space.tuned), "max_epochs": space.max_epochs,
            "batch_sizes": list(space.batch_sizes) if "batch_size" in space.tuned else None}


def open_study(settings: TuneSettings, space: SearchSpace, sampler_seed: int | None = None) -> Any:
    """Creates the study in its storage, its first trial the recipe's values, or loads it if it exists and was made
    for the same problem."""
    import optuna
    from optuna.study import StudyDirection

    # Optuna logs every trial, and every interrupted one with a traceback; the progress bar and the final table
    # say the same once, and real errors propagate to the CLI.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(settings.storage_url(), settings.heartbeat)
    shown = settings.storage_shown()
    name = settings.study or f"{Path(space.base.data).name}-{space.base.model}"
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if settings.prune
              else optuna.pruners.NopPruner())
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=4, constant_liar=True)
    identity = _identity(space)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        # Made earlier, or by another worker an instant ago: which of them enqueues the first trial is decided by
        # the database, so workers started together run it once.
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    else:
        study.set_user_attr("identity", identity)
        # The recipe's values go first: the study starts from the untuned result, and the pruner has a sensible
        # yardstick from the start.
        study.enqueue_trial(space.defaults())
        return study
    if study.directions != [StudyDirection.MAXIMIZE]:
        raise ConfigError(f"study {name!r} in {shown} {'/'.join(d.name.lower() for d in study.directions)}s its "
                          f"objective, tune maximizes validation accuracy; pass a new --study name")
    stored = study.user_attrs.get("identity")
    if stored is None:
        # A study of Optuna's own, or one whose creator has not written its identity yet (the same one, then).
        study.set_user_attr("identity", identity)
    elif stored != identity:
        differ = ", ".join(f"{k}: {stored.get(k)!r} in the study, {identity.get(k)!r} now"
                           for k in identity if stored.get(k) != identity.get(k))
        raise ConfigError(f"study {name!r} in {shown} was made for another problem ({differ}); pass the same options "
                          f"to resume it, or a new --study name")
    return study


def make_objective(space: SearchSpace, bundle: Any, trials_dir: Path, progress: bool = False
                   ) -> Callable[[Any], float]:
    """The function Optuna calls per trial: train the trial's config, report validation accuracy per epoch."""
    import optuna

    from .. import runs
    from ..train import Hooks, train

    def objective(trial: Any) -> float:
        values = space.suggest(trial)
        config = space.config(values, out=str(trials_dir / f"{trial.study.study_name}-{trial.number:04d}"))
        trial.set_user_attr("config", cfg.to_dict(config))
        # Which process ran the trial: with workers on several machines, where to look when one misbehaves.
        trial.set_user_attr("worker", _worker_name())
        pruned: list[int] = []

        def on_epoch(record: dict[str, Any]) -> bool:
            trial.report(record["test_acc"], step=record["epoch"])
            # The last epoch's value is the trial's result; stopping there would save nothing.
            if record["epoch"] < config.epochs and trial.should_prune():
                pruned.append(record["epoch"])
                return True
            return False

        try:
            result = train(config, data=bundle, hooks=Hooks(on_epoch=on_epoch), progress=progress)
        except TrainingError as exc:
            # A diverging learning rate is a bad setting, not a broken study: record why and prune the trial.
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        finally:
            # A trial is never resumed, so its checkpoint (optimizer state included) would only fill the disk; the
            # weights, config and metrics stay for `trainforge report` and `load()`.
            (Path(config.out) / runs.STATE_FILE).unlink(missing_ok=True)
        trial.set_user_attr("train_seconds", result.train_seconds)
        trial.set_user_attr("run_dir", result.run_dir)
        if pruned:
            raise optuna.TrialPruned(f"validation accuracy {result.test_acc:.4f} after epoch {pruned[0]} is below "
                                     f"the median of earlier trials")
        return result.test_acc

    return objective


def run_worker(settings: TuneSettings, space: SearchSpace, n_trials: int, seed: int,
               deadline: float | None, threads: int | None = None, progress: Callable[[], None] | None = None,
               worker_index: int = 0) -> None:
    """Runs up to `n_trials` trials of the study in this process, until it holds `settings.trials` finished ones
    or the wall-clock `deadline` (time.time()) passes. Worker i of several takes GPU i mod the GPUs present."""
    import optuna
    import torch

    from ..data import load_data

    if threads is not None:
        torch.set_num_threads(threads)
    if settings.workers > 1 and space.base.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        space = dataclasses.replace(space, base=dataclasses.replace(
            space.base, device=f"cuda:{worker_index % torch.cuda.device_count()}"))
    study = open_study(settings, space, sampler_seed=seed)
    base = space.base
    bundle = load_data(base.data, base.data_dir, subset=base.subset, seed=base.seed, image_size=base.image_size,
                       val_fraction=base.val_fraction, loader=base.loader, progress=progress is not None)
    trials_dir = Path(settings.out) / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [optuna.study.MaxTrialsCallback(settings.trials, states=_states())]
    if progress is not None:
        callbacks.append(lambda study, trial: progress())
    timeout = None if deadline is None else max(0.0, deadline - time.time())
    try:
        study.optimize(make_objective(space, bundle, trials_dir), n_trials=n_trials, timeout=timeout,
                       callbacks=callbacks, catch=())
    except BaseException:
        fail_own_running_trials(study)
        raise


def fail_own_running_trials(study: Any) -> None:
    """Marks the trials this process left running as failed.

    Optuna does that itself for an error in the objective, but not when a Ctrl-C lands while it stores a trial's
    result (its bookkeeping then fails with UnboundLocalError); the trial would stay "running" in the study for good.
    Trials of other live workers sharing the study are left alone."""
    from optuna.trial import TrialState

    me = _worker_name()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == me:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _states() -> tuple[Any, ...]:
    from optuna.trial import TrialState
    return (TrialState.COMPLETE, TrialState.PRUNED)


def count_finished(study: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=_states()))


def _spawned_worker(settings: TuneSettings, space: SearchSpace, n_trials: int, seed: int, deadline: float | None,
                    threads: int, index: int, errors: Any) -> None:
    try:
        run_worker(settings, space, n_trials, seed, deadline, threads, worker_index=index)
    except TrainforgeError as exc:
        errors.put(str(exc))
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def run_study(settings: TuneSettings, progress: bool = True) -> Any:
    """Runs the study to `settings.trials` finished trials (or the time budget) and returns it.

    With `workers > 1` that many processes share the study, each with an equal part of the CPU threads.
    """
    if settings.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {settings.trials}")
    if settings.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {settings.workers}")
    if settings.budget_minutes is not None and settings.budget_minutes <= 0:
        raise ConfigError(f"--budget-minutes must be > 0, got {settings.budget_minutes}")
    space = search_space(settings.fixed, settings.max_epochs)
    study = open_study(settings, space)
    done = count_finished(study)
    remaining = settings.trials - done
    if remaining <= 0:
        return study
    deadline = None if settings.budget_minutes is None else time.time() + settings.budget_minutes * 60
    # Distinct sampler seeds per worker and per resumption: equal seeds would propose the same first trials again.
    seed = space.base.seed * 1_000 + len(study.trials)
    bar = Bar(progress, "tune", settings.trials, completed=done, fields=("best",), clock="elapsed")
    try:
        if settings.workers == 1:
            run_worker(settings, space, remaining, seed, deadline, progress=lambda: _show_best(bar, study))
        else:
            _run_processes(settings, space, remaining, seed, deadline, lambda: _show_best(bar, study))
    finally:
        bar.close()
    return study


def _run_processes(settings: TuneSettings, space: SearchSpace, remaining: int, seed: int, deadline: float | None,
                   poll: Callable[[], None]) -> None:
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    shares = [remaining // settings.workers + (i < remaining % settings.workers) for i in range(settings.workers)]
    procs = [ctx.Process(target=_spawned_worker, args=(settings, space, n, seed + i, deadline, threads, i, errors))
             for i, n in enumerate(shares) if n > 0]
    for proc in procs:
        proc.start()
    try:
        while any(proc.is_alive() for proc in procs):
            poll()
            time.sleep(1.0)
    except KeyboardInterrupt:
        # Interrupted workers mark their running trial failed; finished trials stay in the storage.
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGINT)
        for proc in procs:
            proc.join()
        raise
    for proc in procs:
        proc.join()
    poll()
    failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    if failed:
        message = errors.get() if not errors.empty() else f"a worker process exited with status {failed[0]}"
        raise TrainingError(f"tune worker failed: {message}")


def _show_best(bar: Bar, study: Any) -> None:
    """Updates the trials bar: finished trials and the best validation accuracy so far."""
    if bar.progress is None:
        return
    from optuna.trial import TrialState

    finished = study.get_trials(deepcopy=False, states=_states())
    values = [t.value for t in finished if t.state == TrialState.COMPLETE]
    bar.update(completed=len(finished), best=f"best val acc {max(values):.4f}" if values else "")


def summarize(study: Any, settings: TuneSettings) -> dict[str, Any]:
    """The trials, the importance of each parameter, and the best config, written as `<out>/<study>-best.yaml`."""
    import optuna
    from optuna.trial import TrialState

    from .. import runs

    rows = []
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        rows.append({"number": t.number, "state": t.state.name.lower(),
                     "val_acc": t.value if t.value is not None else (t.intermediate_values[steps[-1]] if steps
                                                                      else None),
                     "epochs_run": steps[-1] if steps else 0,
                     "seconds": t.duration.total_seconds() if t.duration else None,
                     "params": dict(t.params), "worker": t.user_attrs.get("worker"),
                     "note": t.user_attrs.get("error")})
    counts = {state: sum(t.state == state for t in study.trials) for state in TrialState}
    summary: dict[str, Any] = {
        "study": study.study_name, "storage": settings.storage_shown(),
        "n_complete": counts[TrialState.COMPLETE], "n_pruned": counts[TrialState.PRUNED],
        "n_failed": counts[TrialState.FAIL], "n_running": counts[TrialState.RUNNING],
        "best_value": None, "best_params": None, "best_trial": None, "best_run_dir": None, "config_path": None,
        "importances": None, "importances_note": None, "trials": rows}
    if counts[TrialState.COMPLETE] == 0:
        summary["importances_note"] = "no complete trial yet"
        return summary
    best = study.best_trial
    config = cfg.from_dict(cfg.TrainConfig, best.user_attrs["config"], source=f"trial {best.number}")
    # A re-run must not overwrite the trial's run directory, may as well be logged, and need not use the GPU the
    # trial's worker happened to be given.
    config = dataclasses.replace(config, out=None, tensorboard=True,
                                 device=settings.fixed.get("device", cfg.TrainConfig.device))
    path = Path(settings.out) / f"{study.study_name}-best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.write_text(path, cfg.dumps(config))
    summary.update(best_value=best.value, best_params=dict(best.params), best_trial=best.number,
                   best_run_dir=best.user_attrs.get("run_dir"), config_path=str(path))
    if counts[TrialState.COMPLETE] < MIN_TRIALS_FOR_IMPORTANCE:
        summary["importances_note"] = (f"needs at least {MIN_TRIALS_FOR_IMPORTANCE} complete trials, "
                                       f"has {counts[TrialState.COMPLETE]}")
        return summary
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # PED-ANOVA needs no scikit-learn (fANOVA, Optuna's older default, does).
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            summary["importances"] = dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
        except (ValueError, RuntimeError) as exc:
            summary["importances_note"] = f"cannot rank the parameters yet ({exc})"
    if caught and summary["importances"] is not None:
        summary["importances_note"] = "; ".join(sorted({str(w.message) for w in caught}))
    return summary
