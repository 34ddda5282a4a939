"""--time: the duration parser, the budget filled on a fake clock (no test here depends on the machine's speed), the
flags' errors, and recipes scaled to the data."""

from __future__ import annotations

import json

import pytest
import yaml

import mnist_made
import trainforge
from trainforge import cli, runs
from trainforge import config as cfg
from trainforge.errors import TrainingError
from trainforge.train import Hooks, budget, recipes
from trainforge.train.loop import Schedule, cross_entropy

BUDGET = 10.0  # fake seconds
STEP = 0.05  # fake seconds per optimizer step


class FakeClock:
    """A clock that moves only when a training step runs (through the loss), by `step` seconds a step."""

    def __init__(self, step=STEP, slow_from=None, slow_step=None, interrupt_at=None):
        self.t, self.calls = 0.0, 0
        self.step, self.slow_from, self.slow_step, self.interrupt_at = step, slow_from, slow_step, interrupt_at

    def now(self):
        return self.t

    def loss(self, logits, labels, images):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        slow = self.slow_from is not None and self.calls > self.slow_from
        self.t += self.slow_step if slow else self.step
        return cross_entropy(logits, labels)


def budget_run(out, clock, data=None, resume=None, **extra):
    values = {"model": "linear", "batch_size": 100, "time": f"{BUDGET:g}s", "out": str(out), "tensorboard": False,
              **extra}
    return trainforge.train(None if resume else values, resume=resume, data=data, progress=False,
                            hooks=Hooks(loss_fn=clock.loss), clock=budget.Clock(clock.now, 0.0))


def last_lr(run_dir):
    return runs.read_metrics(run_dir)[-1]["lr"]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("5m", 300), ("1.5h", 5400), ("0.5s", 0.5)])
def test_durations_have_one_spelling(text, seconds):
    assert cfg.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "-3m", "0", "0s", "5", "1e3s", "m"])
def test_a_malformed_duration_names_the_value_and_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"90s, 5m or 1\.5h; got '" + text):
        cfg.parse_duration(text)


def test_the_budget_is_filled_and_the_schedule_ends_with_it(tmp_path, mnist_small):
    clock = FakeClock()
    result = budget_run(tmp_path / "run", clock, data=mnist_small)
    # The whole run, the final evaluation and files included, ends inside the budget less the exit's reserve...
    assert clock.t <= BUDGET - budget.EXIT_SECONDS + STEP
    # ...and fills it: every step the budget had room for was taken.
    assert clock.t >= BUDGET - budget.EXIT_SECONDS - 2 * STEP
    assert result.steps == round(clock.t / STEP)
    lr = recipes.recipe_value("reference", "lr")
    assert last_lr(tmp_path / "run") == pytest.approx(lr / 25_000, rel=1e-3)  # one-cycle ran to its end
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    plan = saved["time_plan"]
    assert saved["time"] == "10s" and plan["steps"] == result.steps and plan["step_seconds"] == pytest.approx(STEP)
    assert saved["epochs"] == pytest.approx(result.steps / 20)  # 2,000 images in batches of 100
    # Fewer images than the recipes': capped at 50 epochs, or the recipe's own steps (10 epochs of 60,000 in 100s).
    assert plan["max_steps"] == max(recipes.MAX_SCALED_EPOCHS * 20, 10 * 600)


def test_a_machine_that_slows_down_shortens_the_rest_of_the_schedule(tmp_path, mnist_small):
    clock = FakeClock(slow_from=60, slow_step=2 * STEP)
    result = budget_run(tmp_path / "run", clock, data=mnist_small)
    assert clock.t <= BUDGET - budget.EXIT_SECONDS + 2 * STEP
    assert result.steps < 0.75 * (BUDGET - budget.EXIT_SECONDS) / STEP  # re-planned, not run at the first plan
    lr = recipes.recipe_value("reference", "lr")
    assert last_lr(tmp_path / "run") == pytest.approx(lr / 25_000, rel=1e-3)  # annealed to the end, not cut off


