"""The model chosen by measurement for a time budget (trainforge/choose.py), on clocks that tick per reading, so
that no outcome depends on the machine's speed."""

from __future__ import annotations

import pytest

from trainforge import config as cfg
from trainforge.choose import CLEAR_MARGIN, Candidate, TimePlan, _decide, candidates_for, choose_model
from trainforge.errors import TrainingError
from trainforge.train import budget


class TickClock:
    """Each reading moves the time on by `tick` seconds: a run's time is then the count of its clock readings."""

    def __init__(self, tick=0.01):
        self.t, self.tick = 0.0, tick

    def now(self):
        self.t += self.tick
        return self.t


def ticking():
    return budget.Clock(TickClock().now)


def test_every_candidate_is_tried_and_the_plan_round_trips(tmp_path, mnist_small):
    found = [Candidate("linear", "scratch", "linear"), Candidate("mlp", "scratch", "mlp")]
    config = cfg.TrainConfig(data="mnist", time="20s", tensorboard=False)
    plan = choose_model(config, budget.Clock(TickClock().now), bundle=mnist_small, candidates=found,
                        trial_clock=ticking, progress=False)
    assert plan.winner in ("linear", "mlp") and plan.val_images == 200 and plan.train_images == 1800
    for c in plan.candidates:
        assert 0.1 < c.val_acc <= 1 and c.samples_per_second > 0 and c.steps_in_budget > 0 and c.peak_memory_bytes
    plan.save(tmp_path / "plan.json")
    assert TimePlan.load(tmp_path / "plan.json") == plan
    table = plan.table()
    assert "linear" in table and "mlp" in table and f"winner: {plan.winner}" in table


def test_a_budget_too_small_for_every_candidate_says_so(mnist_small):
    config = cfg.TrainConfig(data="mnist", time="2s", tensorboard=False)
    # The search's 30% of 2 s leaves a trial too little to start (MIN_TRIAL_SECONDS).
    with pytest.raises(TrainingError, match=r"--time 2s is too short for any candidate: linear: not tried: 0\.6 s of "
                                            r"the search left for it"):
        choose_model(config, budget.Clock(TickClock().now), bundle=mnist_small,
                     candidates=[Candidate("linear", "scratch", "linear")], trial_clock=ticking, progress=False)


def scored(name, acc):
    return Candidate(name, "scratch", name, val_acc=acc)


def test_a_built_in_sets_default_stays_unless_clearly_beaten():
    config = cfg.TrainConfig(data="mnist", time="1m")
    close = _decide(config, [scored("linear", 0.90), scored("cnn", 0.90 + CLEAR_MARGIN / 2)], 60, 10, 900, 100, 10, 40)
    assert close.winner == "linear" and "under the 1 that would replace it" in close.reason
    clear = _decide(config, [scored("linear", 0.90), scored("cnn", 0.95)], 60, 10, 900, 100, 10, 40)
    assert clear.winner == "cnn" and "5.0 points ahead of the next" in clear.reason
    folder = _decide(cfg.TrainConfig(data="/some/folder", time="1m"),
                     [scored("cnn", 0.90), scored("fashion_cnn", 0.905)], 60, 10, 900, 100, 10, 40)
    assert folder.winner == "fashion_cnn"


def test_where_no_trial_fitted_the_candidate_needing_least_wins_if_the_budget_left_gives_it_that():
    config = cfg.TrainConfig(data="/some/folder", time="2m")
    short = [Candidate("cnn@64", "scratch", "cnn", 64, needed_seconds=17, note="--time 9.0s is too short for cnn"),
             Candidate("efficientnet_lite0 full@112", "full", "efficientnet_lite0", 112, needed_seconds=45,
                       note="--time 9.0s is too short for efficientnet_lite0")]
    plan = _decide(config, short, 120, 36, 2700, 300, 10, 70)
    assert plan.winner == "cnn@64" and plan.reason == ("no trial fitted its part of the search; it needs the least "
                                                       "time to train (17 s measured), and 70 s are left")
    with pytest.raises(TrainingError, match=r"too short for any candidate: cnn@64: --time 9\.0s is too short for "
                                            r"cnn; .*; the least needing, cnn@64, needs about 17 s and 12 s are left"):
        _decide(config, short, 120, 36, 2700, 300, 10, 12)


def test_candidates_fit_the_data(mnist_small, mnist_jpeg_folder):
    found = candidates_for(cfg.TrainConfig(data="mnist"), mnist_small)
    names = [c.name for c in found]
    assert names[0] == "linear" and "cnn@28" in names and "fashion_cnn" in names
    assert not any(c.pretrained for c in found)  # 28 px: too small for ImageNet features
    from trainforge.data import load_data

    folder = load_data(str(mnist_jpeg_folder))  # 128 px RGB photos-like, 10 per class
    found = candidates_for(cfg.TrainConfig(data=str(mnist_jpeg_folder)), folder)
    assert {c.name for c in found} == {"cnn@32", "cnn@64", "efficientnet_lite0 linear-probe@112",
                                       "efficientnet_lite0 lora@112", "efficientnet_lite0 full@112",
                                       "efficientnet_lite0 prototypes"}
    assert [(c.name, c.image_size) for c in found][:2] == [("cnn@32", 32), ("cnn@64", 64)]  # the cheaper first
