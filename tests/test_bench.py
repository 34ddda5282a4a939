"""`trainforge hw`, `trainforge bench` and live training monitoring, on this machine's CPU with real MNIST."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli, wait_for

from trainforge import hw as hw_verb
from trainforge.hardware import ceilings, probe
from trainforge.bench.command import bench, print_table
from trainforge.hardware.flops import count_flops
from trainforge.errors import ConfigError
from trainforge.models import build_classifier


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured_cache(tmp_path_factory) -> dict:
    """A hardware cache filled by `trainforge hw --measure --json`, and that command's output."""
    cache_dir = tmp_path_factory.mktemp("hwcache")
    report = last_json(run_cli("hw", "--measure", "--json", env={"TRAINFORGE_CACHE": str(cache_dir)}))
    return {"dir": cache_dir, "report": report}


def test_hw_json_reports_cpu_fields_null_gpu_fields_and_the_cached_ceilings(measured_cache):
    report = last_json(run_cli("hw", "--json", env={"TRAINFORGE_CACHE": str(measured_cache["dir"])}))
    cpu = report["cpu"]
    assert cpu["model"] and cpu["logical_cpus"] >= 1 and cpu["physical_cores"] >= 1
    assert cpu["isa"] in ("AMX", "AVX-512", "AVX2", "AVX", "SVE", "NEON", "baseline")
    assert cpu["torch_threads"] == torch.get_num_threads()
    assert cpu["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if not torch.cuda.is_available():
        assert report["cuda"] is None
    measured = measured_cache["report"]
    assert report["ceilings"] == measured["ceilings"] and report["measured_at"] == measured["measured_at"]


def test_hw_measure_writes_the_per_machine_cache(measured_cache, tmp_path, monkeypatch, capsys):
    report = measured_cache["report"]
    cpu = report["ceilings"]["cpu"]
    assert set(cpu["matmul_flops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in cpu["matmul_flops"].values())
    assert cpu["memory_bandwidth"] > 0
    assert "host_to_device" not in cpu  # host<->device copies are measured on CUDA devices only
    cache_files = list(measured_cache["dir"].glob("hw-*.json"))
    assert [str(p) for p in cache_files] == [report["cache_file"]]
    monkeypatch.setenv("TRAINFORGE_CACHE", str(measured_cache["dir"]))
    hw_verb.run(argparse.Namespace(measure=False, json=False, quiet=False))
    human = capsys.readouterr().out
    assert "AVX" in human or "NEON" in human or "baseline" in human
    assert "fp32 matmul" in human and "FLOP/s" in human and report["cache_file"] in human.replace("\n", "")
    # Another cache directory holds no measurement of this machine.
    monkeypatch.setenv("TRAINFORGE_CACHE", str(tmp_path))
    empty = hw_verb.run(argparse.Namespace(measure=False, json=True, quiet=True))
    assert empty["ceilings"] is None and empty["cache_file"] is None and empty["cpu"] == report["cpu"]


def test_ceiling_rate_is_the_best_block_on_given_timings(monkeypatch):
    # A clock that each call advances by 10 ms, except in the first, third and fifth timed blocks, which neighbours
    # slowed by 2, 5 and 1 ms a call: noise only ever slows a block, so the ceiling is the fastest block's 100 calls/s
    # (the median block's would be 1/11 ms). The comparison with a plain timing loop is a measurement, in
    # benchmarks/hw_ceiling.py.
    clock, calls = [0.0], [0]
    reps = max(1, int(1.0 / probe.BLOCKS / 0.01))
    slowdown = {0: 0.002, 2: 0.005, 4: 0.001}

    def call():
        calls[0] += 1
        clock[0] += 0.01
        if calls[0] > 2:  # after the warm-up call and the call that sizes the blocks
            clock[0] += slowdown.get((calls[0] - 3) // reps, 0.0)

    monkeypatch.setattr(probe.time, "perf_counter", lambda: clock[0])
    assert probe._best_rate(call, torch.device("cpu"), seconds=1.0) == pytest.approx(100.0)
    assert calls[0] == 2 + probe.BLOCKS * reps
    monkeypatch.setattr(probe, "_best_rate", lambda fn, device, seconds: 50.0)
    assert probe.measure_matmul(torch.device("cpu"), "fp32", size=64) == 2 * 64 ** 3 * 50.0


def test_matmul_side_shrinks_only_where_a_full_size_call_would_not_fit_a_block(monkeypatch):
    # Calls cost c * side^3 seconds; a block holds seconds / BLOCKS = 0.1 s.
    cpu = torch.device("cpu")
    for rate, side in ((5e-11, 1024), (1e-9, 256), (1e-6, 128)):
        monkeypatch.setattr(probe, "_call_seconds", lambda fn, device, c=rate: c * fn.side ** 3)
        monkeypatch.setattr(probe, "_matmul_call", lambda device, dtype, n: SimpleNamespace(side=n))
        assert probe.matmul_size(cpu, "bf16", seconds=0.5) == side, rate

    def unsupported(device, dtype, n):
        raise RuntimeError("addmm not implemented for 'BFloat16'")
    monkeypatch.setattr(probe, "_matmul_call", unsupported)
    assert probe.matmul_size(cpu, "bf16") is None


def test_flop_count_of_linear_is_the_hand_count_and_leaves_the_model_alone():
    model = build_classifier("linear", 10, 1, 28, (0.1307,), (0.3081,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = count_flops(model, torch.zeros(5, 1, 28, 28, dtype=torch.uint8))
    # One 784x10 matmul per sample: 2*784*10 forward; the weight gradient doubles it (no input gradient).
    assert count.forward == 2 * 784 * 10 == 15680
    assert count.train == 2 * count.forward == 31360
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    cnn = build_classifier("cnn", 10, 1, 28, (0.1307,), (0.3081,))
    cnn_count = count_flops(cnn, torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    # The first conv alone: 28*28 positions x 32 channels x 9 taps, 2 FLOPs each; backward costs about 2x forward.
    assert cnn_count.forward > 2 * 28 * 28 * 32 * 9
    assert 2 * cnn_count.forward < cnn_count.train < 3 * cnn_count.forward
    assert cnn.net[0][1].num_batches_tracked.item() == 0  # BatchNorm statistics untouched


def test_flop_count_of_a_depthwise_convolution_counts_its_weight_gradient_once_per_channel():
    # 64 channels, 3x3 depthwise on 16x16: 2*64*9*256 FLOPs forward; its weight and input gradients cost as much
    # each (torch's own formula multiplied the weight gradient by the 64 groups).
    net = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 1), torch.nn.Conv2d(64, 64, 3, padding=1, groups=64))
    count = count_flops(net, torch.zeros(1, 64, 16, 16))
    pointwise, depthwise = 2 * 64 * 64 * 256, 2 * 64 * 9 * 256
    assert count.forward == pointwise + depthwise
    assert count.train == 2 * pointwise + 3 * depthwise  # no input gradient for the first layer


def test_bench_linear_reports_exact_flops_mfu_and_a_plot(measured_cache, tmp_path, capsys):
    plot = tmp_path / "bench.png"
    result = last_json(run_cli("bench", "--model", "linear", "--device", "cpu", "--batch-size", "64", "256",
                               "--steps", "3", "--warmup", "1", "--plot", str(plot), "--json",
                               env={"TRAINFORGE_CACHE": str(measured_cache["dir"])}))
    assert result["flops_per_sample"] == {"forward": 15680, "train": 31360}
    assert [r["batch_size"] for r in result["results"]] == [64, 256]
    ceiling = measured_cache["report"]["ceilings"]["cpu"]["matmul_flops"]["fp32"]
    for row in result["results"]:
        assert row["device"] == "cpu" and row["precision"] == "32" and row["ceiling_dtype"] == "fp32"
        assert row["ceiling_flops_per_second"] == pytest.approx(ceiling)
        assert row["train_flops_per_second"] == pytest.approx(31360 * row["train_samples_per_second"])
        assert row["train_mfu"] == pytest.approx(row["train_flops_per_second"] / ceiling)
        assert row["inference_mfu"] == pytest.approx(15680 * row["inference_samples_per_second"] / ceiling)
        # The CPU is the baseline: its rows claim no speed-up over themselves.
        assert row["train_speedup_vs_cpu"] is None and row["inference_speedup_vs_cpu"] is None
    assert result["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print_table(result)
    table = capsys.readouterr().out
    assert "linear on mnist" in table and "15,680" in table
    assert len([line for line in table.splitlines() if line.startswith("│") and line.endswith("│     - │")]) == 4


def test_speedups_divide_another_device_by_the_cpu_row_of_its_batch_size():
    from trainforge.bench.command import _add_speedups

    def row(device, precision, batch_size, train, inference):
        return {"device": device, "precision": precision, "batch_size": batch_size, "compile": False,
                "train_samples_per_second": train, "inference_samples_per_second": inference}

    rows = [row("cpu", "32", 64, 100.0, 400.0), row("cuda:0", "32", 64, 800.0, 2000.0),
            row("cuda:0", "bf16", 64, 1600.0, 6000.0), row("cuda:0", "32", 128, 900.0, 2500.0)]
    _add_speedups(rows)
    speedups = [(r["train_speedup_vs_cpu"], r["inference_speedup_vs_cpu"]) for r in rows]
    # bf16 has no CPU row here, so it compares with the CPU's fp32; batch 128 has no CPU row at all.
    assert speedups == [(None, None), (8.0, 5.0), (16.0, 15.0), (None, None)]


def test_step_timings_give_samples_per_second_median_and_p90_of_the_timed_steps(monkeypatch):
    from trainforge.bench import command

    # A clock that each step advances by the next of these durations: two slow warm-up steps, then ten timed ones.
    durations = iter([5.0, 5.0] + [0.010] * 8 + [0.050, 0.100])
    clock = [0.0]

    def step():
        clock[0] += next(durations)

    monkeypatch.setattr(command.time, "perf_counter", lambda: clock[0])
    times = command._time_steps(step, torch.device("cpu"), steps=10, warmup=2)
    assert times == pytest.approx([0.010] * 8 + [0.050, 0.100])
    figures = command._figures("train", "train_step_ms", 64, times)
    # 640 samples in 0.23 s; the median step 10 ms; the 90th percentile 9/10 of the way from the 9th to the 10th
    # slowest (numpy's linear interpolation): 50 + 0.1 * 50 ms.
    assert figures == pytest.approx({"train_samples_per_second": 640 / 0.23, "train_step_ms": 10.0,
                                     "train_step_ms_p90": 55.0})


def test_bench_cnn_reports_mfu_against_the_cached_ceiling(tmp_path, monkeypatch):
    # In-process (the CLI path is covered above), which spares a second interpreter start on a busy machine. The
    # cache holds a ceiling set here, so the MFU checked is the verb's arithmetic, not how fast this machine is now.
    monkeypatch.setenv("TRAINFORGE_CACHE", str(tmp_path))
    ceilings.write_cache({"measured_at": "now", "machine": {}, "ceilings": {"cpu": {"matmul_flops": {"fp32": 4e11}}}})
    result = bench("cnn", devices=["cpu"], precisions=["32", "fp16"], batch_sizes=[32], steps=2, warmup=1)
    (row,) = result["results"]
    flops = result["flops_per_sample"]
    assert flops["train"] > flops["forward"] > 0 and row["ceiling_flops_per_second"] == 4e11
    for mode, per_sample in (("train", flops["train"]), ("inference", flops["forward"])):
        assert row[f"{mode}_flops_per_second"] == pytest.approx(per_sample * row[f"{mode}_samples_per_second"])
        assert row[f"{mode}_mfu"] == pytest.approx(row[f"{mode}_flops_per_second"] / 4e11) and row[f"{mode}_mfu"] > 0
    # fp16 does not exist on the CPU: skipped and said why, not fatal.
    assert [(s["device"], s["precision"]) for s in result["skipped"]] == [("cpu", "fp16")]


def test_bench_image_size_resizes_inside_the_model(measured_cache, monkeypatch):
    monkeypatch.setenv("TRAINFORGE_CACHE", str(measured_cache["dir"]))
    result = bench("linear", devices=["cpu"], batch_sizes=[16], steps=1, warmup=0, image_size=56)
    # The data stay 28x28 uint8 on the device; the model resizes them to 56x56, so its one matmul is 3136 x 10.
    assert result["image_shape"] == [1, 28, 28] and result["image_size"] == 56
    assert result["flops_per_sample"] == {"forward": 2 * 56 * 56 * 10, "train": 4 * 56 * 56 * 10}
    assert bench("linear", devices=["cpu"], batch_sizes=[16], steps=1, warmup=0)["image_size"] == 28


def test_user_mistakes_raise_errors_that_name_the_value(tmp_path):
    from trainforge.bench.command import plot

    with pytest.raises(ConfigError, match="directory .*missing does not exist"):
        plot({"results": []}, tmp_path / "missing" / "bench.png")
    with pytest.raises(ConfigError, match="cannot write the hardware cache"):
        (tmp_path / "file").write_text("not a directory")
        ceilings.write_cache({"ceilings": {}}, tmp_path / "file" / "hw.json")
    with pytest.raises(ConfigError, match="--image-size must be >= 1, got 0"):
        bench("linear", devices=["cpu"], image_size=0)
    with pytest.raises(ConfigError, match="--steps must be >= 1, got 0"):
        bench("linear", devices=["cpu"], steps=0)
    with pytest.raises(ConfigError, match="--batch-size 100000 is larger than the 60000 training images of mnist"):
        bench("linear", devices=["cpu"], batch_sizes=[100000])
    with pytest.raises(ConfigError, match="no combination of --device and --precision can run here"):
        bench("linear", devices=["cpu"], precisions=["fp16"])


def test_training_records_monitoring_fields(measured_cache, tmp_path, monkeypatch):
    import trainforge
    from trainforge.data import load_data

    bundle = load_data("mnist", subset=1024)
    config = {"model": "linear", "epochs": 1, "batch_size": 256}

    monkeypatch.setenv("TRAINFORGE_CACHE", str(tmp_path / "empty"))
    trainforge.train({**config, "out": str(tmp_path / "unmeasured")}, data=bundle, progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "unmeasured" / "metrics.jsonl").read_text().splitlines()]
    assert record["mfu"] is None  # no ceiling cached: no MFU, and TensorBoard skipped the null
    assert record["flops_per_second"] == pytest.approx(31360 * record["train_samples_per_second"])
    assert record["memory_mb"] > 0 and record["max_memory_mb"] > 0

    monkeypatch.setenv("TRAINFORGE_CACHE", str(measured_cache["dir"]))
    trainforge.train({**config, "out": str(tmp_path / "measured"), "tensorboard": False}, data=bundle,
                     progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "measured" / "metrics.jsonl").read_text().splitlines()]
    ceiling = ceilings.lookup_ceiling(torch.device("cpu"), "32")
    assert ceiling == measured_cache["report"]["ceilings"]["cpu"]["matmul_flops"]["fp32"]
    assert record["mfu"] == pytest.approx(record["flops_per_second"] / ceiling)
    assert record["train_samples_per_second"] >= record["samples_per_second"]  # the latter includes evaluation


def test_nvml_sampler_averages_utilization_and_power_per_epoch(monkeypatch):
    # No GPU here: a stand-in for the nvidia-ml-py module exercises the sampling thread and its per-epoch means.
    import sys
    import types

    from trainforge.train import monitor

    calls = []
    readings = iter([(40, 100_000), (60, 140_000)] + [(50, 120_000)] * 100_000)  # (utilization %, power mW)
    power = [0]

    def utilization(handle):
        util, power[0] = next(readings)
        return types.SimpleNamespace(gpu=util)

    fake = types.SimpleNamespace(
        NVMLError=RuntimeError, nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetUtilizationRates=utilization, nvmlDeviceGetPowerUsage=lambda handle: power[0])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(monitor, "_nvml_handle", lambda pynvml, device: "handle")
    monkeypatch.setattr(monitor, "NVML_INTERVAL_S", 0.001)
    sampler = monitor._NvmlSampler(torch.device("cuda", 0))
    assert sampler.drain() == {"gpu_util_percent": None, "gpu_power_watts": None, "gpu_power_max_watts": None}
    sampler.start()
    wait_for(lambda: len(sampler.samples) >= 2, "two NVML samples")
    sampler.close()
    stats = sampler.drain()
    assert stats["gpu_power_max_watts"] == 140.0
    assert 40 <= stats["gpu_util_percent"] <= 60 and 100 <= stats["gpu_power_watts"] <= 140
    assert calls == ["init", "shutdown"] and sampler.drain()["gpu_util_percent"] is None
