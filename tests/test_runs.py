"""A run directory written by an earlier trainforge (tests/fixtures/legacy_run) still loads, evaluates and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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


def test_legacy_run_resumes(legacy):
    result = run_cli("train", "--resume", "run", "--epochs", "3", "--json", "--quiet", cwd=legacy)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["steps"] == 12 and summary["epochs"] == 3.0
    lines = (legacy / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
