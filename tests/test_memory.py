"""The memory plan (hardware/memory.py, train/plan.py), recovery from out-of-memory, --batch-size/--lr auto and the
learning-rate range test, on real MNIST."""

from __future__ import annotations

import ctypes
import json
import sys

import pytest
import torch

import trainforge
from trainforge import config as cfg
from trainforge.data import DataBundle, ImageSet, balanced_subset, channel_stats
from trainforge.errors import ConfigError
from trainforge.hardware import memory
from trainforge.train import loop
from trainforge.train.device import configure_host_allocator


def _bundle(mnist, n_train: int, n_test: int = 2000) -> DataBundle:
    idx = balanced_subset(mnist.train.labels, n_train, 0)
    return DataBundle("mnist", ImageSet(mnist.train.images[idx], mnist.train.labels[idx], mnist.classes),
                      ImageSet(mnist.test.images[:n_test], mnist.test.labels[:n_test], mnist.classes),
                      mnist.mean, mnist.std)


def _config(tmp_path, name: str, **values) -> dict:
    return {"model": "linear", "epochs": 1, "out": str(tmp_path / name), "tensorboard": False, **values}


def test_parse_bytes_takes_suffixes_and_rejects_nonsense():
    assert memory.parse_bytes("4G") == 4 * 2 ** 30
    assert memory.parse_bytes("1.5g") == int(1.5 * 2 ** 30)
    assert memory.parse_bytes("512MiB") == 512 * 2 ** 20
    assert memory.parse_bytes("1000") == 1000
    for bad in ("lots", "-1G", "0", "4X"):
        with pytest.raises(ConfigError, match="--memory-budget"):
            memory.parse_bytes(bad)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_blocks() -> int:
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblks


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_a_tensor_past_the_mmap_ceiling_comes_from_the_reused_heap():
    # 64 MB: a cnn activation at 64 px and batch 128, past the 32 MB that glibc's mmap threshold can be raised to.
    configure_host_allocator()
    before = _mmapped_blocks()
    batch = torch.empty(64 * 2 ** 20, dtype=torch.uint8)
    assert _mmapped_blocks() == before
    del batch


def test_channel_stats_in_chunks_match_the_whole_set_at_once(mnist):
    images = mnist.test.images[:3000]
    x = images.double().div(255).flatten()
    mean, std = channel_stats(images, chunk_bytes=2 ** 20)
    assert mean[0] == pytest.approx(x.mean().item(), abs=1e-9)
    assert std[0] == pytest.approx(x.std().item(), abs=1e-9)


def test_a_small_budget_accumulates_micro_batches_and_trains_as_well(tmp_path, mnist):
    bundle = _bundle(mnist, 16384)
    common = dict(batch_size=8192, epochs=3, lr=0.4, optimizer="sgd", schedule="onecycle", warmup=0.1)
    free = trainforge.train(_config(tmp_path, "free", **common), data=bundle, progress=False)
    # 16 MB beyond what the process holds: room for about 3,000 linear-model samples, not a batch of 8,192.
    budget = f"{memory.in_use_bytes(torch.device('cpu')) // 2 ** 20 + 16}M"
    tight = trainforge.train(_config(tmp_path, "tight", memory_budget=budget, **common), data=bundle, progress=False)
    assert free.accumulate == 1 and tight.accumulate >= 2
    saved = cfg.load_file(cfg.TrainConfig, tmp_path / "tight" / "config.yaml")
    assert saved.accumulate == tight.accumulate and saved.memory_budget == budget and saved.loader == "device"
    assert abs(tight.test_acc - free.test_acc) <= 0.01
    assert tight.peak_rss_bytes > 0 and tight.peak_gpu_bytes is None


