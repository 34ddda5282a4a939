#!/usr/bin/env python3
"""The GPU proof in one command: every CUDA path of trainforge run, timed and recorded, in one short visit.

Each step is its own subprocess with its own time limit, so a failure or a hang ends that step only; steps call the
CLI (`python -m trainforge ...`) and the scripts under benchmarks/, never trainforge's internals. Steps start only
while --budget seconds remain (default 255: with the pack's installation, within 5 minutes on an H200), each
limited to what is left; `--only` reruns some of them.

Steps, in order of value (issue 19):
  environment        python, torch, CUDA, the GPUs, onnxruntime's providers, `pip check`, `pip list`
  hw                 `hw --measure`: fp32/tf32/bf16/fp16 matmul ceilings, memory and host<->device bandwidth
  speedrun           benchmarks/time_to_accuracy.py on CUDA: the speedrun recipe against the peer, 5 seeds
  reference          the reference recipe on CUDA (`train --recipe reference`)
  bench_*            `bench` in fp32 and bf16 on the CPU and CUDA: linear, cnn, and resnet18 at 224 px (the CPU at
                     batch 8 and 2 steps, the GPU at 128): samples/s, MFU, peak GPU memory, speed-up over the CPU
  train_cnn, export, onnxruntime, serve
                     the cnn recipe trained on CUDA, exported to ONNX (parity-checked), timed on each ONNX Runtime
                     provider present (benchmarks/onnx_providers.py), served under load batched and unbatched
                     (benchmarks/serve_load.py)
  compile_*          the cnn in bf16 without and with --compile; compile time = the difference of their wall-clocks
  batch_auto_*       `train --batch-size auto` for cnn and resnet18 at 224 px, where the CLI accepts it
  nccl               `train --nproc N` over NCCL, only when N > 1 GPUs are visible
  finetune_speed     benchmarks/finetune_speed.py on CUDA (bf16, --compile), where that script exists
  fashion_recipe     `train --data fashion-mnist` with its own recipe, where trainforge has one
  time_choice        `train --time 3m` without --model on 10,000 Fashion-MNIST images: the candidate the GPU's
                     measured speed makes the winner (trainforge/choose.py), and each candidate's figures

Writes to --out: gpu_results.json (each step's command, status, seconds, summary and its own JSON result),
gpu_results.md (tables to paste into benchmarks/RESULTS.md) and gpu_check.log (every step's output). Exits 1 if
a step that ran failed or timed out.

--dry-run runs the same steps on the CPU with tiny sizes and MNIST in place of Fashion-MNIST, several at once (its
numbers measure nothing), so CI proves the script on a fresh clone.

Usage:
  python benchmarks/gpu_check.py --out gpu-results
  python benchmarks/gpu_check.py --out gpu-results-2 --only finetune_speed fashion_recipe
  python benchmarks/gpu_check.py --dry-run --out /tmp/x
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
OK, FAILED, TIMED_OUT = "ok", "failed", "timed out"
UNAVAILABLE, SKIPPED, NO_TIME = "not available in this version", "skipped", "not run: time budget spent"
MIN_STEP_S = 15  # a step with less time than this left is not started
GRACE_S = 10  # after SIGTERM, before SIGKILL

ENVIRONMENT_PROBE = """
import json, platform, subprocess, sys
import torch
try:
    import onnxruntime
    providers = onnxruntime.get_available_providers()
except ImportError as exc:
    providers = f"not importable: {exc}"
pip = [sys.executable, "-m", "pip"]
check = subprocess.run([*pip, "check"], capture_output=True, text=True).stdout.strip().splitlines()
listed = subprocess.run([*pip, "list", "--format=json"], capture_output=True, text=True).stdout
gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpus": gpus, "gpu_names": [torch.cuda.get_device_name(i) for i in range(gpus)],
                  "cpus": len(__import__("os").sched_getaffinity(0)), "onnxruntime_providers": providers,
                  "pip_check": [] if check == ["No broken requirements found."] else check,
                  "pip_list": json.loads(listed or "[]")}))
