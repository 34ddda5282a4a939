"""What trains when no model is named: the precedence of recipes, each data set's default, a folder's choice."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torchvision.io import write_png

from conftest import run_cli
from trainforge import config as cfg
from trainforge.errors import ConfigError
from trainforge.train import defaults, recipes


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """scikit-learn's 1,797 handwritten digits (8x8, 17 gray levels) written as PNGs, one folder per class."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    root = tmp_path_factory.mktemp("digits")
    pixels = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8)
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        write_png(image[None], str(folder / f"{i}.png"))
    return root


def rgb_folder(root, side: int, per_class: int = 2):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            write_png(torch.randint(0, 256, (3, side, side), dtype=torch.uint8), str(root / c / f"{i}.png"))
    return root


def test_a_digits_folder_without_a_model_trains_the_cnn_from_scratch(digits_folder, tmp_path):
    out = tmp_path / "run"
    # Given epochs, as the recipe's 704 steps (50 epochs of 1,618 images; tests/test_budget.py) would cost 5x more.
    result = run_cli("train", "--data", str(digits_folder), "--epochs", "10", "--out", str(out), "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("model: "))
    assert line.startswith("model: cnn, trained from scratch: 1,618 grayscale 8x8 training images in 10 classes"), line
    assert "epochs: the cnn recipe" not in result.stderr  # given epochs are never scaled
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == "cnn" and saved["recipe"] == "cnn" and saved["epochs"] == 10
    assert json.loads((out / "summary.json").read_text())["test_acc"] >= 0.95


def test_a_folder_of_rgb_photos_picks_the_pretrained_model(tmp_path, monkeypatch):
    folder = rgb_folder(tmp_path / "photos", 96, per_class=3)  # one image of each class held out
    choice = defaults.default_choice(cfg.TrainConfig(data=str(folder)))
    assert choice.pretrained and choice.model == "efficientnet_lite0"
    assert "4 RGB 96x96 training images in 2 classes" in choice.reason
    # From Python, the loop trains from scratch only: it names the way to fine-tune instead of guessing.
    with pytest.raises(ConfigError, match="finetune"):
        recipes.resolve(cfg.TrainConfig(data=str(folder)))
    # The CLI hands the run to `finetune` with the options given (fine-tuning at 224 px is not run here).
    from trainforge import cli
    from trainforge.finetune import command as finetune_command

    calls = []
    monkeypatch.setattr(finetune_command, "finetune", lambda options, given, **kw: calls.append((options, given))
                        or {"run_dir": None})
    assert cli.main(["train", "--data", str(folder), "--epochs", "2", "--quiet"]) == 0
    assert calls == [({"source": "efficientnet_lite0"}, {"data": str(folder), "epochs": 2.0})]
    assert cli.main(["train", "--data", str(folder), "--nproc", "2"]) == 2 and len(calls) == 1
    # Resized below 64 px, the same images go to the cnn.
    assert defaults.default_choice(cfg.TrainConfig(data=str(folder), image_size=32)).model == "cnn"


@pytest.mark.parametrize("channels, side, per_class, expected", [
    (1, 28, 6000, "cnn"), (3, 32, 5000, "cnn"), (3, 63, 10, "cnn"),
    (3, 64, 10, "efficientnet_lite0"), (3, 224, 100_000, "efficientnet_lite0"),
    (1, 128, 5000, "cnn"), (1, 128, 200, "efficientnet_lite0"),
])
def test_the_folder_choice_weighs_size_channels_and_images_per_class(channels, side, per_class, expected):
    facts = defaults.FolderFacts("x", channels, side, side, per_class * 4, 4)
    assert defaults.choose_for_folder(facts).model == expected


def test_recipe_precedence(monkeypatch):
    monkeypatch.setitem(recipes.DATASET_RECIPES, "mnist", {"linear": "reference", "cnn": "speedrun"})

    def chosen(**values):
        resolved = recipes.resolve(cfg.TrainConfig(**values))
        return resolved.recipe, resolved.model

    assert chosen(model="cnn", recipe="mlp") == ("mlp", "cnn")  # an explicit recipe wins
    assert chosen(model="cnn") == ("speedrun", "cnn")  # else the data set's recipe for the chosen model
    assert chosen(model="mlp") == ("mlp", "mlp")  # else the model's own
    assert chosen() == ("reference", "linear")  # the data set's default model
    assert chosen(data="nowhere") == ("reference", "linear")  # else 'reference' (loading then names the problem)


def test_models_shows_each_data_sets_default_with_what_was_measured(monkeypatch, tmp_path):
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"mnist": {"reference": {"acc_mean": 0.9256, "acc_std": 0.0, "seeds": 1,
                                                            "seconds_median": 2.5, "device": "cpu", "threads": 2,
                                                            "date": "2026-12-01"}}}))
    monkeypatch.setattr(recipes, "MEASURED_FILE", measured)
    from trainforge.models.command import dataset_defaults

    rows = {row["data"]: row for row in dataset_defaults()}
    assert rows["mnist"]["recipe"] == "reference" and rows["mnist"]["measured"]["acc_mean"] == 0.9256
    assert rows["fashion-mnist"]["measured"] is None
    result = run_cli("models")
    assert result.returncode == 0 and "fashion-mnist" in result.stdout and "mnist" in result.stdout
