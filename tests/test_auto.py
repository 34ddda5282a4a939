"""`trainforge auto` (trainforge/auto/): one real run on a tiny digits folder, killed after its search and resumed,
shared by the end-to-end checks; the decisions (int8 kept, candidates dropped for latency) on given measurements;
bad input as one line and status 2. Nothing here depends on the machine's speed: the runs' clocks tick per reading
(budget.TICK_ENV), so a budget is a count of clock readings."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from conftest import digits_folder, run_cli
from trainforge import cli
from trainforge.auto import deploy
from trainforge.choose import Candidate
from trainforge.train.budget import TICK_ENV


def test_a_run_killed_after_its_search_resumes_and_writes_every_file(auto_run):
    folder, out, killed, resumed = auto_run
    assert killed.returncode == -9, killed.stderr  # killed by the fault hook, after the search was recorded
    assert resumed.returncode == 0, resumed.stderr
    for name in ("auto.json", "plan.json", "split.json", "report.html", "study.db", "run/model.safetensors"):
        assert (out / name).is_file(), name
    onnx = sorted(p.name for p in out.glob("*.onnx"))
    assert onnx in (["model-fp32.onnx"], ["model-int8.onnx"])  # one file: the one deployed
    values = json.loads(resumed.stdout.splitlines()[-1])
    assert values["serve_command"] == f"trainforge serve {out / onnx[0]}"
    assert values["deploy"]["deployed"] == str(out / onnx[0])
    # The search was not run again: its stage was recorded once, and the resumed run counted what it had spent.
    assert [r["after_s"] > 0 for r in values["resumed"]] == [True]
    assert values["stages"]["search"]["done"] and values["elapsed_s"] >= values["resumed"][0]["after_s"]
    assert "resumed" in (out / "report.html").read_text()


def test_auto_json_holds_every_decision_and_the_plan_against_the_actual(auto_run):
    _, out, _, _ = auto_run
    values = json.loads((out / "auto.json").read_text())
    assert values["finished"] and values["budget_seconds"] == 40.0
    for stage in ("plan", "search", "train", "deploy", "report"):
        entry = values["stages"][stage]
        assert entry["done"] and entry["planned_s"] > 0 and entry["actual_s"] > 0, stage
    assert values["winner"] in [c["name"] for c in values["candidates"]]
    assert values["final_training"]["winner"] == values["winner"]
    deployed = values["deploy"]
    assert 0 <= deployed["heldout_acc"] <= 1 and deployed["heldout_images"] == 20
    assert deployed["fp32"]["parity"]["images"] == 20
    cpu = next(s for s in deployed["speed"] if s["device"] == "cpu")
    assert cpu["latency_ms_p99"] >= cpu["latency_ms_p50"] > 0 and str(cpu["best_batch"]) in cpu["by_batch"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["winner"] == values["winner"] and set(plan["stages"]) == set(values["stages"])
    # Deployment and report reserved what the winner's trial model was measured to need, at least their shares.
    for stage in ("deploy", "report"):
        assert values["reserve_s"][stage] >= values["stages"][stage]["planned_s"]


def test_the_temperature_is_kept_in_the_model_only_where_it_lowers_the_heldout_error(auto_run):
    _, out, _, _ = auto_run
    values = json.loads((out / "auto.json").read_text())
    calibration = values["calibration"]
    plan = json.loads((out / "plan.json").read_text())
    assert calibration["temperature"] > 0 and calibration["validation_images"] == plan["val_images"]  # choose's part
    assert calibration["kept"] == (calibration["ece_after"] < calibration["ece_before"])
    stored = json.loads((out / "run" / "model.json").read_text()).get("temperature", 1.0)
    assert stored == (calibration["temperature"] if calibration["kept"] else 1.0)
    held = values["heldout"]
    assert held["images"] == 20 and held["ece"] == pytest.approx(calibration["ece_after" if calibration["kept"]
                                                                             else "ece_before"])
    assert len(held["per_class"]) == 10 and sum(r["recall_n"] for r in held["per_class"]) == 20
    assert len(held["uncertain_classes"]) == 10  # 2 held-out images per class: every figure is uncertain
    page = (out / "report.html").read_text()
    assert "These figures are uncertain" in page and html.escape(calibration["why"]) in page


def test_the_split_manifest_holds_out_images_the_search_and_training_never_saw(auto_run):
    folder, out, _, _ = auto_run
    split = json.loads((out / "split.json").read_text())
    held = {name for name, _ in split["heldout"]}
    trained = {name for name, _ in split["train"]}
    assert len(held) == 20 and len(trained) == 60 and not held & trained
    assert held | trained == {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}
    # Two held out per class (a fifth of 10), the rest trained on.
    counts = {}
    for name, label in split["heldout"]:
        counts[label] = counts.get(label, 0) + 1
    assert set(counts.values()) == {2}


def test_the_same_out_again_is_refused_naming_resume_and_overwrite(auto_run):
    folder, out, _, _ = auto_run
    result = run_cli("auto", str(folder), "--time", "40s", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"trainforge auto: error: --out {out} already holds a run (auto.json); continue it with --resume {out}, "
        f"choose another --out, or pass --overwrite to replace it"]


def test_int8_is_kept_only_within_half_a_point_and_agreeing_with_fp32():
    assert deploy.keep_int8(0.900, 0.896, 0.99)[0]  # 0.4 points lost
    assert deploy.keep_int8(0.900, 0.905, 0.99)[0]  # gained
    kept, why = deploy.keep_int8(0.900, 0.894, 0.99)  # 0.6 points lost
    assert not kept and "loses more than 0.5 points" in why
    kept, why = deploy.keep_int8(0.900, 0.900, 0.97)  # as accurate, but a different classifier
    assert not kept and "agrees with fp32 on fewer than 98%" in why


def test_max_latency_drops_the_candidates_slower_than_it():
    found = [Candidate("cnn@64", "scratch", "cnn", 64), Candidate("efficientnet_lite0 full@112", "full",
                                                                   "efficientnet_lite0", 112)]
    measured = {"cnn@64": 0.4, "efficientnet_lite0 full@112": 7.5}
    kept, dropped = deploy.within_latency(found, measured, 5.0)
    assert [c.name for c in kept] == ["cnn@64"]
    assert dropped == [{"candidate": "efficientnet_lite0 full@112", "latency_ms": 7.5,
                        "why": "7.50 ms per image at batch 1 > --max-latency-ms 5"}]
    kept, dropped = deploy.within_latency(found, measured, 10.0)
    assert len(kept) == 2 and not dropped


@pytest.fixture
def bad(tmp_path, capsys, monkeypatch):
    """`trainforge auto --time 1m ARGS` run in this process (a mistake stops it before training): its one stderr
    line, after checking the exit status is 2."""
    monkeypatch.setenv(TICK_ENV, "0.02")

    def run(*args: str) -> str:
        status = cli.main(["auto", "--time", "1m", *args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert status == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]
    return run


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.zeros(1, 8, 8, dtype=torch.uint8), str(path))


def test_bad_input_is_one_line_and_status_2(tmp_path, bad):
    (tmp_path / "empty").mkdir()
    assert "no class folders" in bad(str(tmp_path / "empty"))
    for i in range(4):
        png(tmp_path / "one" / "a" / f"{i}.png")
    assert "one class (a); a classifier needs at least 2 class folders" in bad(str(tmp_path / "one"))
    for c, n in (("a", 4), ("b", 2)):
        for i in range(n):
            png(tmp_path / "small" / c / f"{i}.png")
    assert "class 'b' has 1 training image(s) after the held-out part; every class needs at least 2" in \
        bad(str(tmp_path / "small"))
    assert "--time expects a positive number" in bad(str(tmp_path / "small"), "--time", "5 minutes")
    assert not (tmp_path / "out" / "auto.json").exists()


def test_unreadable_images_are_named_and_skipped_only_when_asked(tmp_path, mnist, bad):
    folder = digits_folder(tmp_path / "digits", mnist, per_class=4)
    broken = next(next(folder.iterdir()).iterdir())
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    line = bad(str(folder))
    assert f"1 unreadable image(s): {broken}" in line and "--skip-bad-images" in line
    from trainforge.auto.inputs import split_data

    split = split_data(str(folder), data_dir=None, seed=0, skip_bad=True, memory_budget=None, progress=False)
    assert split.skipped and str(broken.relative_to(folder)) in split.manifest["skipped"]
    assert split.manifest["train_images"] + split.manifest["heldout_images"] == 39


def test_a_budget_too_small_says_what_it_would_need(tmp_path, mnist, bad):
    folder = digits_folder(tmp_path / "digits", mnist, per_class=4)
    line = bad(str(folder), "--time", "2s", "--quiet")  # the plan printed before the search is progress
    assert line.startswith("trainforge auto: error: --time 2s is too short")
    assert "auto needs about --time" in line or "none could start training" in line


def test_the_plan_names_where_the_heldout_part_comes_from():
    from types import SimpleNamespace

    from trainforge.auto.pipeline import plan_text

    record = SimpleNamespace(values={"budget": "5m"}, seconds=300.0)
    for kind, fraction, said in (("val/", None, "the folder's own val/"),
                                 ("stratified", 0.2, "a seeded (0) stratified 20%"),
                                 ("built-in", 0.2, "a seeded (0) stratified 20% of the training images")):
        manifest = {"data": "d", "kind": kind, "seed": 0, "fraction": fraction, "train_images": 3000,
                    "heldout_images": 1000}
        text = plan_text(record, SimpleNamespace(manifest=manifest, skipped=[], image_size=112), [])
        assert f"1,000 held out ({said})" in text, text