"""


@dataclasses.dataclass
class Step:
    name: str
    title: str
    argv: list[str]  # after the python executable, run from the repository root
    timeout: float
    summary: Callable[[dict, dict[str, dict]], str] | None = None  # (its record, records so far) -> one line
    needs: tuple[str, ...] = ()  # steps that must have succeeded first
    after: tuple[str, ...] = ()  # steps that must have finished first (their results feed the summary)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to the environment
    status: str | None = None  # set when the step is not to run (UNAVAILABLE, SKIPPED), with the reason
    reason: str = ""


@dataclasses.dataclass
class Context:
    dry: bool
    work: Path  # runs, exported files and the hardware cache: outside --out, which keeps only the results
    env: dict[str, str]
    gpus: int = 0
    features: dict[str, str | None] = dataclasses.field(default_factory=dict)  # name -> why unavailable, or None
    log_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def size(self, real: list[str], dry: list[str]) -> list[str]:
        return dry if self.dry else real

    @property
    def fashion(self) -> str:
        """The data of the Fashion-MNIST steps: in a dry run MNIST, which ships with trainforge (a fresh clone has no
        Fashion-MNIST), with the model and recipe Fashion-MNIST would get."""
        return "mnist" if self.dry else "fashion-mnist"

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"


def tf(*args: str) -> list[str]:
    return ["-m", "trainforge", *args]


def script(name: str, *args: str) -> list[str]:
    return [str(REPO / "benchmarks" / name), *args]


def plan_measurements(ctx: Context) -> list[Step]:
    """hw, the speed races and the bench comparisons."""
    d, dry = ctx.device, ctx.dry
    devices = ["cpu"] if dry else ["cpu", "cuda"]
    tiny = ["--batch-size", "32", "--steps", "1", "--warmup", "0"] if dry else []
    side = "16" if dry else "224"  # the dry run's resnet18 sees 16 px: 224 px costs minutes on a small CPU
    steps = [
        Step("hw", "hw --measure", tf("hw", "--measure", "--json"), 120, summarize_hw),
        Step("speedrun", "speedrun vs peer, time to 99% (time_to_accuracy.py)",
             script("time_to_accuracy.py", "--device", d, "--json", *(["--quick", "--seeds", "1"] if dry else [])),
             150, summarize_race),
        Step("reference", "reference recipe (train --recipe reference)",
             tf("train", "--recipe", "reference", "--device", d, "--out", str(ctx.work / "reference"),
                "--no-tensorboard", "--json", *(["--subset", "2000", "--epochs", "1"] if dry else [])),
             90, summarize_train),
    ]
    for model in ("linear", "cnn"):
        steps.append(Step(f"bench_{model}", f"bench {model}", tf("bench", "--model", model, "--device", *devices,
                                                                "--precision", "32", "bf16", "--json", *tiny),
                          120, summarize_bench))
    # The dry run's resnet18 skips bf16, whose first steps on a CPU without native bf16 take seconds.
    resnet = ["bench", "--model", "resnet18", "--image-size", side, "--precision", "32", *([] if dry else ["bf16"]),
              "--json"]
    # On the CPU, 224 px training steps of this stride-1 ResNet cost seconds each: a small batch and 2 steps.
    steps += [
        Step("bench_resnet18_224_cpu", f"bench resnet18 at {side} px, CPU (batch 8)",
             tf(*resnet, "--device", "cpu", "--batch-size", "8", "--steps", "1" if dry else "2", "--warmup",
                "0" if dry else "1"), 90, summarize_bench),
        Step("bench_resnet18_224", f"bench resnet18 at {side} px, {d} (batch {'8' if dry else '128'})",
             tf(*resnet, "--device", d, "--batch-size", "8" if dry else "128", *tiny[2:]), 120, summarize_bench,
             after=("bench_resnet18_224_cpu",)),
    ]
    cnn = ["bench", "--model", "cnn", "--device", d, "--precision", "bf16", "--json", *tiny]
    steps += [
        Step("compile_off", "cnn bf16, eager", tf(*cnn), 90, summarize_bench),
        # Inductor takes minutes to compile on a 2-core CPU: the dry run checks the step with compilation disabled.
        Step("compile_on", "cnn bf16, --compile" + (" (dry run: nothing compiled)" if dry else ""),
             tf(*cnn, "--compile"), 240, summarize_compile, after=("compile_off",),
             env={"TORCHDYNAMO_DISABLE": "1"} if dry else {}),
    ]
    return steps


def plan_batch_auto(ctx: Context) -> list[Step]:
    """`train --batch-size auto` for the cnn and resnet18 at 224 px (one epoch of a Fashion-MNIST subset), where the
    CLI accepts it: the batch size chosen and the memory it used."""
    steps = []
    side = "16" if ctx.dry else "224"
    # The dry run trains in fp32 (a CPU's first bf16 steps of resnet18 take seconds while oneDNN builds its kernels)
    # and evaluates on a held-out part of its 64 images, not on the 10,000 test images.
    work = (["--subset", "64", "--epochs", "1", "--precision", "32", "--holdout"] if ctx.dry
            else ["--subset", "10000", "--epochs", "1"])
    for name, model in (("batch_auto_cnn", ["--model", "cnn"]),
                        ("batch_auto_resnet18_224", ["--model", "resnet18", "--image-size", side])):
        argv = tf("train", "--data", ctx.fashion, *model, "--device", ctx.device, "--batch-size", "auto",
                  "--out", str(ctx.work / name), "--no-tensorboard", "--json", *work)
        title = f"train {model[1]}{f' at {model[3]} px' if len(model) > 2 else ''} --batch-size auto"
        step = Step(name, title, argv, 300, summarize_batch_auto)
        if ctx.features["batch_size_auto"]:
            step.status, step.reason = UNAVAILABLE, ctx.features["batch_size_auto"]
        steps.append(step)
    return steps


def plan_deployment(ctx: Context) -> list[Step]:
    """The cnn trained, exported, run on each ONNX Runtime provider and served under load."""
    run, onnx = str(ctx.work / "cnn"), str(ctx.work / "cnn.onnx")
    dry = ctx.dry
    return [
        Step("train_cnn", "cnn recipe (train --model cnn)",
             tf("train", "--model", "cnn", "--device", ctx.device, "--out", run, "--no-tensorboard", "--json",
                *(["--subset", "500", "--epochs", "1", "--width", "8"] if dry else [])), 120, summarize_train),
        Step("export", "export --format onnx (parity-checked)",
             tf("export", run, "--format", "onnx", "--out", onnx, "--json",
                *(["--check-images", "100"] if dry else [])), 120, summarize_export, needs=("train_cnn",)),
        Step("onnxruntime", "ONNX Runtime per provider (onnx_providers.py)",
             script("onnx_providers.py", onnx, "--json", *(["--batch-size", "32", "--iterations", "3"] if dry else [])),
             60, summarize_providers, needs=("export",)),
        Step("serve", "serve under load, batched vs unbatched (serve_load.py)",
             script("serve_load.py", "--source", run,
                    *(["--requests", "40", "--warmup", "8", "--clients", "4"] if dry else [])),
             150, summarize_serve, needs=("train_cnn",)),
    ]


def plan_other_issues(ctx: Context) -> list[Step]:
    """NCCL with several GPUs, and the measurements other issues ask for where their features exist."""
    nproc = 2 if ctx.dry else ctx.gpus
    work = ["--recipe", "reference", "--subset", "1024", "--epochs", "1"] if ctx.dry else ["--recipe", "cnn"]
    nccl = Step("nccl", f"train --nproc {nproc} ({'gloo on the CPU' if ctx.dry else 'NCCL'})",
                tf("train", "--nproc", str(nproc), "--device", ctx.device, "--out", str(ctx.work / "ddp"),
                   "--no-tensorboard", "--json", *work), 180, summarize_train)
    if not ctx.dry and ctx.gpus < 2:
        nccl.status, nccl.reason = SKIPPED, f"{ctx.gpus} GPU visible: the NCCL path needs 2 or more"
    finetune = Step("finetune_speed", "fine-tune speed (finetune_speed.py, bf16, --compile)",
                    script("finetune_speed.py", "--device", ctx.device, "--json",
                           *(["--quick"] if ctx.dry else ["--precision", "bf16", "--compile"])), 240,
                    summarize_finetune_speed)
    fashion = Step("fashion_recipe", "Fashion-MNIST recipe (train --data fashion-mnist)",
                   tf("train", "--data", ctx.fashion, "--device", ctx.device, "--out", str(ctx.work / "fashion"),
                      "--no-tensorboard", "--json",
                      *(["--model", "fashion_cnn", "--subset", "256", "--epochs", "1", "--holdout"] if ctx.dry
                        else [])),
                   300, summarize_train)
    # The measured model choice (train --time without --model): which candidate this GPU's speed makes the winner.
    choice = Step("time_choice", "measured model choice (train --time, no --model)",
                  tf("train", "--data", ctx.fashion, "--device", ctx.device, "--out", str(ctx.work / "time_choice"),
                     "--no-tensorboard", "--json", *(["--subset", "300", "--time", "60s"] if ctx.dry
                                                      else ["--subset", "10000", "--time", "3m"])),
                  240, summarize_time_choice)
    for step in (finetune, fashion, choice):
        if ctx.features[step.name]:
            step.status, step.reason = UNAVAILABLE, ctx.features[step.name]
    return [nccl, finetune, fashion, choice]


def detect_features(ctx: Context) -> dict[str, str | None]:
    """Which features of other issues this version has: name -> None, or why it is not available."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # two interpreter starts, side by side
        helping, listing = (pool.submit(execute, tf(*argv), 120, ctx.env) for argv in (("train", "--help"),
                                                                                      ("models", "--json")))
        (rc, helped, _, _), (rc_models, models, err, _) = helping.result(), listing.result()
    if rc_models != 0:
        fashion = f"`trainforge models --json` failed: {tail(err)}"
    elif "fashion" in models.lower():
        fashion = None
    else:
        fashion = "`trainforge models` lists no Fashion-MNIST recipe"
    return {"batch_size_auto": None if rc == 0 and "--lr-scaling" in helped
            else "`trainforge train` does not accept --batch-size auto",
            "finetune_speed": None if (REPO / "benchmarks" / "finetune_speed.py").is_file()
            else "benchmarks/finetune_speed.py does not exist",
            "fashion_recipe": fashion,
            "time_choice": None if rc == 0 and "--time" in helped else "`trainforge train` does not accept --time"}


