"""A run directory written by an earlier trainforge (tests/fixtures/legacy_run) still loads, evaluates and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"


@pytest.fixture()
def legacy(tmp_path) -> Path:
    """A copy of the fixture (a linear model trained 2 epochs on a 2-class folder of 4x4 images), writable."""
    shutil.copytree(FIXTURE, tmp_path / "legacy")
    return tmp_path / "legacy"


def test_legacy_run_loads(legacy):
    import trainforge

    model = trainforge.load(legacy / "run")
    assert model.classes == ["dark", "light"]


def test_legacy_run_evaluates_to_its_summary(legacy):
    summary = json.loads((legacy / "run" / "summary.json").read_text())
    result = run_cli("eval", "run", "--json", cwd=legacy)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["test_acc"] == summary["test_acc"]


def test_legacy_run_resumes_with_one_line_per_old_name(legacy):
    result = run_cli("train", "--resume", "run", "--epochs", "3", "--json", "--quiet", cwd=legacy)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["steps"] == 12 and summary["epochs"] == 3.0
    lines = (legacy / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    notes = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert len(notes) == 2, result.stderr
    assert "field 'strategy' is now 'parallel'" in notes[0] and "format 1" in notes[1]
    # The resumed run rewrote its files in today's names.
    assert "parallel: ddp" in (legacy / "run" / "config.yaml").read_text()
    again = run_cli("train", "--resume", "run", "--epochs", "4", "--json", "--quiet", cwd=legacy)
    assert again.returncode == 0 and "deprecated" not in again.stderr, again.stderr


def test_old_strategy_flag_of_train_still_works(legacy):
    result = run_cli("train", "--data", "data", "--model", "linear", "--epochs", "1", "--batch-size", "4",
                     "--strategy", "ddp", "--no-tensorboard", "--out", "new", "--json", "--quiet", cwd=legacy)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("deprecated") == 1 and "--strategy is now --parallel" in result.stderr
    assert "parallel: ddp" in (legacy / "new" / "config.yaml").read_text()


@pytest.fixture(scope="module")
def holdout_run(tmp_path_factory, mnist) -> Path:
    """A linear model trained one epoch on 1,000 MNIST images, a tenth of them held out for validation."""
    import trainforge

    out = tmp_path_factory.mktemp("runs") / "holdout"
    trainforge.train({"model": "linear", "epochs": 1, "subset": 1000, "holdout": True, "out": str(out),
                      "tensorboard": False}, progress=False)
    return out


def test_load_run_data_splits_the_data_as_the_run_did(holdout_run, mnist):
    from trainforge.runs import load_run_data

    data = load_run_data(holdout_run)
    assert len(data.train.labels) == 900 and len(data.val.labels) == 100 and data.evaluation is data.val
    assert torch.equal(data.test.labels, mnist.test.labels)
    assert len(data.dataset.train.labels) == len(mnist.train.labels)
    # The held-out images are among the subset's, never among those trained on.
    trained = {bytes(x.numpy()) for x in data.train.images}
    assert not any(bytes(x.numpy()) in trained for x in data.val.images)


def test_eval_split_val_reproduces_the_validation_accuracy_the_run_reported(holdout_run, trained_run):
    summary = json.loads((holdout_run / "summary.json").read_text())
    val = run_cli("eval", str(holdout_run), "--split", "val", "--json")
    assert val.returncode == 0, val.stderr
    result = json.loads(val.stdout.splitlines()[-1])
    assert (result["split"], result["test_samples"]) == ("val", 100)
    assert result["test_acc"] == summary["test_acc"]
    test = json.loads(run_cli("eval", str(holdout_run), "--json").stdout.splitlines()[-1])
    assert (test["split"], test["test_samples"]) == ("test", 10000)
    refused = run_cli("eval", str(trained_run), "--split", "val")
    assert refused.returncode == 2 and "trained without --holdout" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
