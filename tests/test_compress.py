"""Compression: channel and magnitude pruning, distillation, int8/bf16 quantization, and the report."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch_pruning  # noqa: F401  (a hard dependency: a broken install fails here, not as skipped tests)

from conftest import run_cli

QUICK = ["--test-images", "500", "--latency-calls", "10", "--repeats", "1", "--runtimes", "eager,onnxruntime"]
KEYS = {"name", "test_acc", "params", "size_bytes", "latency_ms_p50", "latency_ms_p99", "throughput"}


def quick_options(**kwargs):
    from trainforge.compress import Options

    return Options(test_images=500, latency_calls=10, repeats=1, runtimes="eager,onnxruntime",
                   progress=False, **kwargs)


def test_int8_cli_report(small_cnn_run, tmp_path):
    out = tmp_path / "int8"
    result = run_cli("compress", str(small_cnn_run), "--quantize", "int8", "--out", str(out), "--json", *QUICK)
    assert result.returncode == 0, result.stderr
    variants = json.loads(result.stdout.strip().splitlines()[-1])["variants"]
    assert [v["name"] for v in variants] == ["baseline", "int8-static", "int8-dynamic"]
    assert all(KEYS <= set(v) for v in variants)
    base, static, dynamic = variants
    # Calibrated int8 keeps the fp32 answers on nearly every image.
    assert abs(static["test_acc"] - base["test_acc"]) <= 0.02
    # Weights are stored in int8 (a quarter of the bytes); in a net of 3.7k weights the graph and the scales are a
    # fixed overhead of similar size, so the file shrinks less than 4x here (the MNIST cnn: benchmarks/RESULTS.md).
    assert static["size_bytes"] < base["size_bytes"] and dynamic["size_bytes"] < base["size_bytes"]
    import onnx

    graph = onnx.load(str(out / "int8-static.onnx")).graph
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    quantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"
                 and any(t.name == n.input[0] and t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)}
    assert len(conv_weights) == 3 and conv_weights <= quantized
    assert all(v["throughput"] > 0 and v["latency_ms_p50"] > 0 for v in variants)

    report = json.loads((out / "report.json").read_text())
    baseline_runtimes = {t["runtime"] for t in report["variants"][0]["runtimes"]}
    assert baseline_runtimes == {"eager", "onnxruntime"}
    assert {t["runtime"] for t in report["variants"][1]["runtimes"]} == {"onnxruntime"}  # int8 is ONNX-only
    markdown = (out / "report.md").read_text()
    assert markdown.count("| ★ |") == 3 and "int8" in markdown
    assert any(note.startswith("int8 is") for note in report["notes"])  # faster or slower, said either way
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    session = ort.InferenceSession(str(out / "int8-static.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": np.zeros((3, 1, 28, 28), np.uint8)})[0].shape == (3, 10)


def test_timings_are_percentiles_of_the_timed_calls_and_the_median_repeat(monkeypatch):
    from trainforge.compress import measure

    # A clock that each call advances by a given duration. Batch 1: five slow warm-up calls, then 100 timed calls of
    # 1..100 ms (shuffled). Batch 256: one slow warm-up, then three repeats of at least 0.2 s at 2,048, 1,024 and
    # 4,096 images/s.
    clock = [0.0]
    singles = iter([1.0] * 5 + list(np.random.default_rng(0).permutation(np.arange(1, 101) / 1000)))
    batches = iter([10.0, 0.125, 0.125, 0.25, 0.0625, 0.0625, 0.0625, 0.0625])

    def predict(images):
        clock[0] += next(singles if len(images) == 1 else batches)
        return np.zeros((len(images), 10), np.float32)

    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    timing = measure.time_predictor("eager", predict, np.zeros((3, 1, 28, 28), np.uint8), latency_calls=100,
                                    throughput_repeats=3)
    # numpy's percentiles of 1..100 (linear interpolation): 50.5 and 99.01; the median of the three rates.
    assert (timing.latency_ms_p50, timing.latency_ms_p99) == pytest.approx((50.5, 99.01))
    assert timing.throughput == pytest.approx(2048.0)
    assert next(singles, None) is None and next(batches, None) is None  # no call more or less than planned


def test_channel_and_magnitude_pruning(small_cnn_run, tmp_path):
    from trainforge.compress import compress_run
    from trainforge.deploy.formats import load_program

    report = compress_run(small_cnn_run, tmp_path, quick_options(prune=0.5, prune_kind="both", subset=1000))
    base, channel, magnitude = report["variants"]
    assert (channel["name"], magnitude["name"]) == ("pruned-channel", "pruned-magnitude")
    # Half the channels of each hidden layer: the convolutions keep about a quarter of their weights.
    assert channel["params"] < 0.5 * base["params"] and channel["size_bytes"] < 0.5 * base["size_bytes"]
    # The recovery fine-tune gains over the pruned network as it came out of pruning (0.18 -> 0.29 at seed 0), and
    # magnitude pruning with its mask held keeps the accuracy of the network it pruned (0.28).
    assert channel["test_acc"] > _accuracy_right_after_pruning(small_cnn_run, 0.5) + 0.05, channel
    assert magnitude["test_acc"] > channel["test_acc"] - 0.05, magnitude
    sparsity = magnitude["sparsity"]
    assert abs(sparsity["sparsity"] - 0.5) < 0.01 and set(sparsity["layers"]) == {"net.0.0", "net.2.0", "net.4.0",
                                                                                  "net.7"}
    # The zeros survive fine-tuning (the mask was held) and export.
    import onnx

    graph = onnx.load(str(tmp_path / "pruned-magnitude.onnx")).graph
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zeros > 0.45
    module, info = load_program(tmp_path / "pruned-channel.pt2")
    assert module(torch.zeros(4, 1, 28, 28, dtype=torch.uint8)).shape == (4, 10) and info.model == "cnn"


def _accuracy_right_after_pruning(run_dir, ratio: float) -> float:
    """Test accuracy (first 500 images, as quick_options measures) of the channel-pruned model, not fine-tuned."""
    import trainforge
    from trainforge.compress import measure
    from trainforge.compress.prune import prune_channels
    from trainforge.deploy.formats import torch_predictor
    from trainforge.runs import load_run_data

    test = load_run_data(run_dir).test
    pruned = prune_channels(trainforge.load(run_dir), ratio, test.images[:2]).eval()
    return measure.accuracy(torch_predictor(pruned), test.images[:500].numpy(), test.labels[:500].numpy())


def test_distillation_keeps_a_loadable_run_and_bf16(small_cnn_run, trained_run, tmp_path):
    import trainforge
    from trainforge.compress import compress_run

    # The narrow cnn teaches the linear model: same classes, a loadable run directory comes out.
    report = compress_run(trained_run, tmp_path, quick_options(distill_from=str(small_cnn_run), subset=1000,
                                                               quantize="bf16"))
    names = [v["name"] for v in report["variants"]]
    assert names == ["baseline", "distilled", "distilled+bf16"]
    distilled = report["variants"][1]
    assert distilled["teacher"] == str(small_cnn_run) and distilled["test_acc"] > 0.5
    student = trainforge.load(distilled["run_dir"])
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    half = report["variants"][2]
    assert half["size_bytes"] > 0 and abs(half["test_acc"] - distilled["test_acc"]) <= 0.02
    assert student(images).shape == (6, 10)
    assert any(note.startswith("teacher test accuracy") for note in report["notes"])


def test_distillation_loss_matches_teacher_at_zero():
    from trainforge.compress.distill import distillation_loss

    teacher = torch.nn.Flatten()  # "logits" = the flattened images themselves
    images = torch.randn(4, 10)
    loss = distillation_loss(teacher, temperature=2.0, alpha=1.0)
    assert float(loss(images.clone(), torch.zeros(4, dtype=torch.long), images)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(-images, torch.zeros(4, dtype=torch.long), images)) > 0.1


def test_compress_errors(small_cnn_run, tmp_path):
    from trainforge.compress import Options, compress_run
    from trainforge.errors import ConfigError

    result = run_cli("compress", str(small_cnn_run), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "nothing to do" in result.stderr
    with pytest.raises(ConfigError, match="--prune"):
        compress_run(small_cnn_run, tmp_path, quick_options(prune=1.5))
    with pytest.raises(ConfigError, match="--runtimes"):
        compress_run(small_cnn_run, tmp_path, Options(quantize="int8", runtimes="tensorrt"))