def summarize_finetune_speed(record: dict, records: dict[str, dict]) -> str:
    """Each row's trainforge arm against the channels-last plain loop: speed-up and both accuracies."""
    rows = record["result"]["rows"]
    plain = {r["row"]: r for r in rows if r["arm"] == "plain-cl"}
    return "; ".join(f"{r['row']}: {r['speedup_vs_plain_cl']:.2f}x plain-cl, acc {r['test_acc']:.3f} vs "
                     f"{plain[r['row']]['test_acc']:.3f}" for r in rows if r["arm"] == "trainforge")


def execute(argv: list[str], timeout: float, env: dict[str, str]) -> tuple[int | None, str, str, float]:
    """(exit status, or None if it ran past `timeout`; stdout; stderr; seconds) of `python ARGV` in the repository.

    The command runs in its own process group, which is ended afterwards: a server or a worker it started cannot
    outlive its step.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, text=True, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        seconds = time.monotonic() - start
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        out.seek(0)
        err.seek(0)
        return rc, out.read(), err.read(), seconds


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def last_json(stdout: str) -> Any:
    """The last line of `stdout` that is a JSON object, or None."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def run_step(step: Step, ctx: Context, records: dict[str, dict], deadline: float, log: Any) -> dict:
    """Runs `step` unless it is unavailable, blocked by a failed step it needs, or out of time; its record."""
    command = " ".join([*(f"{k}={v}" for k, v in step.env.items()), command_line(step.argv)])
    record: dict[str, Any] = {"name": step.name, "title": step.title, "command": command,
                              "status": step.status, "reason": step.reason, "seconds": None, "summary": "",
                              "result": None}
    blocked = [name for name in step.needs if records.get(name, {}).get("status") != OK]
    left = deadline - time.monotonic()
    if record["status"] is None and blocked:
        record.update(status=SKIPPED, reason=f"needs {', '.join(blocked)}, which did not succeed")
    elif record["status"] is None and left < MIN_STEP_S:
        record.update(status=NO_TIME, reason=f"{max(0.0, left):.0f} s of the budget left")
    if record["status"] is not None:
        print(f"[{step.name}] {record['status']}: {record['reason']}", file=sys.stderr, flush=True)
        return record
    limit = min(step.timeout, left)
    print(f"[{step.name}] {record['command']} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
    rc, out, err, seconds = execute(step.argv, limit, {**ctx.env, **step.env})
    with ctx.log_lock:
        log.write(f"=== {step.name}: {record['command']}\n--- exit {rc} after {seconds:.1f} s; stdout:\n{out}\n"
                  f"--- stderr:\n{err}\n")
        log.flush()
    status = OK if rc == 0 else TIMED_OUT if rc is None else FAILED
    record.update(status=status, returncode=rc, seconds=round(seconds, 2), limit_s=round(limit), result=last_json(out))
    if status != OK:
        record["reason"] = f"no exit within {limit:.0f} s" if rc is None else tail(err) or f"exit status {rc}"
    if record["result"] is not None and step.summary is not None:  # a failed step's JSON, if any, is read too
        try:
            record["summary"] = step.summary(record, records)
        except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError) as exc:
            record["summary"] = f"(no summary: {type(exc).__name__} {exc})"
    print(f"[{step.name}] {status} in {seconds:.1f} s: {record['summary'] or record['reason']}", file=sys.stderr,
          flush=True)
    return record


