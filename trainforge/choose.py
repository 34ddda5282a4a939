"""The model chosen by what this machine can do in a time budget: `train --time` without `--model`, and `auto`.

The candidates that fit the data (the scratch cnn at the images' own size up to 64 px and at 32 and 64 px for larger
images, fashion_cnn for small images, the data set's own default, EfficientNet-Lite0 as a linear probe on cached
features and fine-tuned with LoRA or in full at 112 px, prototypes on its features for a handful of images per class)
each get a short trial in an ordinary Optuna study: trained by `train`/`finetune`/`fewshot` themselves with `--time`
set to an equal part of what the search has left (a trial that stops early leaves its time to the next; the cheap ones
go first), on all but a seeded, stratified part of the *training* images, and scored on that part (the test set plays
no part). A trial's own timed steps give the candidate's samples per second, hence the steps it could take in the rest
of the budget; its memory plan gives its peak memory. Optuna's successive-halving pruner stops a trial whose
validation accuracy at an epoch end falls behind the earlier trials'. The best validation accuracy wins; on a built-in
data set its default model stays unless another candidate beats it by CLEAR_MARGIN. Where no trial fitted its part (a
short budget on a slow machine), the candidate whose trial measured the least time to train at all wins, if the rest
of the budget gives it that.

The plan (candidates, speed, memory, steps in the budget, trial accuracy, the winner and why) is one JSON file,
`plan.json`, in the run directory; `auto` writes the same format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import config as cfg
from .data import BUILTIN_DATASETS, DataBundle, load_data
from .data.loaders import holdout_split
from .errors import TrainingError
from .train import budget, defaults, recipes

PLAN_FILE = "plan.json"
# The share of the budget the trials take; the winner trains for the rest.
SEARCH_SHARE = 0.3
# On a built-in set the default model (its recipe filled to the budget) stays unless another candidate's validation
# accuracy is higher by this much: its recipe holds a measured record, a short trial's lead of less is noise.
CLEAR_MARGIN = 0.01
# A trial given less than this is not started (its process could not even build the model).
MIN_TRIAL_SECONDS = 1.0
# Images per class up to which prototypes on pretrained features are a candidate.
FEWSHOT_MAX_PER_CLASS = 10
# The sides the scratch cnn trains at on larger images (the "size classes" of a photo folder), smallest first. At 32
# px a step costs a quarter of one at 64, so a budget buys four times the epochs: on the benchmark photo folder
# (Fashion-MNIST upscaled to 500x375) 150 s of training gave 0.870 at 32 px and 0.854 at 64 (RESULTS.md, "auto").
SCRATCH_SIDES = (32, 64)
PRETRAINED_SIDE = 112


@dataclasses.dataclass
class Candidate:
    """One way to train a model for the data, and what its trial measured."""

    name: str
    kind: str  # scratch, linear-probe, lora, full or prototypes
    model: str
    image_size: int | None = None
    shots: int | None = None  # prototypes: images per class
    samples_per_second: float | None = None
    peak_memory_bytes: int | None = None
    steps_in_budget: int | None = None
    val_acc: float | None = None
    trial_seconds: float | None = None
    needed_seconds: float | None = None  # a trial too short for the candidate: the time it said it needs
    note: str = ""

    @property
    def pretrained(self) -> bool:
        return self.kind != "scratch"

    def train_options(self) -> dict[str, Any]:
        """TrainConfig fields that train this candidate (the model, or the source's architecture size)."""
        options: dict[str, Any] = {} if self.pretrained else {"model": self.model}
        if self.image_size is not None:
            options["image_size"] = self.image_size
        return options


@dataclasses.dataclass
class TimePlan:
    """The plan of a time-budgeted run: saved as plan.json, printed as a table."""

    budget: str
    budget_seconds: float
    data: str
    train_images: int
    val_images: int
    classes: int
    search_seconds: float
    candidates: list[Candidate]
    winner: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TimePlan":
        return cls(**{**values, "candidates": [Candidate(**c) for c in values["candidates"]]})

    def save(self, path: Path) -> None:
        from . import runs

        runs.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "TimePlan":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def winning(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.winner)

    def table(self) -> str:
        rows = [f"time budget {self.budget}: {len(self.candidates)} candidates tried on {self.train_images:,} training "
                f"images, scored on {self.val_images:,} held out of them, in {self.search_seconds:.0f} s",
                f"  {'candidate':<34} {'samples/s':>10} {'peak mem':>9} {'steps in budget':>16} {'val acc':>8}"]
        for c in self.candidates:
            rows.append(f"{'*' if c.name == self.winner else ' '} {c.name:<34} {_num(c.samples_per_second):>10} "
                        f"{_mb(c.peak_memory_bytes):>9} {_num(c.steps_in_budget):>16} "
                        f"{'-' if c.val_acc is None else f'{c.val_acc:.4f}':>8}{'  ' + c.note if c.note else ''}")
        rows.append(f"winner: {self.winner}: {self.reason}")
        return "\n".join(rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2 ** 20:,.0f} MB"


def search_side(width: int) -> int | None:
    """The side a folder of images `width` wide is decoded at for a search: the largest any candidate trains at,
    or None (their own) where they are smaller. Decoded once, small: a 500x375 photo folder held at its own size
    took 2.3 GB, a minute to decode and seconds per trial to copy, for candidates that train at 64-112 px."""
    return PRETRAINED_SIDE if width > PRETRAINED_SIDE else None


def candidates_for(config: cfg.TrainConfig, bundle: DataBundle) -> list[Candidate]:
    """The candidates that fit the data: its size, channels and images per class."""
    side = min(bundle.image_size) if isinstance(bundle.image_size, (tuple, list)) else bundle.image_size
    per_class = len(bundle.train.labels) / max(1, len(bundle.classes))
    found = [Candidate(f"cnn@{s}", "scratch", "cnn", s) for s in SCRATCH_SIDES if s < side]
    if side <= SCRATCH_SIDES[-1]:
        found.append(Candidate(f"cnn@{side}", "scratch", "cnn"))
    if side <= 32:
        found.append(Candidate("fashion_cnn", "scratch", "fashion_cnn"))
    default = next(iter(recipes.DATASET_RECIPES.get(config.data, {})), None)
    if default is not None and default not in {c.model for c in found}:
        found.insert(0, Candidate(default, "scratch", default))
    if side >= defaults.PRETRAINED_MIN_SIDE:  # smaller images are too small for ImageNet features (defaults.py)
        source = defaults.PRETRAINED_SOURCE
        found += [Candidate(f"{source} linear-probe@{PRETRAINED_SIDE}", "linear-probe", source, PRETRAINED_SIDE),
                  Candidate(f"{source} lora@{PRETRAINED_SIDE}", "lora", source, PRETRAINED_SIDE),
                  Candidate(f"{source} full@{PRETRAINED_SIDE}", "full", source, PRETRAINED_SIDE)]
        if per_class <= FEWSHOT_MAX_PER_CLASS:
            counts = bundle.train.labels.bincount()
            found.append(Candidate(f"{source} prototypes", "prototypes", source, PRETRAINED_SIDE,
                                   shots=int(counts[counts > 0].min())))
    return found


def choose_model(config: cfg.TrainConfig, clock: budget.Clock, *, bundle: DataBundle | None = None,
                 candidates: list[Candidate] | None = None, trial_clock: Any = budget.Clock,
                 storage: Any = None, study_name: str | None = None, progress: bool = True,
                 search_seconds: float | None = None, reserve_seconds: float = 0.0,
                 trials_dir: Path | None = None, callbacks: tuple = ()) -> TimePlan:
    """Tries every candidate for `config.data` (or `candidates`) within SEARCH_SHARE of the budget `config.time`
    (or `search_seconds`), counted on `clock` from its start, and returns the plan with the winner.

    `trial_clock()` makes each trial's clock (tests pass fake ones); `storage`/`study_name`: an Optuna storage (a URL
    or an opened one) to share, as `tune` does: a candidate whose trial that study already finished on the same
    data, seed and time share is not tried again (`auto --resume`). `reserve_seconds`: the time kept after the
    winner's training (steps in budget leave it out); `trials_dir`: where the trials' runs are kept (default: a
    temporary folder); `callbacks`: Optuna's, called after each trial."""
    import optuna

    seconds = cfg.parse_duration(config.time)
    clock.start = clock.now() if clock.start is None else clock.start
    bundle = bundle or _search_bundle(config, progress)
    split = holdout_split(bundle, config.val_fraction, config.seed)
    found = candidates or candidates_for(config, bundle)
    total = seconds * SEARCH_SHARE if search_seconds is None else search_seconds
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is a row of the table, not a traceback
    study = optuna.create_study(direction="maximize", storage=storage, study_name=study_name,
                                load_if_exists=storage is not None,
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1))
    search = {"data": config.data, "seed": config.seed, "search_seconds": round(total, 3)}
    left = _reuse_finished(study, found, search)
    for candidate in left:
        study.enqueue_trial({"candidate": candidate.name})
    names = [c.name for c in found]
    by_name = {c.name: c for c in found}
    started = clock.now()

    def objective(trial: Any) -> float:
        candidate = by_name[trial.suggest_categorical("candidate", names)]
        # An equal part of what the search has left: a trial that stops early (too short, pruned) leaves its time
        # to the candidates after it.
        untried = sum(c.val_acc is None and not c.note for c in found)
        share = max(total - (clock.now() - started), 0.0) / max(untried, 1)
        if share < MIN_TRIAL_SECONDS:
            candidate.note = f"not tried: {share:.1f} s of the search left for it"
            raise TrainingError(candidate.note)
        try:
            return _trial(candidate, config, split, share, trial, trial_clock(), progress)
        finally:
            trial.set_user_attr("search", search)
            trial.set_user_attr("measured", dataclasses.asdict(candidate))
    with tempfile.TemporaryDirectory(prefix="trainforge-choose-") as tmp:
        config = dataclasses.replace(config, out=str(trials_dir or tmp))
        study.optimize(objective, n_trials=len(left), catch=(TrainingError,), callbacks=list(callbacks))
    search_seconds = clock.now() - started
    left_seconds = seconds - (clock.now() - clock.start) - budget.EXIT_SECONDS - reserve_seconds
    for c in found:
        if c.samples_per_second:
            c.steps_in_budget = math.floor(left_seconds * c.samples_per_second / _batch(c, config))
    return _decide(config, found, seconds, search_seconds, len(split.train.labels), len(split.test.labels),
                   len(bundle.classes), left_seconds)