def test_out_of_memory_doubles_the_accumulation_and_keeps_the_result(tmp_path, mnist, monkeypatch, capsys):
    bundle = _bundle(mnist, 2048, n_test=1000)
    common = dict(batch_size=256, optimizer="sgd", lr=0.2, schedule="onecycle", warmup=0.2)
    doubled = trainforge.train(_config(tmp_path, "doubled", accumulate=2, **common), data=bundle, progress=False)
    monkeypatch.setenv(loop.OOM_ENV, "step=3,eval=1")
    recovered = trainforge.train(_config(tmp_path, "recovered", **common), data=bundle, progress=False)
    assert "out of memory at step 3: 2 micro-batches of 128" in capsys.readouterr().err
    assert recovered.accumulate == 2 and recovered.eval_batch_size == doubled.eval_batch_size // 2
    assert recovered.test_acc == pytest.approx(doubled.test_acc, abs=1e-5)
    assert recovered.test_loss == pytest.approx(doubled.test_loss, abs=1e-5)
    assert recovered.train_loss == pytest.approx(doubled.train_loss, abs=1e-5)
    record = json.loads((tmp_path / "recovered" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step": 3, "accumulate": 2, "micro_batch": 128} in record["oom_recoveries"]


def test_out_of_memory_below_one_sample_per_micro_batch_is_a_clear_error(tmp_path, mnist, monkeypatch):
    monkeypatch.setenv(loop.OOM_ENV, "step=1")
    with pytest.raises(trainforge.errors.TrainingError, match="micro-batches of 1 sample"):
        trainforge.train(_config(tmp_path, "one", batch_size=1, subset=None), data=_bundle(mnist, 100, 100),
                         progress=False)


def test_auto_batch_size_is_the_knee_of_samples_per_second_recorded_and_rerun_identically(tmp_path, mnist,
                                                                                         monkeypatch, capsys):
    from trainforge.train import plan

    # A stand-in for the trial steps' timing with a known knee: samples/s doubles up to 64 and gains only 5% at 128,
    # below the 1.1x a doubling must bring on the CPU; 256 (and beyond) would be faster still, but is never tried.
    rates = {16: 1000.0, 32: 2000.0, 64: 3800.0, 128: 3990.0, 256: 8000.0}
    tried = []

    def rate(model, optimizer, x, y, device, precision):
        tried.append(len(y))
        return rates[len(y)]

    monkeypatch.setattr(plan, "_samples_per_second", rate)
    bundle = _bundle(mnist, 2000, n_test=1000)
    # With progress on, training prints its automatic choices.
    first = trainforge.train(_config(tmp_path, "auto", batch_size="auto", lr="auto"), data=bundle, progress=True)
    assert tried == [16, 32, 64, 128]
    assert "batch size auto: 64, samples/s grew by less than 1.1x past it (3,800 at 64, 3,990 at 128)" in \
        capsys.readouterr().err
    saved = cfg.load_file(cfg.TrainConfig, tmp_path / "auto" / "config.yaml")
    assert saved.batch_size == 64
    assert isinstance(saved.lr, float) and saved.lr_scaling == "linear"
    # Without a knee, the largest power of two that keeps 8 steps per epoch: 2,000 // 8 = 250 -> 128.
    rates[128] = 7600.0
    model = torch.nn.Linear(1, 1)
    assert plan.auto_batch_size(model, bundle.train.images, bundle.train.labels, torch.device("cpu"), "32",
                                largest=4096, n_train=2000)[0] == 128
    again = trainforge.train({**cfg.to_dict(saved), "out": str(tmp_path / "again")}, data=bundle, progress=False)
    assert (again.test_acc, again.test_loss) == (first.test_acc, first.test_loss)


def test_range_test_tries_rising_rates_and_leaves_the_model_alone(mnist):
    from trainforge.data import DeviceLoader
    from trainforge.models import build_classifier
    from trainforge.train import lr_range, recipes

    config = recipes.resolve(cfg.TrainConfig(model="linear", batch_size=256))
    model = build_classifier("linear", 10, 1, 28, mnist.mean, mnist.std)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DeviceLoader(mnist.train.images[:4096], mnist.train.labels[:4096], 256, device=torch.device("cpu"))
    result = lr_range.range_test(model, loader, config, torch.device("cpu"), "32", steps=30)
    assert all(a < b for a, b in zip(result.lrs, result.lrs[1:]))
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1] and min(result.losses) < result.losses[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert lr_range.plot(result).startswith(b"\x89PNG")


def test_train_resizes_a_builtin_set_to_image_size(tmp_path, mnist):
    from trainforge import runs

    trainforge.train(_config(tmp_path, "small", image_size=14), data=_bundle(mnist, 500, 200), progress=False)
    model = runs.load(tmp_path / "small")
    assert json.loads((tmp_path / "small" / runs.MODEL_INFO).read_text())["image_size"] == 14
    assert model(mnist.test.images[:2]).shape == (2, 10)


def test_cpu_evaluation_batches_fit_the_last_level_cache(monkeypatch, tmp_path):
    """Unless --eval-batch-size is given, a CPU evaluates in batches whose activations fit its last-level cache
    (up to 3x faster than batches of 2,000); memory still bounds it, and a GPU keeps the cap."""
    from trainforge.hardware import cpuinfo
    from trainforge.train import plan

    for index, (level_type, size) in enumerate((("Data", "48K"), ("Instruction", "32K"), ("Unified", "2048K"),
                                                ("Unified", "32M"))):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "type").write_text(level_type + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert cpuinfo.last_level_cache_bytes.__wrapped__(str(tmp_path)) == 32 * 2 ** 20
    assert cpuinfo.last_level_cache_bytes.__wrapped__(str(tmp_path / "absent")) is None

    monkeypatch.setattr(plan, "last_level_cache_bytes", lambda: 32 * 2 ** 20)
    cost = plan.SampleCost(train_fixed=0, train_per_sample=2 ** 20, eval_fixed=0, eval_per_sample=2 ** 20)
    cpu, gpu, roomy = torch.device("cpu"), torch.device("cuda"), 2 ** 40
    assert plan._eval_batch(cost, roomy, None, cpu) == (32, "cache")
    assert plan._eval_batch(cost, roomy, 500, cpu) == (500, "cap")  # --eval-batch-size is the user's
    assert plan._eval_batch(cost, roomy, None, gpu) == (plan.EVAL_CAP, "cap")
    assert plan._eval_batch(cost, 12 * 2 ** 20, None, cpu) == (8, "memory")  # 12 MB / 1.5 MB per image
    plan_line = plan.fit(cost, roomy, "test", 0, 0, 64, None, None, cpu).describe()
    assert plan_line.endswith("evaluation batches of 32 (activations within the CPU's last-level cache, where "
                              "evaluation ran fastest)")