def run_all(steps: list[Step], ctx: Context, records: dict[str, dict], deadline: float, log: Any, jobs: int) -> None:
    """Runs `steps` into `records`, `jobs` at a time, each once the steps it needs or follows have finished.

    Steps are started in their order and only wait for earlier ones, so a waiting step never holds up its own wait.
    """
    finished = {step.name: threading.Event() for step in steps}

    def one(step: Step) -> None:
        try:
            for name in (*step.needs, *step.after):
                if name in finished:
                    finished[name].wait()
            records[step.name] = run_step(step, ctx, records, deadline, log)
        finally:
            finished[step.name].set()

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, step) for step in steps]:
            future.result()


def command_line(argv: list[str]) -> str:
    """The command as a user would type it from the repository root."""
    if argv[0] == "-c":
        return "python -c <environment probe>"
    shown = ["trainforge", *argv[2:]] if argv[:2] == ["-m", "trainforge"] else ["python", *argv]
    return " ".join(os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in shown)


# Bench steps with no CPU row of their own, and the step whose CPU rows their speed-ups are taken from.
CPU_BASELINE = {"bench_resnet18_224": "bench_resnet18_224_cpu"}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def speedups(name: str, rows: list[dict], records: dict[str, dict]) -> list[float | None]:
    """Each bench row's training speed-up over the CPU: its own, else against the baseline step's CPU row."""
    baseline = records.get(CPU_BASELINE.get(name, ""), {}).get("result") or {"results": []}
    cpu = {r["precision"]: r for r in baseline["results"] if r["device"] == "cpu"}
    return [r["train_speedup_vs_cpu"] if r.get("train_speedup_vs_cpu") is not None
            else r["train_samples_per_second"] / cpu[r["precision"]]["train_samples_per_second"]
            if r["precision"] in cpu else None for r in rows]