def _search_bundle(config: cfg.TrainConfig, progress: bool) -> DataBundle:
    """`config.data` loaded for the search: a folder at search_side of its images' width unless --image-size says."""
    image_size = config.image_size
    if image_size is None and config.data not in BUILTIN_DATASETS:
        from .data.folder import infer_image_format, scan_image_folder

        image_size = search_side(infer_image_format(scan_image_folder(config.data)[0])[1][1])
    return load_data(config.data, config.data_dir, subset=config.subset, seed=config.seed, image_size=image_size,
                     val_fraction=config.val_fraction, progress=progress)


def _reuse_finished(study: Any, found: list[Candidate], search: dict[str, Any]) -> list[Candidate]:
    """Fills the candidates whose trial `study` finished (complete, pruned or failed) under the same `search` from
    what that trial measured; returns the others, to be tried."""
    import optuna

    done = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED,
                                                          optuna.trial.TrialState.FAIL)):
        measured = trial.user_attrs.get("measured")
        if trial.user_attrs.get("search") == search and measured:
            done[measured["name"]] = measured
    for candidate in found:
        if candidate.name in done:
            for key, value in done[candidate.name].items():
                setattr(candidate, key, value)
    return [c for c in found if c.name not in done]


def _batch(candidate: Candidate, config: cfg.TrainConfig) -> int:
    if candidate.pretrained:
        from .finetune.command import DEFAULTS

        return int(config.batch_size or DEFAULTS["batch_size"])
    return int(recipes.resolve(dataclasses.replace(config, model=candidate.model, recipe=None)).batch_size)


