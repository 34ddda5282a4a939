import json

import pytest
import torch
import yaml

import trainforge
from trainforge import config as cfg
from trainforge import runs
from trainforge.errors import CheckpointError, ConfigError, TrainingError
from trainforge.train import recipes
from trainforge.train import Hooks
from trainforge.train.loop import cross_entropy, make_scheduler


def small_config(out, **extra):
    values = {"model": "linear", "epochs": 1, "subset": 5000, "batch_size": 100, "out": str(out),
              "tensorboard": False}
    values.update(extra)
    return values


def test_a_short_real_run_learns_and_writes_its_run_directory(tmp_path):
    result = trainforge.train(small_config(tmp_path / "run", tensorboard=True), progress=False)
    assert result.test_acc > 0.85  # chance is 0.10; 1 epoch of 5,000 real digits
    assert result.steps == 50 and result.world_size == 1 and result.device == "cpu" and result.precision == "32"
    run = tmp_path / "run"
    for name in ("model.safetensors", "model.json", "config.yaml", "state.pt", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["test_acc"] == pytest.approx(result.test_acc)
    assert json.loads((run / "summary.json").read_text())["test_acc"] == pytest.approx(result.test_acc)
    assert not list(run.glob(".*.tmp")), "temporary files left behind"


def test_saved_config_reruns_the_same_training(tmp_path):
    first = trainforge.train(small_config(tmp_path / "a", seed=3), progress=False)
    saved = cfg.load_file(cfg.TrainConfig, tmp_path / "a" / "config.yaml")
    assert saved.recipe == "reference" and saved.lr is not None
    saved.out = str(tmp_path / "b")
    second = trainforge.train(saved, progress=False)
    assert second.test_acc == first.test_acc and second.test_loss == pytest.approx(first.test_loss, abs=1e-9)


def test_load_returns_a_uint8_model_that_matches_eval(trained_run, mnist):
    model = trainforge.load(trained_run)
    assert model.classes == [str(i) for i in range(10)]
    with torch.inference_mode():
        predictions = model(mnist.test.images[:2000]).argmax(1)
    acc = (predictions == mnist.test.labels[:2000]).float().mean().item()
    assert acc > 0.85
    summary = json.loads((trained_run / "summary.json").read_text())
    with torch.inference_mode():
        full = (model(mnist.test.images).argmax(1) == mnist.test.labels).float().mean().item()
    assert full == pytest.approx(summary["test_acc"], abs=1e-6)


class InterruptAt:
    """Cross-entropy that raises KeyboardInterrupt at a given step, as a user's Ctrl-C would."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, logits, labels, images):
        self.calls += 1
        if self.calls == self.step:
            raise KeyboardInterrupt
        return cross_entropy(logits, labels)  # the trainer's own loss, so the runs compare exactly


@pytest.mark.parametrize("interrupt_at", [37, 60])  # mid-epoch after a step checkpoint; just after an epoch end
def test_resume_ends_with_the_same_metrics_as_an_uninterrupted_run(tmp_path, interrupt_at):
    extra = {"epochs": 2, "checkpoint_every": 20, "augment": "translate", "seed": 1}
    whole = trainforge.train(small_config(tmp_path / "whole", **extra), progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainforge.train(small_config(tmp_path / "cut", **extra), hooks=Hooks(loss_fn=InterruptAt(interrupt_at)),
                         progress=False)
    state = runs.safe_torch_load(tmp_path / "cut" / "state.pt")
    assert 0 < state["state"]["step"] < interrupt_at
    resumed = trainforge.train(resume=tmp_path / "cut", progress=False)
    assert resumed.steps == whole.steps == 100
    assert resumed.test_acc == whole.test_acc
    assert resumed.test_loss == pytest.approx(whole.test_loss, abs=1e-7)
    assert resumed.train_loss == pytest.approx(whole.train_loss, abs=1e-7)
    whole_w = runs.load_weights(tmp_path / "whole" / "model.safetensors")
    cut_w = runs.load_weights(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(whole_w[k], cut_w[k]) for k in whole_w)
    assert len(runs.read_metrics(tmp_path / "cut")) == 2


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory"):
        trainforge.train(resume=tmp_path / "missing", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        trainforge.train(resume=tmp_path / "empty", progress=False)


def test_target_accuracy_stops_early(tmp_path):
    result = trainforge.train(small_config(tmp_path / "t", epochs=5, target_acc=0.5), progress=False)
    assert result.stopped_early and result.epochs == 1 and result.test_acc >= 0.5


def test_fractional_epochs_train_part_of_the_last_epoch(tmp_path):
    result = trainforge.train(small_config(tmp_path / "f", epochs=1.5), progress=False)
    assert result.steps == 75 and result.epochs == 1.5


class NaNFrom:
    """Cross-entropy that turns NaN from a given step on (every `every` steps when set)."""

    def __init__(self, step, every=None):
        self.step, self.every, self.calls = step, every, 0

    def __call__(self, logits, labels, images):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, labels)
        hit = self.calls % self.every == 0 if self.every else self.calls >= self.step
        return loss * float("nan") if hit else loss


def test_nonfinite_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"NaN/Inf at step 25; last good checkpoint: .*state.pt \(step 20\)"):
        trainforge.train(small_config(tmp_path / "nan", checkpoint_every=20), hooks=Hooks(loss_fn=NaNFrom(25)),
                         progress=False)
    state = runs.safe_torch_load(tmp_path / "nan" / "state.pt")
    assert state["state"]["step"] == 20
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_skip_nonfinite_counts_the_skipped_steps(tmp_path):
    result = trainforge.train(small_config(tmp_path / "skip", skip_nonfinite=True),
                              hooks=Hooks(loss_fn=NaNFrom(0, every=10)), progress=False)
    assert result.nonfinite_skips == 5 and result.test_acc > 0.85


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_schedules_warm_up_and_end_where_promised(schedule):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    config = recipes.resolve(cfg.TrainConfig(schedule=schedule, warmup=0.2, lr=1.0))
    sched = make_scheduler(config, opt, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 0.2 and max(lrs) == pytest.approx(1.0, rel=0.02)
    if schedule == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[-1] < 0.05


def test_recipes_fill_what_the_user_left_out():
    resolved = recipes.resolve(cfg.TrainConfig(model="cnn", lr=0.5))
    assert resolved.recipe == "cnn" and resolved.lr == 0.5 and resolved.batch_size == recipes.RECIPES["cnn"][
        "batch_size"]
    assert recipes.resolve(cfg.TrainConfig()).model == "linear"
    with pytest.raises(ConfigError, match="unknown recipe 'fast'; known recipes"):
        recipes.resolve(cfg.TrainConfig(recipe="fast"))


def test_models_registered_without_a_recipe_get_the_default_one(tmp_path, mnist):
    @trainforge.register_model("recipe_less_test_model")
    def recipe_less(num_classes, in_channels, image_size):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size ** 2, num_classes))

    resolved = recipes.resolve(cfg.TrainConfig(model="recipe_less_test_model"))
    assert resolved.recipe == "default" and resolved.model == "recipe_less_test_model" and resolved.optimizer == "adamw"
    result = trainforge.train(small_config(tmp_path / "user", model="recipe_less_test_model"), data=mnist,
                              progress=False)
    assert result.test_acc > 0.8
    with pytest.raises(ConfigError, match="recipe 'default' names no model"):
        recipes.resolve(cfg.TrainConfig(recipe="default"))


def test_config_files_reject_unknown_keys_and_wrong_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": "fast"}))
    with pytest.raises(ConfigError, match=r"c.yaml: field 'lr' expects a number, got 'fast'"):
        cfg.load_file(cfg.TrainConfig, path)
    path.write_text(yaml.safe_dump({"learning_rate": 0.1}))
    with pytest.raises(ConfigError, match="unknown field.*learning_rate"):
        cfg.load_file(cfg.TrainConfig, path)
    path.write_text("epochs: -1\n")
    with pytest.raises(ConfigError, match="'epochs' must be > 0"):
        cfg.load_file(cfg.TrainConfig, path)
    path.write_text("optimizer: lion\n")
    with pytest.raises(ConfigError, match="must be one of sgd, adam, adamw"):
        cfg.load_file(cfg.TrainConfig, path)
    path.write_text("[1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfg.load_file(cfg.TrainConfig, path)


def test_config_round_trips_through_yaml():
    config = cfg.TrainConfig(model="mlp", lr=0.3, betas=[0.8, 0.9], compile=True)
    again = cfg.from_dict(cfg.TrainConfig, yaml.safe_load(cfg.dumps(config)))
    assert again == config


def test_missing_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        trainforge.train(small_config(tmp_path / "x", device="cuda"), progress=False)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    result = trainforge.train(small_config(tmp_path / "bf16", model="mlp", precision="bf16"), progress=False)
    assert result.precision == "bf16" and result.test_acc > 0.85


def test_eval_subset_scores_epochs_on_a_subset_and_the_last_on_the_whole_test_set(mnist, tmp_path):
    from trainforge.train.loop import evaluate

    result = trainforge.train(small_config(tmp_path / "run", epochs=2, eval_subset=500), data=mnist, progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["eval_subset"] for m in metrics] == [500, None]
    model = runs.load(tmp_path / "run")
    full = evaluate(model, mnist.test.images, mnist.test.labels, 2000, torch.device("cpu"))
    assert result.test_acc == metrics[-1]["test_acc"] == pytest.approx(full[0])