def summarize_environment(record: dict, records: dict[str, dict]) -> str:
    env = record["result"]
    gpus = f"{env['gpus']} GPU(s)" + (f": {', '.join(env['gpu_names'])}" if env["gpus"] else "")
    problems = env["pip_check"]
    return (f"Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), {gpus}, {env['cpus']} CPUs; "
            f"onnxruntime providers: {env['onnxruntime_providers']}; pip check: {len(problems)} problem(s)"
            + (f", first: {problems[0]}" if problems else ""))


def summarize_hw(record: dict, records: dict[str, dict]) -> str:
    parts = []
    for device, c in record["result"]["ceilings"].items():
        flops = ", ".join(f"{dtype} {v / 1e12:,.2f}" for dtype, v in c["matmul_flops"].items() if v)
        text = f"{device}: matmul TFLOP/s {flops}; copy {c['memory_bandwidth'] / 1e9:,.0f} GB/s"
        if "host_to_device" in c:
            h2d, d2h = c["host_to_device"], c["device_to_host"]
            text += (f"; host->device {h2d['pinned'] / 1e9:.1f} GB/s pinned, {h2d['pageable'] / 1e9:.1f} pageable; "
                     f"device->host {d2h['pinned'] / 1e9:.1f} pinned")
        parts.append(text)
    return "; ".join(parts)