def test_a_recipe_of_fewer_steps_than_its_first_timing_still_warms_up_and_anneals_in_the_budget(tmp_path, mnist):
    # 50 images in one batch: the cnn recipe's 1.5 epochs are 2 steps, fewer than the budget times before its first
    # plan. The schedule must not have run out by then (it stayed at lr/25,000, untrained, until this was fixed).
    clock = FakeClock(step=5 * STEP)  # about 36 steps: each is an epoch, evaluated and checkpointed
    out = tmp_path / "run"
    result = trainforge.train({"model": "cnn", "width": 8, "batch_size": 100, "time": f"{BUDGET:g}s", "out": str(out),
                               "tensorboard": False}, data=mnist_made.subset(mnist, 50, 100), progress=False,
                              hooks=Hooks(loss_fn=clock.loss), clock=budget.Clock(clock.now, 0.0))
    assert result.steps > 30
    lrs = [row["lr"] for row in runs.read_metrics(out)]
    peak = recipes.recipe_value("cnn", "lr")
    assert max(lrs[: result.steps // 2]) > 0.9 * peak and lrs[-1] == pytest.approx(peak / 25_000, rel=1e-3)


def test_a_budget_too_small_says_what_it_would_need(tmp_path, mnist_small):
    clock = FakeClock()
    with pytest.raises(TrainingError, match=r"--time 1.5s is too short for linear: .* a step takes 50\.0 ms; 10 steps "
                                            r"and the final evaluation need about \d+ s"):
        trainforge.train({"model": "linear", "batch_size": 100, "time": "1.5s", "out": str(tmp_path / "r"),
                          "tensorboard": False}, data=mnist_small, progress=False,
                         hooks=Hooks(loss_fn=clock.loss), clock=budget.Clock(clock.now, 0.0))


def test_a_budget_gone_before_the_first_step_stops_there():
    fake = FakeClock()
    filler = budget.Filler("10s", budget.Clock(fake.now, 0.0), steps_per_epoch=10, batch_size=10, eval_images=10,
                           final_eval_images=10)
    fake.t = 8.9
    filler.check_start("cnn")
    fake.t = 9.0  # the exit's reserve is all that is left
    with pytest.raises(TrainingError, match=r"--time 10s is too short for cnn: 9\.0 s went to loading and planning "
                                            r"before its first step"):
        filler.check_start("cnn")


def test_resume_uses_what_is_left_of_the_budget(tmp_path, mnist_small):
    whole = budget_run(tmp_path / "whole", FakeClock(), data=mnist_small)
    with pytest.raises(KeyboardInterrupt):
        budget_run(tmp_path / "cut", FakeClock(interrupt_at=75), data=mnist_small, checkpoint_every=50)
    state = runs.safe_torch_load(tmp_path / "cut" / "state.pt")["state"]  # the epoch end's after step 50's
    assert state["step"] == 60 and state["budget_spent"] == pytest.approx(60 * STEP)
    clock = FakeClock()
    resumed = budget_run(None, clock, data=mnist_small, resume=tmp_path / "cut")
    # This process had the budget less what the first spent up to its checkpoint.
    assert state["budget_spent"] + clock.t <= BUDGET - budget.EXIT_SECONDS + STEP
    assert abs(resumed.steps - whole.steps) <= 2


def test_the_final_evaluation_is_costed_from_a_timed_one():
    fake = FakeClock()
    filler = budget.Filler("10s", budget.Clock(fake.now, 0.0), steps_per_epoch=1000, batch_size=100,
                           eval_images=1000, final_eval_images=1000)
    for step in range(11):
        filler.timed(step)
        fake.t += STEP
    fake.t -= STEP

    def evaluate():  # 100 images in 0.1 s
        fake.t += 0.1
    filler.time_evaluation(evaluate, 100)
    # 0.7 s spent (10 steps and two timed evaluations) and 1 s kept for the exit leave 8.3 s: 1 s for the final
    # evaluation of 1,000 images, 7.3 s for 146 more steps.
    assert filler.eval_image_seconds == pytest.approx(0.001)
    assert 155 <= filler.plan(10) <= 156


def test_a_small_set_is_filled_up_to_the_scaled_recipes_epoch_cap_and_no_further():
    def filler(cap):
        fake = FakeClock()
        made = budget.Filler("10s", budget.Clock(fake.now, 0.0), steps_per_epoch=2, batch_size=100, eval_images=10,
                             final_eval_images=10, max_steps=cap)
        for step in range(11):
            made.timed(step)
            fake.t += STEP
        return made
    assert filler(None).plan(10) > 100  # the budget holds ~170 steps
    capped = filler(100)
    assert capped.plan(10) == 100 and "ending before the budget: the most a set this small gets" in \
        capped.describe(100)
    assert filler(5).plan(10) == 11  # a cap already passed: one more step, so the schedule can finish


def test_a_stretched_schedule_goes_on_from_where_it_was():
    schedule = Schedule("onecycle", 0.2, 100)
    before = schedule(50)
    schedule.stretch(50, 300)
    assert schedule(50) == pytest.approx(before)
    assert schedule(300) == pytest.approx(1 / 25_000) and schedule(175) == pytest.approx(Schedule(
        "onecycle", 0.2, 100)(75))
    before = schedule(175)
    schedule.stretch(175, 200)  # then shortened
    assert schedule(175) == pytest.approx(before) and schedule(200) == pytest.approx(1 / 25_000)
    factors = [schedule(s) for s in range(175, 201)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_a_saved_budget_reruns_its_resolved_steps(tmp_path, capsys):
    first = budget_run(tmp_path / "a", FakeClock(), subset=2000)
    path = tmp_path / "a" / "config.yaml"
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "b"), "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    assert f"re-running the {first.steps:,} steps, " in out and "not the time budget" in out
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == first.steps
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["time"] is None and saved["time_plan"] is None


@pytest.mark.parametrize("argv, message", [
    (["train", "--time", "5m", "--epochs", "2"], "--time 5m and --epochs 2 exclude each other"),
    (["finetune", "--from", "efficientnet_lite0", "--time", "5m", "--epochs", "2"], "exclude each other"),
    (["train", "--time", "5 minutes"], "field 'time' expects a positive number of seconds, minutes or hours: 90s, "
                                       "5m or 1.5h; got '5 minutes'"),
    (["train", "--time=-3m"], "got '-3m'"),
    (["train", "--time", "0"], "got '0'"),
    (["fewshot", "--from", "efficientnet_lite0", "--time", "1m"], "without --adapt a few-shot classifier trains"),
])
def test_time_flag_errors_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv", [["eval", "somewhere"], ["export", "somewhere", "--out", "x.onnx"], ["tune"],
                                  ["predict", "somewhere", "x.png"]])
