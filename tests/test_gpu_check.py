"""benchmarks/gpu_check.py: the GPU proof's steps run, each isolated, and land in the JSON and the Markdown table."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, load_benchmark, wait_for

gpu_check = load_benchmark("gpu_check")

STEPS = ["environment", "hw", "speedrun", "reference", "bench_linear", "bench_cnn", "bench_resnet18_224_cpu",
         "bench_resnet18_224", "train_cnn", "export", "onnxruntime", "serve", "compile_off", "compile_on",
         "batch_auto_cnn", "batch_auto_resnet18_224", "nccl", "finetune_speed", "fashion_recipe",
         "time_choice"]
# Steps for features of other issues: "not available in this version" until those land, then run like the rest.
FEATURE_STEPS = {"batch_auto_cnn": "batch_size_auto", "batch_auto_resnet18_224": "batch_size_auto",
                 "finetune_speed": "finetune_speed", "fashion_recipe": "fashion_recipe",
                 "time_choice": "time_choice"}


# Steps the dry run leaves to other tests: the two recipe races (tests/test_speed.py runs their scripts end to end)
# resnet18's --batch-size auto (the cnn's step takes the same path to the same summary), the linear and cnn benches
# (tests/test_bench.py runs bench; resnet18's CPU row takes the same path to the same summary), resnet18's bench on
# the GPU (on a CPU the same command as the CPU row's), `train --nproc` (tests/test_distributed.py) and the measured
# model choice (a minute of trials; tests/test_choose.py runs that path, test_time_choice_summary below its summary).
ELSEWHERE = ("speedrun", "reference", "bench_linear", "bench_cnn", "batch_auto_resnet18_224", "bench_resnet18_224",
             "nccl", "time_choice")


def test_the_plan_holds_every_step():
    features = dict.fromkeys(FEATURE_STEPS.values())
    assert [s.name for s in gpu_check.plan(gpu_check.Context(dry=True, work=REPO, env={}, features=features))] == \
        STEPS[1:]


def test_dry_run_runs_the_steps_and_writes_the_json_and_the_table(tmp_path):
    run = [s for s in STEPS if s not in ELSEWHERE]
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path), "--only", *run[1:]], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_results.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == run and report["dry_run"]
    for name, step in steps.items():
        if name in FEATURE_STEPS and report["features"][FEATURE_STEPS[name]]:
            assert step["status"] == gpu_check.UNAVAILABLE and step["reason"] == report["features"][FEATURE_STEPS[name]]
        else:
            assert step["status"] == gpu_check.OK and step["summary"], step
            assert not step["summary"].startswith("(no summary"), step
    assert steps["bench_resnet18_224_cpu"]["result"]["image_size"] == 16  # --image-size reached bench
    assert steps["serve"]["result"]["errors_ok"]
    assert steps["export"]["result"]["parity"]["top1_agreement"] >= 0.999
    assert "CPUExecutionProvider" in steps["onnxruntime"]["result"]["results"]
    table = (tmp_path / "gpu_results.md").read_text()
    assert table.startswith("### GPU proof: `python benchmarks/gpu_check.py --dry-run`") and "Dry run:" in table
    assert all(f"| {step['title']} | {step['status']} |" in table for step in report["steps"])
    assert "| bench_resnet18_224_cpu | cpu | 32 | 8 |" in table
    log = (tmp_path / "gpu_check.log").read_text()
    assert all(f"=== {name}: " in log for name, s in steps.items() if s["seconds"] is not None)


def test_time_choice_summary_names_the_pick_and_each_candidates_measurements():
    plan = {"winner": "cnn", "reason": "best validation accuracy",
            "candidates": [{"name": "cnn", "samples_per_second": 5120.0, "val_acc": 0.91},
                           {"name": "linear", "samples_per_second": None, "val_acc": None}]}
    result = {"plan": plan, "test_acc": 0.9, "epochs": 2.5, "train_seconds": 100.0, "samples_per_second": 3000.0,
              "device": "cuda", "precision": "bf16", "world_size": 1}
    line = gpu_check.summarize_time_choice({"result": result}, {})
    assert line.startswith("picked cnn (best validation accuracy); cnn 5,120 samples/s val 0.910, linear not measured")
    assert line.endswith("90.00% after 2.5 epochs in 100.00 s of training (3,000 samples/s, cuda, precision bf16, "
                         "1 process(es))")


def run(step, records=None, budget=60.0):
    ctx = gpu_check.Context(dry=True, work=REPO, env={})
    with open("/dev/null", "w") as log:
        return gpu_check.run_step(step, ctx, records or {}, time.monotonic() + budget, log)


def test_a_failing_step_is_recorded_with_its_error_and_blocks_only_what_needs_it():
    failed = run(gpu_check.Step("a", "a", ["-c", "import sys; sys.exit('a broke')"], 30))
    assert failed["status"] == gpu_check.FAILED and failed["returncode"] == 1 and failed["reason"] == "a broke"
    blocked = run(gpu_check.Step("b", "b", ["-c", "pass"], 30, needs=("a",)), {"a": failed})
    assert blocked["status"] == gpu_check.SKIPPED and "needs a" in blocked["reason"] and blocked["seconds"] is None
    late = run(gpu_check.Step("c", "c", ["-c", "pass"], 30), budget=gpu_check.MIN_STEP_S - 1)
    assert late["status"] == gpu_check.NO_TIME
    summary = run(gpu_check.Step("d", "d", ["-c", "print('{\"x\": 2}')"], 30, lambda r, _: f"x={r['result']['x']}"))
    assert summary["status"] == gpu_check.OK and summary["result"] == {"x": 2} and summary["summary"] == "x=2"


def test_a_hanging_step_is_stopped_with_the_processes_it_started(tmp_path):
    # The step starts a child that would outlive the wait below, says its pid, sleeps 60 s, then leaves a file: a
    # step waited for to its end (not stopped at its limit) would leave the file.
    finished = tmp_path / "finished"
    code = ("import json, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(300)']); print(json.dumps({'child': child.pid}), flush=True); time.sleep(60); "
            f"open({str(finished)!r}, 'w').close()")
    record = run(gpu_check.Step("hang", "hang", ["-c", code], 5))  # time for the child to start, on a busy machine
    assert record["status"] == gpu_check.TIMED_OUT and not finished.exists()
    # Gone, or dead and awaiting its reaper (a killed process still runs until the busy CPU lets it exit).
    wait_for(lambda: process_state(record["result"]["child"]) in (None, "Z"), "the step's child to end")


def process_state(pid: int) -> str | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return status.split("\nState:\t", 1)[1][0]