def summarize_race(record: dict, records: dict[str, dict]) -> str:
    r = record["result"]
    arms = [f"{arm} {100 * r[arm]['acc_mean']:.2f}% (min {100 * r[arm]['acc_min']:.2f}%) in "
            f"{r[arm]['seconds_median']:.3f} s" for arm in ("speedrun", "peer")]
    return f"{'; '.join(arms)}: speedrun {r['speedup']:.2f}x faster (median of {r['seeds']} seeds, {r['device']})"


def summarize_train(record: dict, records: dict[str, dict]) -> str:
    r = record["result"]
    return (f"{100 * r['test_acc']:.2f}% after {r['epochs']:g} epochs in {r['train_seconds']:.2f} s of training "
            f"({r['samples_per_second']:,.0f} samples/s, {r['device']}, precision {r['precision']}, "
            f"{r['world_size']} process(es))")


def summarize_time_choice(record: dict, records: dict[str, dict]) -> str:
    """The winner, why, and each candidate's measured speed and validation accuracy."""
    r = record["result"]
    plan = r["plan"]
    def measured(c: dict) -> str:
        if c["val_acc"] is None:
            return f"{c['name']} not measured"
        return f"{c['name']} {c['samples_per_second']:,.0f} samples/s val {c['val_acc']:.3f}"
    rows = ", ".join(measured(c) for c in plan["candidates"])
    return f"picked {plan['winner']} ({plan['reason']}); {rows}; then {summarize_train(record, records)}"


def summarize_batch_auto(record: dict, records: dict[str, dict]) -> str:
    r = record["result"]
    import yaml

    chosen = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
    gpu = f", GPU max allocated {r['peak_gpu_bytes'] / 2 ** 30:.1f} GiB" if r.get("peak_gpu_bytes") else ""
    return (f"batch {chosen['batch_size']} (lr {chosen['lr']:.3g}, {chosen['accumulate']} micro-batch(es)): "
            f"{summarize_train(record, records)}; peak RSS {r['peak_rss_bytes'] / 2 ** 30:.1f} GiB{gpu}")


def summarize_bench(record: dict, records: dict[str, dict]) -> str:
    rows = record["result"]["results"]
    parts = []
    for row, speedup in zip(rows, speedups(record["name"], rows, records)):
        memory = f", peak {row['peak_memory_mb']:,.0f} MiB" if row.get("peak_memory_mb") is not None else ""
        times = f", {speedup:.1f}x CPU" if speedup is not None and row["device"] != "cpu" else ""
        parts.append(f"{row['device']} {row['precision']} b{row['batch_size']}: train "
                     f"{row['train_samples_per_second']:,.0f}/s (MFU {_pct(row['train_mfu'])}), infer "
                     f"{row['inference_samples_per_second']:,.0f}/s{times}{memory}")
    return "; ".join(parts)