def test_verbs_without_training_have_no_time_flag(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--time", "5m"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --time" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted(recipes.RECIPES))
def test_recipes_keep_their_exact_epochs_on_a_set_of_their_own_size(recipe):
    values = {"recipe": recipe, "model": None if recipes.RECIPES[recipe].get("model") else "cnn"}
    config = recipes.resolve(cfg.TrainConfig(**values))
    assert recipes.scale_to_data(config, recipes.RECIPE_IMAGES) == (config, None)


def test_recipes_keep_their_steps_on_other_sizes_within_bounds():
    cnn = recipes.resolve(cfg.TrainConfig(model="cnn"))  # 1.5 epochs of 469 steps of 128
    scaled, line = recipes.scale_to_data(cnn, 6000)  # 47 steps an epoch
    assert scaled.epochs == pytest.approx(1.5 * 469 / 47) and "1.5 epochs are 704 steps" in line
    capped, line = recipes.scale_to_data(cnn, 500)
    assert capped.epochs == recipes.MAX_SCALED_EPOCHS and f"at most {recipes.MAX_SCALED_EPOCHS}" in line
    reference = recipes.resolve(cfg.TrainConfig())  # 10 epochs
    large, line = recipes.scale_to_data(reference, 600_000)
    assert large.epochs == recipes.MIN_SCALED_EPOCHS and "at least 3" in line


def test_a_subset_trains_the_recipes_steps_and_says_so(tmp_path, mnist_small, capsys):
    # The reference recipe at batch 500: 1,200 steps on 60,000 images; 2,000 images give 4 an epoch, 50 epochs at most.
    result = trainforge.train({"batch_size": 500, "out": str(tmp_path / "r"), "tensorboard": False},
                              data=mnist_small)
    assert result.steps == 4 * recipes.MAX_SCALED_EPOCHS
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["epochs"] == recipes.MAX_SCALED_EPOCHS and saved["eval_subset"] == recipes.SCALED_EVAL_SUBSET
    assert "epochs: the reference recipe's 10 epochs are 1,200 steps of 500" in capsys.readouterr().err
    explicit = trainforge.train({"batch_size": 500, "epochs": 2, "out": str(tmp_path / "e"), "tensorboard": False},
                                data=mnist_small, progress=False)
    assert explicit.steps == 8