def _trial(candidate: Candidate, config: cfg.TrainConfig, split: DataBundle, seconds: float, trial: Any,
           clock: budget.Clock, progress: bool) -> float:
    """Trains `candidate` on `split` for `seconds`, filling the candidate's measurements; its validation accuracy."""
    import optuna

    out = trial_dir(Path(config.out), candidate)
    shutil.rmtree(out, ignore_errors=True)  # what a killed try of this trial left (auto --resume)
    clock.start = clock.now()
    fields = {"time": f"{seconds:.1f}s", "seed": config.seed, "device": config.device, "out": str(out),
              "tensorboard": False, "memory_budget": config.memory_budget, **candidate.train_options()}

    def report(record: dict[str, Any]) -> bool:
        trial.report(record["test_acc"], record["epoch"])
        return trial.should_prune()
    try:
        if candidate.kind == "prototypes":
            result = _prototypes(candidate, config, split, out)
        elif candidate.pretrained:
            from .finetune.command import finetune

            result = finetune({"source": candidate.model, "strategy": candidate.kind}, fields, data=split,
                              progress=False, clock=clock)
        else:
            from .train.loop import Hooks, train

            result = train(fields, data=split, hooks=Hooks(on_epoch=report), progress=False, clock=clock).to_dict()
    except TrainingError as exc:
        candidate.note = str(exc).split(":")[0]
        candidate.needed_seconds = getattr(exc, "needed_seconds", None)
        raise
    candidate.val_acc, candidate.trial_seconds = result["test_acc"], clock.now() - clock.start
    candidate.peak_memory_bytes = result.get("peak_gpu_bytes") or result.get("peak_rss_bytes")
    plan = _time_plan(out)
    if plan and plan.get("step_seconds"):
        candidate.samples_per_second = _batch(candidate, config) / plan["step_seconds"]
    if progress:
        print(f"trial {candidate.name}: validation accuracy {candidate.val_acc:.4f} in {candidate.trial_seconds:.1f} s",
              file=sys.stderr)
    if result.get("stopped_early"):
        candidate.note = "pruned"
        raise optuna.TrialPruned()
    return candidate.val_acc