def summarize_compile(record: dict, records: dict[str, dict]) -> str:
    eager = records["compile_off"]
    (on,), (off,) = record["result"]["results"], eager["result"]["results"]
    ratio = {mode: on[f"{mode}_samples_per_second"] / off[f"{mode}_samples_per_second"]
             for mode in ("train", "inference")}
    return (f"{summarize_bench(record, records)}; {ratio['train']:.2f}x eager training, {ratio['inference']:.2f}x "
            f"inference; compile time ~{record['seconds'] - eager['seconds']:.1f} s (this step's wall-clock minus "
            f"the eager one's)")


def summarize_export(record: dict, records: dict[str, dict]) -> str:
    r = record["result"]
    parity = r["parity"]
    return (f"{r['exporter']} exporter, opset {r.get('opset')}, {r['size_bytes']:,} bytes; {r['checked_with']} on "
            f"{parity['images']} images: max |logit diff| {parity['max_abs_diff']:.1e}, top-1 agreement "
            f"{parity['top1_agreement']:.2%}")


def summarize_providers(record: dict, records: dict[str, dict]) -> str:
    r = record["result"]
    parts = [f"{name.removesuffix('ExecutionProvider')} {p['samples_per_second']:,.0f} samples/s "
             f"({p['batch_ms']:.2f} ms per batch of {r['batch_size']}, max |logit diff| vs CPU "
             f"{p['max_abs_logit_diff_vs_cpu']:.1e})" for name, p in r["results"].items()]
    parts += [f"{name.removesuffix('ExecutionProvider')}: not in this onnxruntime build" for name in r["missing"]]
    return f"onnxruntime {r['onnxruntime']}: " + "; ".join(parts)


def summarize_serve(record: dict, records: dict[str, dict]) -> str:
    r = record["result"]
    parts = [f"{backend}: batched {b['throughput']:,.0f} req/s (p99 {b['latency_ms_p99']:.1f} ms, mean batch "
             f"{b['mean_batch']:.1f}), unbatched {u['throughput']:,.0f} req/s: ratio {res['ratio']:.2f}x"
             for backend, res in r["backends"].items() for b, u in [(res["batched"], res["unbatched"])]]
    return (f"{'; '.join(parts)} ({r['requests']} requests, {r['clients']} clients); zero 5xx and malformed "
            f"requests all 4xx: {r['errors_ok']}")


def machine_line(environment: dict) -> str:
    env = environment.get("result") or {}
    if not env:
        return "machine unknown (the environment probe failed)"
    gpus = f"{env['gpus']}x {env['gpu_names'][0]}" if env["gpus"] else "no GPU"
    return f"{gpus}, {env['cpus']} CPUs, Python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    """The results as Markdown for benchmarks/RESULTS.md: one row per step, then one per bench measurement."""
    records = {r["name"]: r for r in report["steps"]}
    dry = " --dry-run" if report["dry_run"] else ""
    lines = [f"### GPU proof: `python benchmarks/gpu_check.py{dry}`, {report['date']}, {report['machine']}", ""]
    if report["dry_run"]:
        lines += ["Dry run: every step on the CPU with tiny sizes. The figures show that the script works; they "
                  "measure nothing.", ""]
    lines += [f"{report['total_seconds']:.0f} s in all (budget {report['budget_s']:.0f} s). Per step:", "",
              "| step | status | s | result |", "|---|---|---:|---|"]
    for r in report["steps"]:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        detail = "; ".join(x for x in (r["summary"], r["reason"] if r["status"] != OK else "") if x)
        lines.append(f"| {_cell(r['title'])} | {r['status']} | {seconds} | {_cell(detail)} |")
    lines += ["", "Bench measurements (MFU: of the measured matmul ceiling of that device and precision; x CPU: "
              "training samples/s over the CPU's, same precision):", "",
              "| step | device | precision | batch | train samples/s | train MFU | infer samples/s | infer MFU | "
              "x CPU | peak MiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in records.items():
        rows = (r.get("result") or {}).get("results") if r["status"] == OK and name != "onnxruntime" else None
        for row, speedup in zip(rows or [], speedups(name, rows or [], records)):
            memory = "" if row.get("peak_memory_mb") is None else f"{row['peak_memory_mb']:,.0f}"
            lines.append(f"| {name} | {row['device']} | {row['precision']} | {row['batch_size']} | "
                         f"{row['train_samples_per_second']:,.0f} | {_pct(row['train_mfu'])} | "
                         f"{row['inference_samples_per_second']:,.0f} | {_pct(row['inference_mfu'])} | "
                         f"{'' if speedup is None or row['device'] == 'cpu' else f'{speedup:.1f}x'} | {memory} |")
    return "\n".join(lines) + "\n"


def plan(ctx: Context) -> list[Step]:
    """Every step, the most wanted first (the speedrun, bf16 MFU, the serving ratio), since the budget cuts the tail."""
    measurements = plan_measurements(ctx)
    compiling = [s for s in measurements if s.name.startswith("compile_")]
    return [*(s for s in measurements if s not in compiling), *plan_deployment(ctx), *compiling,
            *plan_batch_auto(ctx), *plan_other_issues(ctx)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_results.json, .md and the log")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes")
    parser.add_argument("--budget", type=float,
                        help="seconds after which no step starts (default: 255, so that the pack's installation and "
                             "this fit 5 minutes; 1200 with --dry-run, whose small steps are slow on a small CPU)")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (the environment always)")
    parser.add_argument("--jobs", type=int,
                        help="steps run at once: 1 (the default) for measurements, which steps side by side would "
                             "disturb; with --dry-run up to 4, one per CPU (the default)")
    args = parser.parse_args()
    if args.jobs is None:
        args.jobs = min(4, os.cpu_count() or 1) if args.dry_run else 1
    if args.jobs < 1 or (args.jobs > 1 and not args.dry_run):
        parser.error("--jobs must be 1, or more with --dry-run (measurements run one at a time)")
    if args.budget is None:
        args.budget = 1200.0 if args.dry_run else 255.0
    args.out.mkdir(parents=True, exist_ok=True)
    start, started_at = time.monotonic(), datetime.datetime.now().astimezone()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINFORGE_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ctx = Context(dry=args.dry_run, work=work, env=env)
    records: dict[str, dict] = {}
    try:
        with open(args.out / "gpu_check.log", "w") as log:
            probe = Step("environment", "environment", ["-c", ENVIRONMENT_PROBE], 120, summarize_environment)
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # beside the probe: nothing measured
                features = pool.submit(detect_features, ctx)
                records["environment"] = run_step(probe, ctx, records, start + args.budget, log)
                ctx.features = features.result()
            ctx.gpus = (records["environment"]["result"] or {}).get("gpus", 0)
            steps = plan(ctx)
            unknown = set(args.only or []) - {s.name for s in steps}
            if unknown:
                parser.error(f"--only: unknown step(s) {', '.join(sorted(unknown))}; steps: "
                             f"{', '.join(s.name for s in steps)}")
            run_all([s for s in steps if args.only is None or s.name in args.only], ctx, records,
                    start + args.budget, log, args.jobs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"date": started_at.strftime("%Y-%m-%d %H:%M %Z"), "dry_run": args.dry_run,
              "machine": machine_line(records["environment"]), "budget_s": args.budget,
              "total_seconds": round(time.monotonic() - start, 1), "features": ctx.features,
              "steps": [records[name] for name in ["environment", *(s.name for s in steps)] if name in records]}
    (args.out / "gpu_results.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "gpu_results.md").write_text(markdown(report))
    bad = [r["name"] for r in records.values() if r["status"] in (FAILED, TIMED_OUT)]
    print(f"{len(records)} steps in {report['total_seconds']:.0f} s; failed or timed out: {', '.join(bad) or 'none'};"
          f" results in {args.out}/gpu_results.json and .md", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