def trial_dir(trials_dir: Path, candidate: Candidate) -> Path:
    """The run directory of `candidate`'s trial under `trials_dir`."""
    return trials_dir / candidate.name.replace(" ", "-").replace("@", "-")


def _time_plan(out: Path) -> dict[str, Any] | None:
    import yaml

    path = out / "config.yaml"
    return yaml.safe_load(path.read_text()).get("time_plan") if path.is_file() else None


def _least_needing(config: cfg.TrainConfig, found: list[Candidate], seconds: float, search: float, n_train: int,
                   n_val: int, classes: int, left: float) -> TimePlan:
    """No trial fitted its part of the search: the candidate whose trial measured the least time to train at all
    wins, where the rest of the budget gives it that; else the too-short error with what it would need."""
    measured = [c for c in found if c.needed_seconds]
    if not measured or min(c.needed_seconds for c in measured) > left:
        need = f"; the least needing, {min(measured, key=lambda c: c.needed_seconds).name}, needs about " \
               f"{min(c.needed_seconds for c in measured):.0f} s and {max(left, 0):.0f} s are left" if measured else ""
        raise TrainingError(f"--time {config.time} is too short for any candidate: " + "; ".join(
            f"{c.name}: {c.note or 'failed'}" for c in found) + need)
    best = min(measured, key=lambda c: c.needed_seconds)
    reason = (f"no trial fitted its part of the search; it needs the least time to train ({best.needed_seconds:.0f} "
              f"s measured), and {left:.0f} s are left")
    return TimePlan(config.time, seconds, config.data, n_train, n_val, classes, search, found, best.name, reason)


def _prototypes(candidate: Candidate, config: cfg.TrainConfig, split: DataBundle, out: Path) -> dict[str, Any]:
    """Prototypes from the training part's images (all of them: a handful per class), scored on the held-out part."""
    from .fewshot.command import fewshot

    counts = split.train.labels.bincount()
    shots = int(counts[counts > 0].min())
    return fewshot({"source": candidate.model, "shots": [float(shots)], "pool": 0, "out": str(out),
                    "seed": config.seed, "device": config.device, "image_size": candidate.image_size},
                   data=split, progress=False)


def _decide(config: cfg.TrainConfig, found: list[Candidate], seconds: float, search: float, n_train: int,
            n_val: int, classes: int, left: float) -> TimePlan:
    tried = [c for c in found if c.val_acc is not None]
    if not tried:
        return _least_needing(config, found, seconds, search, n_train, n_val, classes, left)
    best = max(tried, key=lambda c: c.val_acc)
    default = found[0] if config.data in BUILTIN_DATASETS else None
    if default is not None and default.val_acc is not None and best is not default and \
            best.val_acc < default.val_acc + CLEAR_MARGIN:
        reason = (f"{config.data}'s default model, its recipe filled to the budget: {best.name} led its trial by "
                  f"{100 * (best.val_acc - default.val_acc):.1f} points, under the {100 * CLEAR_MARGIN:g} that would "
                  f"replace it")
        best = default
    else:
        others = [c.val_acc for c in tried if c is not best]
        lead = f", {100 * (best.val_acc - max(others)):.1f} points ahead of the next" if others else ""
        reason = f"the best validation accuracy in its trial ({best.val_acc:.4f}{lead})"
    return TimePlan(config.time, seconds, config.data, n_train, n_val, classes, search, found, best.name, reason)
